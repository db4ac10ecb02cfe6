"""LoRA against PEFT (the independent reference): the same adapter weights on the transformers
model give the same logits and adapter gradients; the train program differentiates and
optimizes the adapters only, over a frozen base; an int8 base is its per-channel dequantization."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from lima_jax.convert.lora_export import adapter_config, peft_tensors
from lima_jax.model import abstract_params, bind, init_params, lora as lora_lib, param_logical_axes
from lima_jax.train.loss import lm_loss
from tests.references import MODEL_GQA, MODEL_MHA, hf_model, hf_params

LORA_ALL = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=lora_lib.TARGET_NAMES)  # the head too
LORA_QV = lora_lib.LoraConfig(rank=3, alpha=5.0, targets=("q", "v", "down"))


def random_adapters(cfg, lora, seed=0) -> dict:
    """Adapters with b != 0 (at init b = 0 and the model would be the base)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), jnp.float32),
                        lora_lib.abstract_adapters(cfg, lora))


def peft_model(hf, cfg, lora, adapters):
    config = peft.LoraConfig(**{k: v for k, v in adapter_config(lora).items()
                                if k in ("r", "lora_alpha", "lora_dropout", "target_modules", "bias")})
    model = peft.get_peft_model(hf, config)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in peft_tensors(jax.device_get(adapters), lora, cfg.vocab_size).items()}
    result = peft.set_peft_model_state_dict(model, state)
    assert not result.unexpected_keys, result.unexpected_keys
    return model


@pytest.mark.parametrize("cfg,lora", [(MODEL_GQA, LORA_ALL), (MODEL_MHA, LORA_QV)], ids=["gqa-all", "mha-q-v-down"])
def test_logits_match_peft(cfg, lora):
    hf = hf_model(cfg)
    base = hf_params(hf, cfg)
    adapters = random_adapters(cfg, lora)
    model = peft_model(hf, cfg, lora, adapters).eval()
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 29))
    with torch.no_grad():
        expected = model(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(bind(cfg, lora_lib.attach(base, adapters, lora))(jnp.asarray(tokens)))[..., :cfg.vocab_size]
    plain = np.asarray(bind(cfg, base)(jnp.asarray(tokens)))[..., :cfg.vocab_size]
    assert np.abs(expected - plain).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
    merged = lora_lib.merged(base, adapters, lora, jnp.float32)
    np.testing.assert_allclose(np.asarray(bind(cfg, merged)(jnp.asarray(tokens)))[..., :cfg.vocab_size], expected,
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("transposed_wgrad", [False, True], ids=["autodiff-matmuls", "transposed-wgrad"])
def test_adapter_gradients_match_peft(transposed_wgrad):
    cfg = dataclasses.replace(MODEL_GQA, logits_chunks=2, transposed_wgrad=transposed_wgrad)
    lora = LORA_ALL
    hf = hf_model(cfg)
    base = hf_params(hf, cfg)
    adapters = random_adapters(cfg, lora, seed=3)
    model = peft_model(hf, cfg, lora, adapters)
    seq = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 65))
    tokens, targets = seq[:, :-1], seq[:, 1:]
    logits = model(torch.tensor(tokens)).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), torch.tensor(targets).reshape(-1)).backward()
    expected = {n.replace(".default", ""): p.grad.numpy() for n, p in model.named_parameters() if p.requires_grad}
    assert len(expected) == 2 * (len(lora.targets) - 1) * cfg.n_layers + 2  # PEFT trains exactly the adapters
    assert "base_model.model.lm_head.lora_B.weight" in expected  # the head's among them

    batch = dict(tokens=tokens, targets=targets, positions=np.broadcast_to(np.arange(64), tokens.shape),
                 segment_ids=np.ones_like(tokens), loss_weights=np.ones(tokens.shape, np.float32))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    grads = jax.jit(jax.grad(lambda ad: lm_loss(cfg, lora_lib.attach(base, ad, lora), batch)[0]))(adapters)
    ours = peft_tensors(jax.device_get(grads), lora, cfg.vocab_size)
    assert sorted(ours) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(ours[name], expected[name], atol=2e-6, rtol=1e-4, err_msg=name)


def test_int8_base_is_its_per_channel_dequantization():
    cfg = MODEL_GQA
    params = jax.device_get(init_params(cfg, jax.random.key(0)))
    lora = dataclasses.replace(LORA_ALL, base_dtype="int8")
    base = lora_lib.frozen_base(params, lora)
    q = base["layers"]["attn"]["wo"]  # [layers, heads, head_dim, dim]: two input dims
    assert q.values.dtype == jnp.int8 and q.scale.shape == (cfg.n_layers, 1, 1, cfg.dim)
    w = params["layers"]["attn"]["wo"]
    assert np.all(np.abs(np.asarray(q.astype(jnp.float32)) - w) <= np.asarray(q.scale) / 2 + 1e-7)  # round to nearest
    adapters = random_adapters(cfg, lora)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)))
    dequantized = jax.tree.map(lambda x: x.astype(jnp.float32), base,
                               is_leaf=lambda x: isinstance(x, lora_lib.QuantizedWeight))
    np.testing.assert_allclose(bind(cfg, lora_lib.attach(base, adapters, lora))(tokens),
                               bind(cfg, lora_lib.attach(dequantized, adapters, lora))(tokens), atol=1e-5, rtol=1e-5)
    axes = lora_lib.base_logical_axes(cfg, lora)["layers"]["attn"]["wo"]
    assert axes.scale == ("layers", None, None, "embed")


def test_dropout_only_with_a_key():
    cfg = MODEL_MHA
    lora = dataclasses.replace(LORA_ALL, dropout=0.5)
    base, adapters = hf_params(hf_model(cfg), cfg), random_adapters(cfg, lora)
    batch = dict(tokens=jnp.zeros((2, 8), jnp.int32) + 5, targets=jnp.ones((2, 8), jnp.int32),
                 positions=jnp.broadcast_to(jnp.arange(8), (2, 8)), segment_ids=jnp.ones((2, 8), jnp.int32),
                 loss_weights=jnp.ones((2, 8)))

    def loss(key):
        return float(lm_loss(cfg, lora_lib.attach(base, adapters, lora, key), batch)[0])

    no_dropout = float(lm_loss(cfg, lora_lib.attach(base, adapters, dataclasses.replace(lora, dropout=0.0)), batch)[0])
    assert loss(None) == no_dropout
    assert loss(jax.random.key(0)) != no_dropout and loss(jax.random.key(0)) == loss(jax.random.key(0))


def test_config_errors_name_the_key():
    from lima_jax.config import base_config, validate_values

    for key, value, message in [("rank", -1, "config.lora.rank"), ("targets", ("q", "w9"), "config.lora.targets"),
                                ("base_dtype", "fp8", "config.lora.base_dtype"), ("alpha", 0.0, "config.lora.alpha"),
                                ("dropout", 1.0, "config.lora.dropout")]:
        c = base_config()
        c.lora.update(rank=8)
        c.lora[key] = value
        with pytest.raises(ValueError, match=message):
            validate_values(c)


# ---- the train program ----

def lora_program(rank: int, base_dtype: str = "bfloat16", steps: int = 10):
    from lima_jax.config import run_config
    from lima_jax.sharding import make_mesh
    from lima_jax.train.program import build_program
    from tests.tiny_run import tiny_config

    config = tiny_config()
    config.lora.update(rank=rank, base_dtype=base_dtype)
    run = run_config(config)
    return config, run.model, build_program(run, make_mesh(run.mesh), total_steps=steps)


def test_rank_zero_is_full_fine_tuning():
    from lima_jax.config import run_identity

    config, cfg, program = lora_program(0)
    assert program.lora is None and program.abstract_state.base is None
    assert jax.tree.structure(program.abstract_state.params) == jax.tree.structure(abstract_params(cfg))
    assert "lora" not in run_identity(config, "t", "d")  # full fine-tuning resumes as before


@pytest.mark.parametrize("base_dtype", ["bfloat16", "int8"])
def test_train_step_updates_only_the_adapters(base_dtype):
    from lima_jax.sharding import logical_to_spec
    from lima_jax.train.step import TrainState

    config, cfg, program = lora_program(8, base_dtype)
    state_abstract, shardings = program.abstract_state, program.state_shardings
    adapter_count = sum(x.size for x in jax.tree.leaves(state_abstract.params))
    moments = [x for x in jax.tree.leaves(state_abstract.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * adapter_count  # AdamW's two moments, of the adapters only
    base_leaves = jax.tree.leaves(state_abstract.base)
    assert {x.dtype for x in base_leaves} == ({jnp.dtype("bfloat16")} if base_dtype == "bfloat16"
                                              else {jnp.dtype("bfloat16"), jnp.dtype("int8"), jnp.dtype("float32")})
    # adapters shard by the base's rules: a [layers, embed, rank] over fsdp like wq's embed axis
    assert shardings.params["layers"]["attn"]["wq"]["a"].spec == logical_to_spec(("layers", "embed", "lora_rank"))
    assert tuple(param_logical_axes(cfg)["layers"]["attn"]["wq"]) == ("layers", "embed", "heads", "head_dim")
    # and none sits whole on a device (b of wq has no embed axis: its head_dim goes over fsdp),
    # nor do their AdamW moments
    devices = program.mesh.size
    for tree, shards in ((state_abstract.params, shardings.params), (state_abstract.opt_state, shardings.opt_state)):
        for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shards)):
            if x.ndim:
                assert np.prod(s.shard_shape(x.shape)) * devices == x.size, (x.shape, s.spec)

    params = jax.device_get(init_params(cfg, jax.random.key(0)))
    base = jax.device_put(lora_lib.frozen_base(params, program.lora), shardings.base)
    adapters = jax.device_put(lora_lib.init_adapters(cfg, program.lora, jax.random.key(1)), shardings.params)
    state = TrainState(jnp.int32(0), adapters, program.optimizer.init(adapters), base)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.vocab_size, (8, 64)).astype(np.int32)
    batch = dict(tokens=tokens, targets=np.roll(tokens, -1, 1), positions=np.broadcast_to(np.arange(64), (8, 64)),
                 segment_ids=np.ones_like(tokens), loss_weights=np.ones((8, 64), np.float32))
    batch = {k: jax.device_put(jnp.asarray(v), program.batch_sharding) for k, v in batch.items()}
    base_before = jax.device_get(base)
    with jax.set_mesh(program.mesh):
        total, count = program.eval_step(state.params, batch, state.base)
        new, metrics = program.train_step(state, batch, jax.random.key(0))
    # b = 0: the first step's loss is the base model's (no dropout in eval; the loss is of the frozen base)
    plain = lm_loss(cfg, jax.tree.map(lambda x: x.astype(jnp.float32), base_before,
                                      is_leaf=lambda x: isinstance(x, lora_lib.QuantizedWeight)),
                    jax.device_get(batch))[0]
    np.testing.assert_allclose(float(total / count), float(plain), rtol=1e-5)
    assert int(new.step) == 1 and np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(new.base), base_before)
    b = np.asarray(new.params["layers"]["mlp"]["w2"]["b"])
    assert np.abs(b).max() > 0  # the adapters moved


def test_a_resume_on_another_base_is_refused():
    from lima_jax.config import base_config, changed_run_keys, run_identity

    c = base_config()
    c.lora.rank, c.init_checkpoint = 8, "gs://b/llama65b"
    saved = run_identity(c, "t", "d")
    c.init_checkpoint = "gs://b/llama65b-other"
    assert changed_run_keys(saved, run_identity(c, "t", "d")) == ["lora.base"]
    c.lora.rank = 0  # full fine-tuning after LoRA in the same work dir
    assert changed_run_keys(saved, run_identity(c, "t", "d")) == ["lora"]


def test_int8_base_is_read_one_matrix_at_a_time(tmp_path):
    from lima_jax import model_store
    from lima_jax.sharding import make_mesh
    from tests.tiny_run import tiny_config

    config = tiny_config()
    config.lora.update(rank=8, base_dtype="int8")
    cfg, lora = MODEL_GQA, lora_lib.LoraConfig.from_config(config.lora)
    params = jax.device_get(init_params(cfg, jax.random.key(0)))
    model_store.save_params(tmp_path / "base", params, model_store.CheckpointMeta(model=cfg))
    base = model_store.frozen_base(model_store.LoraRecord(lora, str(tmp_path / "base")), cfg, make_mesh(config.mesh))
    expected = lora_lib.frozen_base(jax.tree.map(lambda w: w.astype(jnp.bfloat16), params), lora)
    assert jax.tree.structure(base) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(base), jax.device_get(expected))
