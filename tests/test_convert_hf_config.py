"""Hugging Face configs as transformers writes them now (5.x: `rope_parameters`) and wrote them
before (top-level `rope_theta`, `rope_scaling`), RoPE scaling (llama3, linear), the families'
switches (tied embeddings, Qwen2 biases, Qwen3 q/k norms and head_dim, Mistral's window);
anything the model does not implement is refused with the file and the field named."""

import dataclasses
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


@pytest.mark.parametrize("fields, rope", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
     {"rope_type": "llama3", "rope_factor": 8.0, "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0,
      "rope_original_max_len": 8192, "rope_theta": 500000.0}),  # transformers 5
    ({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
     {"rope_type": "llama3", "rope_factor": 32.0, "rope_original_max_len": 8192}),  # transformers 4 (Llama 3.2)
    ({"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
     {"rope_type": "linear", "rope_factor": 2.0}),  # the oldest spelling
])
def test_rope_scaling_old_and_new(fields, rope):
    arch = read_hf_arch({**BASE, **fields}, WHERE).fields
    assert {k: arch[k] for k in rope} == rope


@pytest.mark.parametrize("model_type, fields, switches", [
    ("llama", {"tie_word_embeddings": True}, {"tied_embeddings": True, "qkv_bias": False, "qk_norm": False}),
    ("mistral", {"sliding_window": None}, {"tied_embeddings": False, "qkv_bias": False, "qk_norm": False}),
    ("qwen2", {"tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 131072},
     {"tied_embeddings": True, "qkv_bias": True, "qk_norm": False}),
    ("qwen3", {"head_dim": 32}, {"head_dim": 32, "qkv_bias": False, "qk_norm": True}),
])
def test_families_set_their_switches(model_type, fields, switches):
    arch = read_hf_arch({**BASE, "model_type": model_type, **fields}, WHERE)
    assert {k: arch.fields[k] for k in switches} == switches
    assert arch.sliding_window is None


def test_sliding_window_is_reported_where_it_applies():
    assert read_hf_arch({**BASE, "model_type": "mistral", "sliding_window": 4096}, WHERE).sliding_window == 4096
    qwen = {**BASE, "model_type": "qwen2", "sliding_window": 4096}
    assert read_hf_arch({**qwen, "use_sliding_window": True}, WHERE).sliding_window == 4096
    assert read_hf_arch({**qwen, "layer_types": ["full_attention", "sliding_attention"]}, WHERE).sliding_window == 4096


@pytest.mark.parametrize("fields, message", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, r"rope_scaling\.rope_type='dynamic'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, r"rope_parameters\.rope_type='yarn'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, r"rope_type='llama3' lacks 'low_freq_factor'"),
    ({"rope_theta": 10000.0, "rope_parameters": {"rope_theta": 500000.0}}, "disagree"),
    ({"attention_bias": True}, r"attention_bias=True; the model has biases on q, k and v only"),
    ({"model_type": "qwen3", "attention_bias": True}, r"attention_bias=True"),
    ({"mlp_bias": True}, r"mlp_bias=True"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
    ({"model_type": "gemma"}, r"model_type='gemma'; the converter reads \['llama', 'mistral', 'qwen2', 'qwen3'\]"),
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


def test_meta_scaled_rope_is_refused(tmp_path):
    src = write_meta(hf_model(MHA, seed=1), MHA, tmp_path / "meta", 1)
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**params, "use_scaled_rope": True}))
    with pytest.raises(ConversionError, match=r"params\.json: use_scaled_rope=True.*--source hf"):
        convert_to_orbax("meta", src, tmp_path / "ckpt")


def test_tied_embeddings_stay_one_matrix(tmp_path):
    """An old save that still holds the tied copy as lm_head.weight converts to one embedding."""
    cfg = ModelConfig(**{**MHA.__dict__, "vocab_size": 248, "tied_embeddings": True})
    model = hf_model(dataclasses.replace(cfg, tied_embeddings=False), seed=5)
    tied = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**model.config.to_dict(),
                                                                     "tie_word_embeddings": True})).eval()
    tied.load_state_dict(model.state_dict(), strict=False)
    tied.tie_weights()
    tied.save_pretrained(tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "hf" / "model.safetensors")
    assert "lm_head.weight" not in state  # transformers writes one tensor for both
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}, tmp_path / "hf" / "model.safetensors",
              metadata={"format": "pt"})
    convert_to_orbax("hf", tmp_path / "hf", tmp_path / "ckpt", vocab_multiple=cfg.vocab_multiple)
    params = restore(tmp_path / "ckpt", cfg)
    assert "lm_head" not in params
    np.testing.assert_allclose(our_logits(cfg, params, TOKENS), hf_logits(tied, TOKENS), atol=1e-4, rtol=0)


def test_the_source_is_told_by_the_folders_files(tmp_path):
    """convert_checkpoint.py without --source: config.json = Hugging Face, params.json = Meta."""
    from lima_jax.convert.sources import detect_source

    for name, file in (("hf", "config.json"), ("meta", "params.json")):
        (tmp_path / name).mkdir()
        (tmp_path / name / file).write_text("{}")
        assert detect_source(tmp_path / name) == name
    with pytest.raises(ConversionError, match="neither config.json .Hugging Face. nor params.json"):
        detect_source(tmp_path)
