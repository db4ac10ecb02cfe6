"""Input formats (lima_jax/data/readers.py): the same conversations in LIMA, OpenAI, ShareGPT and
Alpaca records, in jsonl, Parquet, shard folders, save_to_disk folders and hf://, give the ids and
loss weights LIMA's rule gives; every bad record is refused naming its line and field."""

import json
import subprocess
import sys
import time

import pytest

from lima_jax.data import demo, readers
from lima_jax.data.format import load_examples
from lima_jax.data.tokenizer import load_tokenizer
from lima_jax.errors import DataError
from tests import reader_fixtures as F
from tests.conftest import ROOT

CONVERSATIONS = [
    dict(turns=["What is 25 plus 26?", "25 plus 26 is 51."], source="math"),
    dict(turns=["Add the numbers.\n12 and 7", "12 plus 7 is 19."], source="alpaca_like"),  # Alpaca's input
    dict(turns=["What is 2 plus 2?", "2 plus 2 is 4.", "And 3 more?", "4 plus 3 is 7."], source="math"),
    dict(turns=["What is 9 plus 1?", "9 plus 1 is 10.", "And then?"], source=""),  # the last turn unanswered
]
SINGLE = CONVERSATIONS[:2]  # what Alpaca records can hold


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(demo.build_demo_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def reference(conversations, tok):
    """LIMA's rule written out (section 2): BOS, each turn + EOT, assistant turns and their EOT
    weighted; a final unanswered user turn is not trained."""
    out = []
    for c in conversations:
        turns = c["turns"][:len(c["turns"]) // 2 * 2]
        ids, weights = [tok.bos_id], [0.0]
        for i, turn in enumerate(turns):
            piece = tok.sp.encode(turn) + [tok.eot_id]
            ids += piece
            weights += [float(i % 2)] * len(piece)
        out.append((ids, weights))
    return out


def written(kind, tmp_path, conversations):
    """`conversations` written as `kind`; returns (path, the format auto-detection must find, where of row 0)."""
    fmt, _, container = kind.partition(":")
    records = [F.RECORDS[fmt](c) for c in conversations]
    if container == "jsonl":
        path = F.write_jsonl(tmp_path / "data.jsonl", records)
        return path, fmt, f"{path}:1"
    if container == "json":  # one JSON array, as Stanford's alpaca_data.json
        path = tmp_path / "data.json"
        path.write_text(json.dumps(records, indent=2))
        return str(path), fmt, f"{path}:row 0"
    if container == "parquet":
        path = F.write_parquet(tmp_path / "data.parquet", records)
        return path, fmt, f"{path}:row 0"
    if container == "shards":
        path = F.write_parquet_shards(tmp_path / "shards", records, shards=2)
        return path, fmt, f"{path}/part-00000.parquet:row 0"
    if container == "saved":
        path = F.write_saved_dataset(tmp_path / "saved", records)
        return path, fmt, f"{path}:row 0"
    assert container == "hf"  # datasets.load_dataset on a local folder of Parquet files
    F.write_parquet_shards(tmp_path / "hub", records, shards=1)
    return f"hf://{tmp_path / 'hub'}", fmt, f"hf://{tmp_path / 'hub'}:row 0"


KINDS = ["lima:jsonl", "openai:jsonl", "sharegpt:jsonl", "alpaca:jsonl", "alpaca:json", "openai:parquet", "lima:parquet",
         "sharegpt:parquet", "alpaca:parquet", "openai:saved", "lima:shards", "openai:hf"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_format_gives_lima_ids_and_weights(kind, tmp_path, tok):
    conversations = SINGLE if kind.startswith("alpaca") else CONVERSATIONS
    path, fmt, first_where = written(kind, tmp_path, conversations)
    examples, stats, found = load_examples(path, tok, 256)
    assert found == f"{fmt}, detected"
    expected = reference(conversations, tok)
    assert [(e["ids"].tolist(), e["weights"].tolist()) for e in examples] == expected
    assert [e["source"] for e in examples] == [c["source"] for c in conversations]
    assert examples[0]["where"] == first_where
    if not kind.endswith("shards"):  # (lines count within each shard; rows are numbered from 1 in `line`)
        assert [e["line"] for e in examples] == list(range(1, len(examples) + 1))
    assert stats.dropped_final_turns == (0 if kind.startswith("alpaca") else 1)
    explicit, _, named = load_examples(path, tok, 256, record_format=fmt)
    assert named == fmt and [e["ids"].tolist() for e in explicit] == [ids for ids, _ in expected]


@pytest.mark.parametrize("fmt", ["lima", "openai", "sharegpt", "alpaca"])
def test_system_messages_are_carried(fmt, tmp_path):
    c = dict(SINGLE[0], system="You answer sums.")
    path = F.write_jsonl(tmp_path / "s.jsonl", [F.RECORDS[fmt](c), F.RECORDS[fmt](SINGLE[1])])
    first, second = readers.read_conversations(path)
    assert (first.system, first.turns) == ("You answer sums.", tuple(c["turns"]))
    assert second.system is None


def test_alpaca_history_and_sharegpt_role_names(tmp_path, tok):
    """LLaMA-Factory's multi-turn Alpaca (`history`) and ShareGPT records that write user/assistant."""
    multi = CONVERSATIONS[2]["turns"]
    alpaca = dict(instruction=multi[2], output=multi[3], history=[multi[:2]], source="math")
    sharegpt = dict(conversations=[{"from": ("user", "assistant")[i % 2], "value": t} for i, t in enumerate(multi)],
                    source="math")
    for record in (alpaca, sharegpt):
        examples, _, _ = load_examples(F.write_jsonl(tmp_path / "h.jsonl", [record]), tok, 256)
        assert [(e["ids"].tolist(), e["weights"].tolist()) for e in examples] == reference([CONVERSATIONS[2]], tok)


def test_a_record_of_another_format_names_the_missing_field(tmp_path, tok):
    path = F.write_jsonl(tmp_path / "d.jsonl", [F.lima_record(SINGLE[0])])
    with pytest.raises(DataError, match=r"d\.jsonl:1: no 'messages' field \(openai format\)"):
        load_examples(path, tok, 64, record_format="openai")
    other = F.write_jsonl(tmp_path / "o.jsonl", [{"prompt": "Hi", "completion": "Yes"}])
    with pytest.raises(DataError, match=r"o\.jsonl:1: cannot tell the record format from \['completion', 'prompt'\]"):
        readers.read(other)


GOOD = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yes."}]


@pytest.mark.parametrize("record, message", [
    # an unknown role (tool calls are not chat turns), in each format that has roles
    ({"messages": GOOD + [{"role": "tool", "content": "42"}]},
     "messages[2].role is 'tool': only system, user and assistant messages train"),
    ({"messages": [GOOD[0], {"role": "function", "content": "f()"}]}, "messages[1].role is 'function'"),
    ({"conversations": [{"from": "human", "value": "Hi?"}, {"from": "bing", "value": "Yes."}]},
     "conversations[1].from is 'bing': only human, gpt and system (or user, assistant) messages train"),
    # turns out of order
    ({"messages": [GOOD[0], GOOD[0], GOOD[1]]}, "messages[1].role: two user turns in a row"),
    ({"messages": GOOD + [GOOD[1]]}, "messages[2].role: two assistant turns in a row"),
    ({"messages": [GOOD[1], GOOD[0]]}, "messages[0].role: the conversation starts with an assistant turn"),
    ({"conversations": [{"from": "gpt", "value": "Yes."}]}, "conversations[0].from: the conversation starts with an"),
    ({"messages": GOOD + [{"role": "system", "content": "Be brief."}]}, "messages[2].role: a second system message"),
    # a missing field
    ({"messages": [GOOD[0], {"role": "assistant"}]}, "messages[1]: no 'content' field (openai format)"),
    ({"messages": [{"content": "Hi?"}]}, "messages[0]: no 'role' field (openai format)"),
    ({"conversations": [{"from": "human"}]}, "conversations[0]: no 'value' field (sharegpt format)"),
    ({"instruction": "Add 2 and 2."}, "no 'output' field (alpaca format)"),
    ({"instruction": "Add.", "output": "9", "history": [["Hi?"]]}, "'history' must be a list of [instruction, output]"),
    ({"instruction": "Add.", "output": "9", "history": [["Hi?", 5]]}, "history[0][1] is a int, not a string"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "system", "content": "Be brief."}]}, "no user turn"),
    # an empty turn
    ({"messages": [GOOD[0], {"role": "assistant", "content": " \n"}]}, "messages[1].content is empty"),
    ({"instruction": "Add 2 and 2.", "output": ""}, "output is empty"),
    ({"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "Yes."}]},
     "conversations[0].value is empty"),
    # a non-string content
    ({"messages": [GOOD[0], {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}]},
     "messages[1].content is a list, not a string"),
    ({"messages": [GOOD[0], {"role": "assistant", "content": None}]}, "messages[1].content is a NoneType"),
    ({"instruction": "Add.", "input": 7, "output": "9"}, "'input' is a int, not a string"),
    ({"messages": GOOD, "system": 3}, "'system' is a int, not a string"),
])
def test_bad_record_names_its_line_and_field(record, message, tmp_path, tok):
    # a good record of the same format first (it decides the format), a blank line, then the bad one
    first = {"messages": GOOD} if "messages" in record else F.RECORDS[readers.detect(record, "")](SINGLE[0])
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(first) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as err:
        load_examples(str(path), tok, 64)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value), str(err.value)


def test_bad_row_of_a_columnar_file_names_the_row(tmp_path, tok):
    records = [{"messages": GOOD}, {"messages": GOOD}, {"messages": [GOOD[0], {"role": "tool", "content": "x"}]}]
    path = F.write_parquet(tmp_path / "bad.parquet", records)
    with pytest.raises(DataError, match=rf"^{path}:row 2: messages\[1\]\.role is 'tool'"):
        load_examples(path, tok, 64)
    saved = F.write_saved_dataset(tmp_path / "saved", records)
    with pytest.raises(DataError, match=rf"^{saved}:row 2: messages\[1\]\.role is 'tool'"):
        load_examples(saved, tok, 64)


def test_folders_that_hold_no_data_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="a folder without \\*.jsonl or \\*.parquet shards"):
        readers.read(str(tmp_path / "empty"))
    import datasets

    records = [F.openai_record(c) for c in SINGLE]
    datasets.DatasetDict(train=datasets.Dataset.from_list(records)).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"a saved DatasetDict with splits \['train'\]: point at one split's folder"):
        readers.read(str(tmp_path / "dict"))
    assert len(readers.read_conversations(str(tmp_path / "dict" / "train"))) == 2


def test_shards_are_read_in_name_order_jsonl_and_parquet_alike(tmp_path, tok):
    folder = tmp_path / "mixed"
    folder.mkdir()
    F.write_jsonl(folder / "b.jsonl", [F.lima_record(CONVERSATIONS[1])])
    F.write_parquet(folder / "a.parquet", [F.lima_record(CONVERSATIONS[0])])
    F.write_jsonl(folder / "c.jsonl", [F.lima_record(CONVERSATIONS[2])])
    (folder / "notes.txt").write_text("not data")
    examples, _, _ = load_examples(str(folder), tok, 256)
    assert [(e["ids"].tolist(), e["weights"].tolist()) for e in examples] == reference(CONVERSATIONS[:3], tok)
    assert [e["where"] for e in examples] == [f"{folder}/a.parquet:row 0", f"{folder}/b.jsonl:1", f"{folder}/c.jsonl:1"]


def test_hf_dataset_offline_fails_at_once_with_a_clear_message(monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: as unreachable as offline
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    start = time.time()
    with pytest.raises(DataError, match=r"^hf://GAIR/lima:test: the Hugging Face Hub is unreachable") as err:
        readers.read("hf://GAIR/lima:test")
    assert time.time() - start < 5 and "set HF_HUB_OFFLINE=1" in str(err.value)


def test_convert_format_round_trip(tmp_path, tok):
    """Any input -> LIMA jsonl: the converted file trains exactly as the input does."""
    conversations = CONVERSATIONS + [dict(SINGLE[0], system="You answer sums.")]
    source = F.write_parquet(tmp_path / "in.parquet", [F.sharegpt_record(c) for c in conversations])
    out = tmp_path / "out.jsonl"
    result = subprocess.run([sys.executable, "-m", "lima_jax.data.convert_format", source, str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "5 records read as sharegpt, detected" in result.stdout
    assert [json.loads(line) for line in out.read_text().splitlines()] == [F.lima_record(c) for c in conversations]
    assert readers.read_conversations(str(out)) == [
        c.__class__(c.turns, c.system, c.source, f"{out}:{c.line}", c.line) for c in readers.read_conversations(source)]
    again = subprocess.run([sys.executable, "-m", "lima_jax.data.convert_format", source, str(out)],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr
