"""LIMA formatting and the documented handling of malformed input (lima_jax/data/format.py)."""

import json

import numpy as np
import pytest

from lima_jax.data import demo
from lima_jax.data.format import DataError, encode_conversation, format_prompt, load_examples
from lima_jax.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(demo.build_demo_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def write(tmp_path, lines):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


def test_demo_tokenizer_and_eot(tok):
    assert (tok.num_pieces, tok.eot_id, tok.vocab_size, tok.bos_id, tok.eos_id) == (511, 511, 512, 1, 2)
    assert tok.decode(tok.encode("What is 12 plus 7?") + [tok.eot_id]) == "What is 12 plus 7?"


def test_multi_turn_layout(tok):
    turns = ["What is 2 plus 2?", "2 plus 2 is 4.", "And 3 more?", "4 plus 3 is 7."]
    ids, w = encode_conversation(turns, tok)
    sp, E = tok.sp, tok.eot_id
    expected, expected_w = [1], [0]
    for i, t in enumerate(turns):  # written out from the LIMA rule, not from the code
        piece = sp.encode(t) + [E]
        expected += piece
        expected_w += [1 if i in (1, 3) else 0] * len(piece)
    assert ids.tolist() == expected and w.tolist() == expected_w
    assert ids.dtype == np.int32 and w.dtype == np.float32
    assert format_prompt(turns[:3], tok) == expected[:len(expected) - len(sp.encode(turns[3])) - 1]
    with pytest.raises(ValueError):
        format_prompt(turns[:2], tok)


def test_trimming_counted(tok, tmp_path):
    long = " ".join(["apple river garden"] * 20)
    path = write(tmp_path, [{"conversations": ["Hi?", long]}, {"conversations": ["Hi?", "Yes."]}])
    examples, stats, _ = load_examples(path, tok, seq_len=16)
    assert stats.trimmed == 1 and stats.examples == 2
    assert len(examples[0]["ids"]) == 17  # seq_len + 1: inputs and targets are seq_len long
    assert examples[0]["ids"][-1] != tok.eot_id
    assert len(examples[1]["ids"]) == 3 + len(tok.encode("Hi?")) + len(tok.encode("Yes."))


@pytest.mark.parametrize("line, message", [
    ("this is not json", "not valid JSON"),
    ([1, 2], "a list, not an object with a 'conversations' field (lima format)"),
    ({"source": "x"}, "no 'conversations' field (lima format)"),
    ({"conversations": "Hi?"}, "'conversations' must be a non-empty list"),
    ({"conversations": []}, "'conversations' must be a non-empty list"),
    ({"conversations": ["Hi?", 5]}, "conversations[1] is a int, not a string"),
    ({"conversations": ["Hi?", None]}, "conversations[1] is a NoneType, not a string"),
    ({"conversations": ["Hi?", "  \n"]}, "conversations[1] is empty"),
    ({"conversations": ["", "Yes."]}, "conversations[0] is empty"),
    ({"conversations": ["Hi?", "Yes."], "source": 3}, "'source' is a int, not a string"),
])
def test_malformed_line_is_an_error_naming_file_and_line(tok, tmp_path, line, message):
    # a blank line before the bad one: the reported number is the line in the file
    path = write(tmp_path, [{"conversations": ["Hi?", "Yes."]}, "", line])
    with pytest.raises(DataError) as err:
        load_examples(path, tok, seq_len=64)
    assert f"{path}:3:" in str(err.value) and message in str(err.value)


def test_unanswered_turns_are_counted_skips(tok, tmp_path):
    path = write(tmp_path, [
        {"conversations": ["Hi?", "Yes.", "And then?"]},  # final user turn dropped
        {"conversations": ["Only a prompt"]},  # nothing to learn: skipped
        {"conversations": ["Hi?", "Yes."]},
        {"conversations": [" ".join(["apple"] * 40), "Too late."]},  # prompt fills seq_len
    ])
    examples, stats, _ = load_examples(path, tok, seq_len=16)
    assert (stats.lines, stats.examples, stats.dropped_final_turns, stats.skipped_no_response,
            stats.skipped_no_target) == (4, 2, 2, 1, 1)
    assert [e["line"] for e in examples] == [1, 3]
    assert examples[0]["ids"].tolist() == examples[1]["ids"].tolist()  # "And then?" is gone


def test_file_with_no_answers_is_an_error(tok, tmp_path):
    path = write(tmp_path, [{"conversations": ["A prompt"]}, {"conversations": ["Another"]}])
    with pytest.raises(DataError, match=str(path)):
        load_examples(path, tok, seq_len=64)


def test_non_utf8_bytes_name_the_line(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps({"conversations": ["q", "a"]}).encode() + b"\n" +
                     b'{"conversations": ["caf\xe9?", "yes"]}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not UTF-8 \(byte 0xe9 at column 24\)"):
        load_examples(str(path), tok, 64)


def test_lines_split_on_newline_only(tmp_path, tok):
    """A raw U+2028 (or U+0085, form feed) inside a JSON string is valid JSON: one line, one example."""
    answer = "first\u2028second\x0cthird\u0085fourth"
    path = tmp_path / "sep.jsonl"
    path.write_text(json.dumps({"conversations": ["q?", answer]}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")
    examples, stats, _ = load_examples(str(path), tok, 256)
    assert stats.lines == 1 and examples[0]["turns"] == ["q?", answer]


def test_sources_keep_only_the_listed(tmp_path, tok):
    path = write(tmp_path, [{"conversations": ["q1", "a1"], "source": "stackexchange"},
                            {"conversations": ["q2", "a2", "q3", "a3"], "source": "multi_turn"},
                            {"conversations": ["q4", "a4"]}])
    both, _, _ = load_examples(path, tok, 64)
    assert [e["source"] for e in both] == ["stackexchange", "multi_turn", ""]
    single, stats, _ = load_examples(path, tok, 64, sources=("stackexchange", ""))
    assert [e["line"] for e in single] == [1, 3] and stats.skipped_source == 1
    with pytest.raises(DataError, match=r"no record has a source in config\.data\.sources=\['wikihow'\]"):
        load_examples(path, tok, 64, sources=("wikihow",))
