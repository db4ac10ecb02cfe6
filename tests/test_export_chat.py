"""The Hugging Face export of a fine-tuned checkpoint is a working chat model in transformers:
`AutoTokenizer` loads it with EOT as a special token, `apply_chat_template` gives exactly the
ids LIMA trained on (`data.chat_format.encode`), and greedy `generate` answers as
`launch/sample.py --greedy --repetition_penalty 1.0` does, stopping at EOT by itself.

The checkpoint is a tiny model trained here (a few hundred Adam steps) to answer a few
conversations, single- and multi-turn, so its answers end with EOT the way a fine-tuned
model's do, with a LLaMA-style SentencePiece tokenizer (byte fallback, no normalization)."""

import dataclasses
import json

import jax
import pytest
import torch
import transformers

from lima_jax import model_store
from lima_jax.convert import ConversionError, export_hf
from lima_jax.convert.tokenizer_files import EOT_TOKEN
from lima_jax.data.chat_format import encode, prompt_ids
from lima_jax.data.conversation import Conversation
from lima_jax.data.tokenizer import SentencePieceTokenizer, Tokenizer
from lima_jax.model import ModelConfig, init_params
from lima_jax.sampling import SamplingSettings
from tests.convert_fixtures import sample_cli, train_tokenizer
from tests.train_fixtures import fit_to_answers

PIECES = 400
CFG = ModelConfig(vocab_size=PIECES + 1, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_multiple=8,
                  max_seq_len=128, dtype="float32")
TRAIN = [
    ["What is 2 plus 3?", "2 plus 3 is 5."],
    ["Spell the word \"apple\" backwards.", "\"apple\" backwards is \"elppa\"."],
    ["Give me one tip about sleep.", "Go to bed at the same time every night."],
    ["What is 4 plus 4?", "4 plus 4 is 8.", "And if I add 2 more?", "8 plus 2 is 10."],
]
MAX_NEW = 40


def train(tokenizer: Tokenizer, steps: int = 250) -> dict:
    """Fit CFG to TRAIN with LIMA's loss (responses and their EOT only)."""
    return fit_to_answers(CFG, [encode(Conversation(tuple(turns)), tokenizer) for turns in TRAIN], steps)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat")
    proto = train_tokenizer(PIECES, byte_fallback=True)
    tokenizer = SentencePieceTokenizer(proto)
    meta = model_store.CheckpointMeta(model=CFG, step=250, eot_id=PIECES, tokenizer=tokenizer.to_record(),
                                      source={"trained": "tests/test_export_chat.py"})
    model_store.save_params(path / "ckpt", train(tokenizer), meta)
    report = export_hf(path / "ckpt", path / "hf")
    assert report["tokenizer"]
    return path, tokenizer


def chat(turns):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def template_ids(hf_tokenizer, turns, **kw) -> list[int]:
    out = hf_tokenizer.apply_chat_template(chat(turns), tokenize=True, return_dict=True, **kw)
    return list(out["input_ids"])


def test_tokenizer_and_configs(exported):
    path, tokenizer = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(path / "hf")
    assert hf_tok.convert_tokens_to_ids(EOT_TOKEN) == PIECES and EOT_TOKEN in hf_tok.all_special_tokens
    assert len(hf_tok) == PIECES + 1
    config = json.loads((path / "hf" / "config.json").read_text())
    generation = json.loads((path / "hf" / "generation_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"] == [2, PIECES]
    lima = SamplingSettings()
    assert generation["do_sample"] is True and generation["top_k"] == lima.top_k == 0
    for key in ("temperature", "top_p", "repetition_penalty", "max_new_tokens"):
        assert generation[key] == getattr(lima, key), key
    model = transformers.AutoModelForCausalLM.from_pretrained(path / "hf")
    assert model.generation_config.eos_token_id == [2, PIECES] and model.generation_config.temperature == 0.7


@pytest.mark.parametrize("turns", [
    TRAIN[0], TRAIN[3], TRAIN[3][:3],
    ["Line one\nLine two\n\n  indented", "Tabs\tand  double  spaces; ümlaut, 日本, emoji 🙂."],
    ["What is 12345 plus 678?", "It is 13023.", "Why?", "Because  I  added\nthem."],
])
def test_chat_template_gives_limas_training_ids(exported, turns):
    path, tokenizer = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(path / "hf")
    assert template_ids(hf_tok, turns) == encode(Conversation(tuple(turns)), tokenizer)[0].tolist()
    if len(turns) % 2:  # a prompt: the model answers after the user's EOT; no assistant header to add
        assert template_ids(hf_tok, turns, add_generation_prompt=True) == prompt_ids(turns, tokenizer)


def test_chat_template_refuses_system_and_non_alternating_roles(exported):
    path, _ = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(path / "hf")
    with pytest.raises(Exception, match="no system role"):
        hf_tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    with pytest.raises(Exception, match="alternate"):
        hf_tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi"}])


@pytest.mark.parametrize("turns", [TRAIN[0][:1], TRAIN[3][:3]], ids=["single_turn", "multi_turn"])
def test_generate_answers_as_sample_py_and_stops_at_eot(exported, turns):
    path, tokenizer = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(path / "hf").eval()
    prompt = template_ids(hf_tok, turns, add_generation_prompt=True)
    with torch.no_grad():  # the exported generation config supplies the stop ids
        out = model.generate(torch.tensor([prompt]), do_sample=False, repetition_penalty=1.0,
                             max_new_tokens=MAX_NEW, pad_token_id=2)[0, len(prompt):].tolist()
    assert out[-1] == PIECES and PIECES not in out[:-1] and len(out) < MAX_NEW  # stopped at EOT by itself
    hf_answer = hf_tok.decode(out, skip_special_tokens=True)
    trained = next(t for t in TRAIN if t[:len(turns)] == turns)[len(turns)]
    assert hf_answer == trained  # what it was trained to answer

    answer, count = sample_cli(path / "ckpt", turns[-1], turns=turns[:-1], fmt="lima", max_new=MAX_NEW)
    assert (answer, count) == (hf_answer, len(out) - 1)


def test_base_model_export_has_no_chat_template(tmp_path):
    proto = train_tokenizer(PIECES, byte_fallback=True)
    cfg = dataclasses.replace(CFG, vocab_size=PIECES)
    params = jax.device_get(init_params(cfg, jax.random.key(1)))
    meta = model_store.CheckpointMeta(model=cfg, tokenizer=SentencePieceTokenizer(proto).to_record())
    model_store.save_params(tmp_path / "ckpt", params, meta)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.chat_template is None and len(hf_tok) == PIECES
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text()) == {"bos_token_id": 1,
                                                                                     "eos_token_id": 2}


def test_export_refuses_a_tokenizer_that_is_not_the_checkpoints(exported, tmp_path):
    path, _ = exported
    (tmp_path / "other.model").write_bytes(train_tokenizer(350, byte_fallback=True))
    with pytest.raises(ConversionError, match="EOT id is 400 but its tokenizer has 350 pieces"):
        export_hf(path / "ckpt", tmp_path / "hf", tokenizer=tmp_path / "other.model")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.tmp-export").exists()


def test_checkpoint_without_recorded_eot_id_exports_as_a_chat_model(tmp_path):
    """Written before eot_id was recorded: one row more than the tokenizer's pieces means EOT."""
    proto = train_tokenizer(PIECES, byte_fallback=True)
    params = jax.device_get(init_params(CFG, jax.random.key(2)))
    meta = model_store.CheckpointMeta(model=CFG, tokenizer=SentencePieceTokenizer(proto).to_record())
    model_store.save_params(tmp_path / "ckpt", params, meta)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == [2, PIECES]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.chat_template is not None and hf_tok.convert_tokens_to_ids(EOT_TOKEN) == PIECES


def test_a_normalizing_tokenizer_is_warned_about(caplog):
    """The demo tokenizer (nmt_nfkc, collapsed spaces) normalizes; transformers would not."""
    from lima_jax.convert.tokenizer_files import hf_tokenizer_files
    from lima_jax.data.demo import DEMO_PIECES, build_demo_tokenizer
    from lima_jax.data.tokenizer import SentencePieceTokenizer

    with open(build_demo_tokenizer(), "rb") as f:
        proto = f.read()
    with caplog.at_level("WARNING"):
        files = hf_tokenizer_files(SentencePieceTokenizer(proto), DEMO_PIECES, DEMO_PIECES + 1, 512)
    assert "normalizer nmt_nfkc, remove_extra_whitespaces" in caplog.text and "chat_template" in json.loads(
        files["tokenizer_config.json"])
