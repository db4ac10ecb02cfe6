"""Today's open model families against transformers 5: a random small Llama 3.1 (llama3 RoPE
scaling, a context longer than original_max_position_embeddings), Qwen2 (tied embeddings, q/k/v
biases), Qwen3 (q/k norms, head_dim != hidden / heads), Mistral (no sliding window) and a
linear RoPE scaling, each saved by `save_pretrained` as sharded safetensors, converted by
lima_jax, give transformers' logits and greedy tokens (KV-cache decode), and its `--to hf`
export loads in transformers with the same logits. Tied embeddings train as one matrix (the
embedding's gradient equals transformers'); what the model does not implement is refused."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lima_jax import model_store
from lima_jax.convert import ConversionError, convert_to_orbax, export_hf
from lima_jax.convert.hf_config import read_hf_arch
from lima_jax.convert.layout import params_from_hf
from lima_jax.model import ModelConfig, bind, lora as lora_lib, param_count
from lima_jax.sampling.decode import PROMPT_BUCKET, Decoder, Request
from lima_jax.sampling.decoding import SamplingSettings
from lima_jax.train.loss import lm_loss
from tests.convert_fixtures import restore

jax.config.update("jax_default_matmul_precision", "highest")

VOCAB, NEW = 200, 10
SHAPES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
FAMILIES = {  # name: (transformers model class, its config)
    "llama3_1": (transformers.LlamaForCausalLM, transformers.LlamaConfig(**SHAPES, rope_parameters=LLAMA3_ROPE)),
    "llama_linear": (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        **SHAPES, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    "qwen2_tied": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
        **SHAPES, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3_head_dim": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**SHAPES, head_dim=24)),
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig(**SHAPES, sliding_window=None)),
}
DECODED = ("llama3_1", "mistral", "qwen2_tied", "qwen3_head_dim")  # linear scaling: logits only (same code path)
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 80))  # longer than llama3's original 32 positions


def hf_family_model(name: str, seed: int = 0):
    """A random model of the family; norms and biases randomised too so their mapping shows."""
    cls, config = FAMILIES[name]
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "norm" in key:
                p.uniform_(0.5, 1.5)
            elif key.endswith(".bias"):
                p.normal_(0.0, 0.5)
    model.generation_config.eos_token_id = None  # greedy runs the full NEW tokens on both sides
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(name, transformers model, the converted checkpoint, its ModelConfig, restored params)."""
    path = tmp_path_factory.mktemp(request.param)
    model = hf_family_model(request.param)
    model.save_pretrained(path / "hf", max_shard_size="40KB")  # sharded, with an index
    assert (path / "hf" / "model.safetensors.index.json").is_file()
    convert_to_orbax("hf", path / "hf", path / "ckpt", vocab_multiple=16)
    cfg = model_store.read_meta(path / "ckpt").model
    return request.param, model, path, cfg, restore(path / "ckpt", cfg)


def test_converted_logits_equal_transformers(family):
    name, model, _, cfg, params = family
    assert (cfg.rope_type, cfg.tied_embeddings, cfg.qkv_bias, cfg.qk_norm, cfg.head_dim) == {
        "llama3_1": ("llama3", False, False, False, 16), "llama_linear": ("linear", False, False, False, 16),
        "qwen2_tied": ("default", True, True, False, 16),
        "qwen3_head_dim": ("default", False, False, True, 24), "mistral": ("default", False, False, False, 16)}[name]
    assert "lm_head" not in params if cfg.tied_embeddings else "lm_head" in params
    ours = np.asarray(bind(cfg, params)(jnp.asarray(TOKENS)))[..., :cfg.vocab_size]
    np.testing.assert_allclose(ours, hf_logits(model, TOKENS), atol=2e-4, rtol=0)
    assert param_count(cfg) == model.num_parameters()


def test_greedy_kv_cache_decode_equals_transformers(family):
    name, model, _, cfg, params = family
    if name not in DECODED:
        pytest.skip("logits only")
    prompts = TOKENS[:, :40]  # past llama3's original context while decoding
    with torch.no_grad():
        expected = model.generate(torch.tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                                  do_sample=False, max_new_tokens=NEW, pad_token_id=0)[:, prompts.shape[1]:].numpy()
    settings = SamplingSettings(greedy=True, repetition_penalty=1.0, max_new_tokens=NEW)
    decoder = Decoder(cfg, params, None, stop_ids=(), slots=len(prompts), length=PROMPT_BUCKET + NEW)  # the one decode step
    decoder.admit([(i, Request.of(p.tolist(), settings, 0, i)) for i, p in enumerate(prompts)])
    tokens = {i: [] for i in range(len(prompts))}
    while decoder.active:
        for _, index, token, _ in decoder.step()[1]:
            tokens[index].append(token)
    np.testing.assert_array_equal(np.array([tokens[i] for i in range(len(prompts))]), expected)


def test_export_loads_in_transformers_with_equal_logits(family):
    name, model, path, cfg, _ = family
    if name not in DECODED:
        pytest.skip("logits only")
    export_hf(path / "ckpt", path / "export", dtype="float32")
    written = json.loads((path / "export" / "config.json").read_text())
    assert written["model_type"] == {"qwen2_tied": "qwen2", "qwen3_head_dim": "qwen3"}.get(name, "llama")
    assert written["tie_word_embeddings"] == cfg.tied_embeddings
    assert written["rope_parameters"]["rope_type"] == cfg.rope_type
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path / "export", dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_logits(loaded, TOKENS), hf_logits(model, TOKENS), atol=2e-4, rtol=0)


def test_tied_embedding_gradient_equals_transformers():
    """The embedding of a tied model receives the head's gradient and the lookup's, as torch's."""
    model = hf_family_model("qwen2_tied", seed=3)
    ids = TOKENS[:, :33]
    loss = model(torch.tensor(ids), labels=torch.tensor(ids)).loss
    loss.backward()
    expected = model.model.embed_tokens.weight.grad.numpy()
    cfg = ModelConfig(**read_hf_arch(model.config.to_dict(), "qwen2").fields, vocab_multiple=16, logits_chunks=4,
                      remat_policy="none")
    params = params_from_hf({k: v.detach().numpy() for k, v in model.state_dict().items()}, cfg)
    batch = dict(tokens=ids[:, :-1], targets=ids[:, 1:], positions=np.broadcast_to(np.arange(32), (2, 32)),
                 segment_ids=np.ones((2, 32), np.int32), loss_weights=np.ones((2, 32), np.float32))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    ours, grads = jax.jit(jax.value_and_grad(lambda p: lm_loss(cfg, p, batch)[0]))(params)
    np.testing.assert_allclose(float(ours), loss.item(), rtol=1e-5)
    assert "lm_head" not in grads
    np.testing.assert_allclose(np.asarray(grads["embed"])[:VOCAB], expected, atol=1e-5, rtol=0)


def test_lora_on_a_tied_head_is_refused():
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64, tied_embeddings=True)
    lora_lib.adapter_shapes(cfg, lora_lib.LoraConfig(rank=2, alpha=4.0))  # the layer matrices are fine
    with pytest.raises(ValueError, match=r"config\.lora\.targets includes 'head'.*tied_embeddings"):
        lora_lib.adapter_shapes(cfg, lora_lib.LoraConfig(rank=2, alpha=4.0, targets=lora_lib.TARGET_NAMES))


@pytest.mark.parametrize("kind, message", [
    ("yarn", r"rope_parameters\.rope_type='yarn'; the model implements RoPE types \['default', 'linear', 'llama3'\]"),
    ("window", r"sliding_window=16 is shorter than the context \(model\.max_seq_len=2048\)"),
])
def test_what_the_model_does_not_implement_is_refused(tmp_path, kind, message):
    if kind == "yarn":
        config = transformers.MistralConfig(**SHAPES, sliding_window=None, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64})
    else:
        config = transformers.MistralConfig(**SHAPES, sliding_window=16)
    transformers.MistralForCausalLM(config).save_pretrained(tmp_path / "hf")
    with pytest.raises(ConversionError, match=message):
        convert_to_orbax("hf", tmp_path / "hf", tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_peft_adapters_land_on_the_right_modules(family):
    """Adapters exported for PEFT (`--to peft`'s names) on the family's transformers model give
    our adapted logits: the q/k/v biases and q/k norms sit after the adapted projections."""
    import peft

    from lima_jax.convert.lora_export import adapter_config, peft_tensors

    name, model, _, cfg, params = family
    if name not in ("qwen2_tied", "qwen3_head_dim"):
        pytest.skip("the layer modules are LLaMA's")
    lora = lora_lib.LoraConfig(rank=2, alpha=4.0, targets=("q", "k", "v", "o", "down"))
    rng = np.random.default_rng(1)
    adapters = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), jnp.float32),
                            lora_lib.abstract_adapters(cfg, lora))
    settings = adapter_config(lora)
    adapted = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(  # get_peft_model changes its model
        r=settings["r"], lora_alpha=settings["lora_alpha"], target_modules=settings["target_modules"]))
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in peft_tensors(
        jax.device_get(adapters), lora, cfg.vocab_size).items()}
    assert not peft.set_peft_model_state_dict(adapted, state).unexpected_keys
    base = jax.device_get(params)
    ours = np.asarray(bind(cfg, lora_lib.attach(base, adapters, lora))(jnp.asarray(TOKENS)))[..., :cfg.vocab_size]
    expected = hf_logits(adapted.eval(), TOKENS)
    assert np.abs(expected - hf_logits(model, TOKENS)).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(ours, expected, atol=2e-4, rtol=0)


def test_training_takes_the_rope_scaling_of_its_checkpoint(family):
    from lima_jax.config import adopt_checkpoint_rope, base_config

    name, _, path, cfg, _ = family
    if name != "llama3_1":
        pytest.skip("one scaled checkpoint is enough")
    c = base_config()
    c.init_checkpoint = str(path / "ckpt")
    adopt_checkpoint_rope(c)  # the size file leaves the scaling at default: the checkpoint's is taken
    assert (c.model.rope_type, c.model.rope_factor, c.model.rope_original_max_len) == ("llama3", 8.0, 32)
    c.model.update(rope_type="linear", rope_factor=8.0)
    with pytest.raises(ValueError, match=r"config\.model\.rope_type='linear' but config\.init_checkpoint=.* "
                                         r"was converted with rope_type='llama3'"):
        adopt_checkpoint_rope(c)


def test_weight_decay_skips_biases_and_norms():
    from lima_jax.model import abstract_params
    from lima_jax.train.optimizer import decay_mask

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64, qkv_bias=True,
                      qk_norm=True, tied_embeddings=True)
    attn = decay_mask(abstract_params(cfg))["layers"]["attn"]
    assert attn["wq"] and not attn["q_bias"] and not attn["v_bias"] and not attn["q_norm"]["scale"]


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},  # Llama 3.1 8B / 70B
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},  # Llama 3.2 1B / 3B
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
], ids=["llama3.1", "llama3.2", "linear"])
def test_inverse_frequencies_of_the_real_sizes_equal_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from lima_jax.model.layers import rope_inv_freq

    config = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=rope)
    expected, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")
    cfg = ModelConfig(**read_hf_arch(config.to_dict(), "config.json").fields)
    np.testing.assert_allclose(rope_inv_freq(cfg), expected.numpy(), rtol=1e-6, atol=0)
