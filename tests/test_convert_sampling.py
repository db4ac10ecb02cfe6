"""Released weights, converted without --add_eot, sampled through `launch/sample.py --format raw`
give exactly transformers' greedy tokens, with the tokenizer that travelled with the weights
(or the same one given with --tokenizer); a tokenizer that does not fit is refused.

References are transformers' `generate` on the model it saved (HF folders) or on the model the
Meta folder was split from, and SentencePiece itself for the prompt's ids."""

import json

import numpy as np
import pytest
import sentencepiece as spm
import torch

from lima_jax import model_store
from lima_jax.convert import convert_to_orbax
from lima_jax.data.tokenizer import SentencePieceTokenizer
from lima_jax.model import ModelConfig
from tests.convert_fixtures import (
    CONVERT_GQA as GQA,
    CONVERT_MHA as MHA,
    MAX_NEW,
    sample_cli,
    stored_proto,
    train_tokenizer,
    write_meta,
)
from tests.references import hf_model

PROMPTS = ("What is 12 plus 7?", "Give me one tip about sleep.")


def hf_greedy(model, sp: spm.SentencePieceProcessor, prompt: str, max_new: int = MAX_NEW) -> list[int]:
    """transformers' greedy continuation of BOS + the prompt, up to (not including) EOS."""
    ids = [sp.bos_id()] + sp.encode(prompt)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new, repetition_penalty=1.0,
                             eos_token_id=sp.eos_id(), pad_token_id=sp.eos_id())[0, len(ids):].tolist()
    return out[:out.index(sp.eos_id())] if sp.eos_id() in out else out


def hf_folder(model, directory, proto: bytes):
    model.save_pretrained(directory)
    (directory / "tokenizer.model").write_bytes(proto)
    return directory


def meta_folder(model, cfg, directory, proto: bytes):
    """Meta's layout: the tokenizer beside the size folder (llama/tokenizer.model, llama/7B/)."""
    src = write_meta(model, cfg, directory / "7B", 2)
    (directory / "tokenizer.model").write_bytes(proto)
    return src


CASES = {  # name: (config, source, prompt)
    "hf_gqa_theta500k": (GQA, "hf", PROMPTS[0]),
    "hf_llama1_mha": (MHA, "hf", PROMPTS[1]),
    "meta_two_shards": (MHA, "meta", PROMPTS[0]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_base_model_samples_transformers_greedy_tokens(tmp_path, case):
    cfg, source, prompt = CASES[case]
    proto = train_tokenizer(cfg.vocab_size)
    model = hf_model(cfg, seed=7)
    if source == "hf":
        src = hf_folder(model, tmp_path / "hf", proto)
        if cfg.rope_theta != 10000.0:  # transformers 5 keeps theta in rope_parameters only
            written = json.loads((src / "config.json").read_text())
            assert written["rope_parameters"]["rope_theta"] == cfg.rope_theta and "rope_theta" not in written
    else:
        src = meta_folder(model, cfg, tmp_path / "llama", proto)
        assert (src / "consolidated.01.pth").is_file() and not (src / "tokenizer.model").exists()
    report = convert_to_orbax(source, src, tmp_path / "ckpt")  # no --add_eot: a base model
    meta = model_store.read_meta(tmp_path / "ckpt")
    assert report["tokenizer"] and stored_proto(meta) == proto and meta.eot_id is None and meta.chat_format is None
    assert meta.model.rope_theta == cfg.rope_theta and meta.model.vocab_size == cfg.vocab_size

    sp = spm.SentencePieceProcessor(model_proto=proto)
    (tmp_path / "given.model").write_bytes(proto)
    expected = hf_greedy(model, sp, prompt)
    assert len(expected) > 3, "a continuation too short to compare"
    for extra in ((), ("--tokenizer", str(tmp_path / "given.model"))):
        answer, count = sample_cli(tmp_path / "ckpt", prompt, *extra)
        assert (answer, count) == (sp.decode(expected), len(expected)), (case, extra)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """A converted base model (MHA, 248 pieces) with its tokenizer stored."""
    path = tmp_path_factory.mktemp("base")
    proto = train_tokenizer(MHA.vocab_size)
    hf_folder(hf_model(MHA, seed=8), path / "hf", proto)
    convert_to_orbax("hf", path / "hf", path / "ckpt")
    return path


def test_lima_format_on_a_base_model_is_refused(base_ckpt):
    from lima_jax.sampling.sampler import load_sampler

    sampler, _ = load_sampler(str(base_ckpt / "ckpt"))
    assert sampler.prompt_ids("Hi", fmt="raw") == [1] + sampler.tokenizer.encode("Hi")
    with pytest.raises(ValueError, match=r"base model .*--format raw.*--add_eot"):
        sampler.prompt_ids("Hi", fmt="lima")


def test_tokenizer_that_does_not_fit_is_refused(base_ckpt, tmp_path):
    from lima_jax.sampling.sampler import load_sampler

    for pieces, message in ((256, r"256 pieces \(more than the model has rows\)"), (240, "240 pieces")):
        (tmp_path / f"{pieces}.model").write_bytes(train_tokenizer(pieces))
        with pytest.raises(ValueError, match=message + r".*base model needs 248.*--tokenizer"):
            load_sampler(str(base_ckpt / "ckpt"), tokenizer_path=str(tmp_path / f"{pieces}.model"))


def test_fine_tuned_checkpoint_needs_its_eot_to_be_the_piece_count(tmp_path):
    import jax

    from lima_jax.model import init_params
    from lima_jax.sampling.sampler import load_sampler

    cfg = ModelConfig(vocab_size=249, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64, vocab_multiple=8)
    params = jax.device_get(init_params(cfg, jax.random.key(0)))
    proto = train_tokenizer(248)
    meta = model_store.CheckpointMeta(model=cfg, eot_id=248, tokenizer=SentencePieceTokenizer(proto).to_record())
    model_store.save_params(tmp_path / "ok", params, meta)
    sampler, _ = load_sampler(str(tmp_path / "ok"))
    assert sampler.prompt_ids("Hi")[-1] == 248 and sampler.stop_ids == (2, 248)
    (tmp_path / "small.model").write_bytes(train_tokenizer(240))
    with pytest.raises(ValueError, match=r"240 pieces .*EOT id 248 needs 248 pieces"):
        load_sampler(str(tmp_path / "ok"), tokenizer_path=str(tmp_path / "small.model"))


def test_no_silent_demo_tokenizer(tmp_path):
    """A converted checkpoint that stores no tokenizer is refused; the demo tokenizer only for a
    checkpoint whose own training config says tokenizer_path "" (the tiny demo)."""
    import jax

    from lima_jax.config import base_config
    from lima_jax.data.demo import DEMO_PIECES
    from lima_jax.model import init_params
    from lima_jax.sampling.sampler import load_sampler

    cfg = ModelConfig(vocab_size=DEMO_PIECES + 1, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64,
                      vocab_multiple=8)
    params = jax.device_get(init_params(cfg, jax.random.key(0)))
    model_store.save_params(tmp_path / "converted", params, model_store.CheckpointMeta(model=cfg))
    with pytest.raises(ValueError, match="stores no tokenizer .*pass --tokenizer"):
        load_sampler(str(tmp_path / "converted"))
    config = base_config()
    config.model.update(cfg.__dict__)
    config.data.tokenizer_path = ""
    model_store.save_params(tmp_path / "demo", params, model_store.CheckpointMeta(
        model=cfg, eot_id=DEMO_PIECES, config=json.loads(config.to_json_best_effort())))
    sampler, _ = load_sampler(str(tmp_path / "demo"))
    assert sampler.tokenizer.num_pieces == DEMO_PIECES
    np.testing.assert_array_equal(sampler.prompt_ids("Hi")[-1], DEMO_PIECES)
