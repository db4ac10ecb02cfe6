"""Hugging Face configs as transformers writes them now (5.x: `rope_parameters`) and wrote them
before (top-level `rope_theta`, `rope_scaling`), `head_dim` and tied embeddings; anything the
model does not implement is refused with the file and the field named."""

import json

import numpy as np
import pytest
import transformers

from lima_jax import model_store
from lima_jax.convert import ConversionError, convert_to_orbax
from lima_jax.convert.hf_config import read_hf_arch
from lima_jax.model import ModelConfig
from tests.convert_fixtures import CONVERT_GQA as GQA, CONVERT_MHA as MHA, TOKENS, restore, write_meta
from tests.references import hf_logits, hf_model, our_logits

BASE = {"model_type": "llama", "vocab_size": 256, "hidden_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 256}
WHERE = "some/config.json"


@pytest.mark.parametrize("fields, theta", [
    ({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}, 500000.0),  # transformers 5
    ({"rope_theta": 500000.0, "rope_scaling": None}, 500000.0),  # transformers 4
    ({"rope_theta": 500000.0, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}, 500000.0),
    ({}, 10000.0),  # neither: transformers' default
])
def test_rope_theta_old_and_new(fields, theta):
    assert read_hf_arch({**BASE, **fields}, WHERE).fields["rope_theta"] == theta


@pytest.mark.parametrize("fields, message", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}},
     r"some/config\.json: rope_parameters\.rope_type='llama3'.*plain RoPE only"),
    ({"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
     r"some/config\.json: rope_scaling\.rope_type='linear'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, r"rope_scaling\.rope_type='dynamic'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, r"rope_parameters\.rope_type='yarn'"),
    ({"rope_theta": 10000.0, "rope_parameters": {"rope_theta": 500000.0}}, "disagree"),
    ({"head_dim": 32}, r"head_dim=32, but the model derives .* = 16"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
    ({"model_type": "mistral"}, r"model_type='mistral'"),
])
def test_what_the_model_does_not_implement_is_refused(fields, message):
    with pytest.raises(ConversionError, match=message):
        read_hf_arch({**BASE, **fields}, WHERE)


def test_theta_500000_from_rope_parameters_converts_with_500000(tmp_path):
    model = hf_model(GQA, seed=4)
    model.save_pretrained(tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["rope_parameters"] == {"rope_theta": 500000.0, "rope_type": "default"}
    convert_to_orbax("hf", tmp_path / "hf", tmp_path / "ckpt", vocab_multiple=GQA.vocab_multiple)
    assert model_store.read_meta(tmp_path / "ckpt").model.rope_theta == 500000.0
    params = restore(tmp_path / "ckpt", GQA)
    np.testing.assert_allclose(our_logits(GQA, params, TOKENS), hf_logits(model, TOKENS), atol=1e-4, rtol=0)


def test_llama3_rope_saved_by_transformers_is_refused(tmp_path):
    model = hf_model(GQA, seed=4)
    model.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 1024}
    model.save_pretrained(tmp_path / "hf")
    with pytest.raises(ConversionError, match=r"hf/config\.json: rope_parameters\.rope_type='llama3'"):
        convert_to_orbax("hf", tmp_path / "hf", tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_meta_scaled_rope_is_refused(tmp_path):
    src = write_meta(hf_model(MHA, seed=1), MHA, tmp_path / "meta", 1)
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**params, "use_scaled_rope": True}))
    with pytest.raises(ConversionError, match=r"params\.json: use_scaled_rope=True"):
        convert_to_orbax("meta", src, tmp_path / "ckpt")


def test_tied_embeddings_are_copied_into_lm_head(tmp_path):
    cfg = ModelConfig(**{**MHA.__dict__, "vocab_size": 248})
    model = hf_model(cfg, seed=5)
    tied = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**model.config.to_dict(),
                                                                     "tie_word_embeddings": True})).eval()
    tied.load_state_dict(model.state_dict(), strict=False)
    tied.tie_weights()
    tied.save_pretrained(tmp_path / "hf")
    from safetensors import safe_open

    with safe_open(tmp_path / "hf" / "model.safetensors", framework="np") as f:
        assert "lm_head.weight" not in set(f.keys())  # one tensor for both
    convert_to_orbax("hf", tmp_path / "hf", tmp_path / "ckpt", vocab_multiple=cfg.vocab_multiple)
    params = restore(tmp_path / "ckpt", cfg)
    np.testing.assert_array_equal(np.asarray(params["lm_head"]).T[:cfg.vocab_size],
                                  np.asarray(params["embed"])[:cfg.vocab_size])
    np.testing.assert_allclose(our_logits(cfg, params, TOKENS), hf_logits(tied, TOKENS), atol=1e-4, rtol=0)
