"""The model against Hugging Face transformers (independent reference), packing, dropout, sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lima_jax.convert.layout import params_from_hf
from lima_jax.model import ModelConfig, bind, param_count
from lima_jax.train.loss import lm_loss
from tests.references import MODEL_GQA as GQA, MODEL_MHA as MHA, hf_model, hf_params

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.mark.parametrize("seq", [37, 64], ids=["full-attention", "causal-blocks"])
@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["multi-head", "grouped-query"])
def test_logits_match_transformers(cfg, seq):
    model = hf_model(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, seq))
    with torch.no_grad():
        expected = model(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(bind(cfg, hf_params(model, cfg))(jnp.asarray(tokens)))
    assert ours.shape[-1] == cfg.padded_vocab_size
    np.testing.assert_array_less(ours[..., cfg.vocab_size:], -1e30)  # padded rows can never win
    np.testing.assert_allclose(ours[..., : cfg.vocab_size], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("transposed_wgrad", [False, True], ids=["autodiff-matmuls", "transposed-wgrad"])
def test_gradients_match_transformers(transposed_wgrad):
    """The train loss's gradient for every weight against torch autograd through the HF model:
    covers the chunked loss's own VJP, the causal blocks and `model.transposed_wgrad`."""
    cfg = ModelConfig(**{**GQA.__dict__, "logits_chunks": 2, "transposed_wgrad": transposed_wgrad})
    model = hf_model(cfg)
    seq = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 65))
    tokens, targets = seq[:, :-1], seq[:, 1:]
    logits = model(torch.tensor(tokens)).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), torch.tensor(targets).reshape(-1)).backward()
    expected = params_from_hf({k: p.grad.numpy() for k, p in model.named_parameters()}, cfg)

    batch = dict(tokens=tokens, targets=targets, positions=np.broadcast_to(np.arange(64), tokens.shape),
                 segment_ids=np.ones_like(tokens), loss_weights=np.ones(tokens.shape, np.float32))
    loss = lambda p: lm_loss(cfg, p, {k: jnp.asarray(v) for k, v in batch.items()})[0]  # noqa: E731
    ours = jax.jit(jax.grad(loss))(hf_params(model, cfg))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4), ours, expected)


def test_packed_rows_equal_separate_examples():
    cfg = GQA
    params = hf_params(hf_model(cfg), cfg)
    model = bind(cfg, params)
    rng = np.random.default_rng(1)
    lengths = [7, 12, 5, 30]
    examples = [rng.integers(0, cfg.vocab_size, n) for n in lengths]
    pad = 10  # 64 in all: the causal block path runs, segments cross its block edges
    tokens = np.concatenate(examples + [np.zeros(pad, int)])[None]
    segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad, int)])[None]
    positions = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(pad, int)])[None]
    packed = np.asarray(model.logits(model.hidden(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segment_ids))[0]))
    start = 0
    for example in examples:
        alone = np.asarray(model(jnp.asarray(example)[None]))
        np.testing.assert_allclose(packed[0, start:start + len(example)], alone[0], atol=1e-5)
        start += len(example)


def test_residual_dropout_rises_from_zero_and_is_off_without_key():
    params_cfg = dict(vocab_size=64, dim=32, n_heads=2, n_kv_heads=2, ffn_dim=64)
    tokens = jnp.arange(16)[None] % 64
    key = jax.random.key(3)
    one_layer = ModelConfig(n_layers=1, residual_dropout=0.5, **params_cfg)  # only layer: rate 0
    model = bind(one_layer, hf_params(hf_model(one_layer), one_layer))
    np.testing.assert_array_equal(model(tokens, dropout_key=key), model(tokens))
    two_layers = ModelConfig(n_layers=2, residual_dropout=0.5, **params_cfg)
    model = bind(two_layers, hf_params(hf_model(two_layers), two_layers))
    assert not np.allclose(model(tokens, dropout_key=key), model(tokens))
    np.testing.assert_array_equal(model(tokens, dropout_key=key), model(tokens, dropout_key=key))


def test_unrolled_layers_equal_scanned():
    cfg = MHA
    params = hf_params(hf_model(cfg), cfg)
    tokens = jnp.arange(20)[None] % cfg.vocab_size
    unrolled = ModelConfig(**{**cfg.__dict__, "scan_layers": False, "remat_policy": "dots"})
    np.testing.assert_allclose(bind(unrolled, params)(tokens), bind(cfg, params)(tokens), atol=1e-5)


@pytest.mark.parametrize("name,published", [("llama7b", 6.7e9), ("llama13b", 13.0e9), ("llama33b", 32.5e9),
                                            ("llama65b", 65.2e9)])
def test_param_count_matches_published(name, published):
    import importlib.util

    from lima_jax.config import model_config
    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = model_config(module.get_config())
    base = ModelConfig(**{**cfg.__dict__, "vocab_size": 32000})  # the published count is before LIMA's EOT
    assert abs(param_count(base) - published) / published < 0.006


def test_backend_tuning_fills_only_the_speed_settings_left_unset():
    """None means the backend's choice (lima_jax.backend); explicit values are overrides that stay."""
    assert GQA.for_platform("cpu").transposed_wgrad is True and GQA.for_platform("tpu").transposed_wgrad is False
    assert GQA.for_platform("cpu").kv_position_major is False and GQA.for_platform("tpu").kv_position_major is True
    assert GQA.for_platform("cuda") == GQA.for_platform("gpu")
    explicit = ModelConfig(**{**GQA.__dict__, "transposed_wgrad": False, "causal_blocks": 2, "kv_position_major": True})
    assert explicit.for_platform("cpu") == explicit
    with pytest.raises(ValueError, match="no tuning"):
        GQA.for_platform("metal")


def test_tuning_follows_the_platform_of_the_mesh_traced_for():
    """The AOT fit check traces TPU programs on a CPU host, under a mesh of TPU devices: TPU's
    tuning. (An abstract TPU mesh here: libtpu serves one process at a time, and test_aot uses it.)"""
    from lima_jax import backend

    with jax.set_mesh(jax.make_mesh((jax.device_count(),), ("fsdp",))):
        here = jax.sharding.get_abstract_mesh()
        assert backend.target_platform() == jax.default_backend()
    tpu = type(here.abstract_device)(device_kind="TPU v4", num_cores=2, platform="tpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(here.axis_sizes, here.axis_names,
                                                                  abstract_device=tpu)):
        assert backend.tuning() == backend.TUNINGS["tpu"]
    assert backend.tuning() == backend.tuning(jax.default_backend())
