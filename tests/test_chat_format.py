"""Chat formats (lima_jax/data/chat_format.py) and HF tokenizers against transformers.

The reference is transformers' `apply_chat_template` (Llama-3-Instruct's own template from
../shared/llama3, a ChatML template written here) on the same messages; the reference loss
mask is found independently: each assistant content's characters located in the rendered text,
the tokens covering them (offsets from the tokenizer) plus the end-of-turn token after them.
The export's templates (`hf_chat_template`, through `hf_tokenizer_files`) must give `encode`'s
and `prompt_ids`' ids."""

import json

import numpy as np
import pytest
import tokenizers
import transformers

from lima_jax.convert.tokenizer_files import hf_tokenizer_files
from lima_jax.data import chat_format
from lima_jax.data.conversation import Conversation
from lima_jax.data.tokenizer import HFTokenizer, load_tokenizer, tokenizer_from_record
from lima_jax.errors import ConfigError, DataError

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SAMPLES = [
    ("Hi there!", ["What is 2 plus 3?", "2 plus 3 is 5."]),
    (None, ["What is 4 plus 4?", "4 plus 4 is 8.", "And if I add 2 more?", "8 plus 2 is 10."]),
    ("Be brief.\nVery.", ["  padded question \n", "\nAn answer that starts with a newline.\n\n", "Tabs\tand  spaces?",
                          "ümlaut, 日本, emoji 🙂."]),
]


def messages(conv: Conversation) -> list[dict]:
    out = [] if conv.system is None else [{"role": "system", "content": conv.system}]
    return out + [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(conv.turns)]


def reference(hf_tok, conv: Conversation, eot: str, strip: bool) -> tuple[list[int], list[float]]:
    """transformers' ids for the conversation, and the mask of its assistant spans + their EOT."""
    msgs = messages(conv)
    text = hf_tok.apply_chat_template(msgs, tokenize=False)
    enc = hf_tok.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                     tokenizer_kwargs={"return_offsets_mapping": True})
    ids = list(enc["input_ids"])
    spans, at = [], 0
    for m in msgs:
        content = m["content"].strip() if strip else m["content"]
        start = text.index(content, at)
        at = start + len(content)
        if m["role"] == "assistant":
            assert text.startswith(eot, at)
            spans.append((start, at + len(eot)))  # the content and the end-of-turn token after it
    weights = [float(any(s < b and e > a for s, e in spans)) for a, b in enc["offset_mapping"]]
    return ids, weights


def chatml_folder(tmp_path, with_chat_tokens: bool = True):
    """A small byte-level BPE tokenizer.json (no hub), with ChatML's special tokens, and its config."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    specials = ["<|endoftext|>"] + (["<|im_start|>", "<|im_end|>"] if with_chat_tokens else [])
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    corpus = [t for _, turns in SAMPLES for t in turns] + ["system user assistant\n\n The quick brown fox."] * 3
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.fixture(scope="module")
def llama3(shared_dir):
    return load_tokenizer(str(shared_dir / "llama3" / "tokenizer.json")), \
        transformers.AutoTokenizer.from_pretrained(shared_dir / "llama3")


def test_llama3_tokenizer(llama3):
    tok, hf = llama3
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id, tok.eot_id, tok.eot_added) == \
        ("hf", 128256, 128000, 128001, 128009, False)
    text = "Hello, world!\n\n  ümlaut 日本 🙂"
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    ids = [128000] + tok.encode(text) + [128009, 128255, 130000]  # specials and padding rows are skipped
    assert tok.decode(ids) == hf.decode(ids[:-1], skip_special_tokens=True) == text
    assert tok.fits_vocab(128256) and tok.fits_vocab(128512) and not tok.fits_vocab(128000)
    again = tokenizer_from_record(json.loads(json.dumps(tok.to_record())))
    assert again.same_as(tok) and again.encode(text) == tok.encode(text) and again.eos_id == 128001


def test_llama3_lima_training_set_equals_transformers(llama3, shared_dir):
    """All 1,000 LIMA training examples (plus multi-turn and system chains of them) in `llama3`
    format: ids and loss weights equal transformers' template and the assistant spans."""
    tok, hf = llama3
    rows = [json.loads(line)["conversations"] for line in (shared_dir / "lima" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 1000
    convs = [Conversation(tuple(turns)) for turns in rows]
    convs += [Conversation(tuple(rows[i] + rows[i + 1]), system="You are helpful." if i % 4 else None)
              for i in range(0, 60, 2)]  # 30 dialogues of two exchanges
    for conv in convs:
        ids, weights = chat_format.encode(conv, tok, "llama3")
        ref_ids, ref_weights = reference(hf, conv, "<|eot_id|>", strip=True)
        assert ids.tolist() == ref_ids
        assert weights.tolist() == ref_weights
    last_ids, last_w = chat_format.encode(convs[-1], tok, "llama3", train_on="last")
    all_ids, all_w = chat_format.encode(convs[-1], tok, "llama3")
    first_end = all_ids.tolist().index(128009, int(np.argmax(all_w)))  # the first answer's <|eot_id|>
    assert (last_ids == all_ids).all() and last_w[:first_end + 1].sum() == 0
    assert (last_w[first_end + 1:] == all_w[first_end + 1:]).all() and last_w.sum() > 0


@pytest.mark.parametrize("system, turns", SAMPLES)
def test_chatml_equals_transformers(tmp_path, system, turns):
    folder = chatml_folder(tmp_path)
    tok = load_tokenizer(str(folder))
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    hf.chat_template = CHATML
    assert (tok.bos_id, tok.eot_id, tok.eot_added) == (None, tok.token_id("<|im_end|>"), False)
    conv = Conversation(tuple(turns), system=system)
    ids, weights = chat_format.encode(conv, tok, "chatml")
    ref_ids, ref_weights = reference(hf, conv, "<|im_end|>", strip=False)
    assert ids.tolist() == ref_ids and weights.tolist() == ref_weights
    assert chat_format.prompt_ids(turns[:-1], tok, "chatml", system) == list(hf.apply_chat_template(
        messages(Conversation(tuple(turns[:-1]), system)), add_generation_prompt=True, return_dict=True)["input_ids"])


def export_tokenizer(tok, fmt, tmp_path, vocab_size=None):
    """The export's tokenizer files, as AutoTokenizer loads them."""
    folder = tmp_path / f"export-{fmt}"
    folder.mkdir()
    for name, contents in hf_tokenizer_files(tok, tok.eot_id, vocab_size or tok.vocab_size, 4096, fmt).items():
        (folder / name).write_bytes(contents)
    return transformers.AutoTokenizer.from_pretrained(folder)


def check_export(hf, tok, fmt, samples):
    for system, turns in samples:
        system = system if chat_format.HAS_SYSTEM[fmt] else None
        conv = Conversation(tuple(turns), system=system)
        msgs = messages(conv)
        assert list(hf.apply_chat_template(msgs, return_dict=True)["input_ids"]) == \
            chat_format.encode(conv, tok, fmt)[0].tolist()
        for k in range(1, len(turns), 2):  # each user turn as a prompt
            prompt = list(hf.apply_chat_template(msgs[:len(msgs) - len(turns) + k], add_generation_prompt=True,
                                                 return_dict=True)["input_ids"])
            assert prompt == chat_format.prompt_ids(turns[:k], tok, fmt, system)


@pytest.mark.parametrize("fmt", ["llama3", "lima"])
def test_export_template_llama3_tokenizer(llama3, tmp_path, fmt):
    tok, _ = llama3
    hf = export_tokenizer(tok, fmt, tmp_path)
    assert hf.convert_tokens_to_ids("<|eot_id|>") == 128009 and len(hf) == 128256
    samples = [(s, [t.strip() for t in turns]) for s, turns in SAMPLES]  # lima keeps whitespace; llama3 trims
    check_export(hf, tok, fmt, samples if fmt == "lima" else SAMPLES)


@pytest.mark.parametrize("fmt", ["chatml", "lima"])
def test_export_template_chatml_tokenizer(tmp_path, fmt):
    tok = load_tokenizer(str(chatml_folder(tmp_path)))
    check_export(export_tokenizer(tok, fmt, tmp_path), tok, fmt, SAMPLES)


def test_hf_tokenizer_without_end_of_turn_gets_limas_row(tmp_path):
    """A tokenizer.json without an end-of-turn token: LIMA's added row, exported as `<|eot|>`."""
    tok = load_tokenizer(str(chatml_folder(tmp_path, with_chat_tokens=False) / "tokenizer.json"))
    assert isinstance(tok, HFTokenizer) and tok.eot_added and tok.eot_id == tok.vocab_size - 1
    assert not tok.fits_vocab(tok.vocab_size + 1)
    hf = export_tokenizer(tok, "lima", tmp_path)
    assert hf.convert_tokens_to_ids("<|eot|>") == tok.eot_id
    check_export(hf, tok, "lima", SAMPLES)
    with pytest.raises(ConfigError, match="needs the special tokens"):
        chat_format.check(tok, "chatml")


def test_system_message_refused_by_lima_naming_the_record(llama3):
    tok, _ = llama3
    conv = Conversation(("Hi?", "Hello."), system="Be brief.", where="data.jsonl:7", line=7)
    with pytest.raises(DataError, match="data.jsonl:7: a system message"):
        chat_format.encode(conv, tok, "lima")
    with pytest.raises(ConfigError, match="config.data.train_on='first'"):
        chat_format.encode(conv, tok, "llama3", train_on="first")


def test_config_keys_are_validated():
    from lima_jax.config import base_config, validate_values

    for key, value in (("chat_format", "alpaca"), ("train_on", "first")):
        c = base_config()
        c.data[key] = value
        with pytest.raises(ConfigError, match=f"config.data.{key}='{value}'"):
            validate_values(c)


def test_server_messages_take_a_system_message_only_where_the_format_has_one():
    from lima_jax.serving.protocol import InvalidRequest, Message, chat_turns

    msgs = [Message(role="system", content="Be brief."), Message(role="user", content="Hi"),
            Message(role="assistant", content="Hello."), Message(role="user", content="Bye")]
    assert chat_turns(msgs, allow_system=True) == ("Be brief.", ["Hi", "Hello.", "Bye"])
    assert chat_turns(msgs[1:], allow_system=True) == (None, ["Hi", "Hello.", "Bye"])
    with pytest.raises(InvalidRequest, match="no system role"):
        chat_turns(msgs)
    with pytest.raises(InvalidRequest, match="allowed only first"):
        chat_turns(msgs[1:2] + msgs[:1], allow_system=True)


def test_conversion_stores_tokenizer_json_and_add_eot_adds_no_row(tmp_path):
    """An HF folder with a tokenizer.json that has an end-of-turn token (<|im_end|>): it is found
    and stored, and --add_eot adds no row (the model already has one)."""
    from lima_jax import model_store
    from lima_jax.convert import convert_to_orbax
    from tests.convert_fixtures import CONVERT_MHA as MHA
    from tests.references import hf_model

    source = tmp_path / "hf"
    hf_model(MHA, seed=6).save_pretrained(source)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    assert tok.get_vocab_size() < MHA.vocab_size  # Qwen-like: the embedding has more rows than ids
    tok.save(str(source / "tokenizer.json"))
    report = convert_to_orbax("hf", source, tmp_path / "ckpt", add_eot=True)
    meta = model_store.read_meta(tmp_path / "ckpt")
    stored = tokenizer_from_record(meta.tokenizer)
    assert report["model"].vocab_size == MHA.vocab_size and report["tokenizer"]
    assert stored.kind == "hf" and meta.eot_id == stored.eot_id == tok.token_to_id("<|im_end|>")


def test_metas_tiktoken_tokenizer_is_refused(tmp_path):
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== 1\nIw== 2\n")  # Meta's Llama 3 original/ layout
    with pytest.raises(ConfigError, match="tiktoken.*tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_answers_stop_where_the_families_generation_configs_stop(llama3, tmp_path):
    """sample.py, chat.py and serve.py decode with `Sampler.stop_ids`: for a checkpoint in `llama3`
    format Llama-3-Instruct's generation_config eos_token_id [<|end_of_text|>, <|eot_id|>]; in
    `chatml`, Qwen2.5-Instruct's [<|im_end|>, <|endoftext|>]; plus a converted model's own."""
    from lima_jax.model import ModelConfig
    from lima_jax.sampling.sampler import Sampler

    def stops(tok, fmt, own=()):
        cfg = ModelConfig(vocab_size=tok.vocab_size, dim=8, n_layers=1, n_heads=1, n_kv_heads=1, ffn_dim=8)
        return set(Sampler(cfg, {}, tok, None, fmt, own).stop_ids)

    assert stops(llama3[0], "llama3") == {128001, 128009}
    assert stops(llama3[0], "llama3", (128001, 128008, 128009)) == {128001, 128008, 128009}  # Llama 3.1's <|eom_id|>
    qwen = load_tokenizer(str(chatml_folder(tmp_path)))
    assert stops(qwen, "chatml") == {qwen.token_id("<|im_end|>"), qwen.token_id("<|endoftext|>")}
