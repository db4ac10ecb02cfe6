"""The optimizer recipe and the train step, against independent expectations."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lima_jax.config import base_config
from lima_jax.model import bind, init_params
from lima_jax.sharding import make_mesh
from lima_jax.train.optimizer import decay_mask, learning_rate_schedule, make_optimizer
from lima_jax.train.step import TrainState, abstract_train_state, make_train_step
from tests.train_fixtures import CFG, random_batch

jax.config.update("jax_default_matmul_precision", "highest")


def test_lima_schedule_first_and_last_step():
    opt = base_config().optimizer
    total = 469
    schedule = learning_rate_schedule(opt, total)
    np.testing.assert_allclose(float(schedule(0)), 1e-5, rtol=1e-6)  # no warmup
    np.testing.assert_allclose(float(schedule(total - 1)), 1e-6, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(234)), 1e-5 - 234 / 468 * 9e-6, rtol=1e-5)  # linear


def test_weight_decay_skips_norms_only():
    params = init_params(CFG, jax.random.key(0))
    mask = decay_mask(params)
    assert mask["layers"]["attn"]["wq"] and mask["embed"] and mask["lm_head"] and mask["layers"]["mlp"]["w2"]
    assert not mask["layers"]["attn_norm"]["scale"] and not mask["final_norm"]["scale"]


def step_once(accum, batch):
    config = base_config()
    config.optimizer.learning_rate = 1e-3
    schedule = learning_rate_schedule(config.optimizer, 10)
    optimizer = make_optimizer(config.optimizer, schedule)
    params = init_params(CFG, jax.random.key(0))
    state = TrainState(jnp.int32(0), params, optimizer.init(params))
    step = jax.jit(make_train_step(CFG, optimizer, schedule, accum))
    return step(state, batch, jax.random.key(1))


def test_gradient_accumulation_equals_one_large_batch():
    batch = random_batch(rows=8)
    one, m1 = step_once(1, batch)
    four, m4 = step_once(4, batch)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), four.params, one.params)  # Adam: lr 1e-3 per step


def test_loss_is_normalised_per_target_token():
    """Independent check of the step's loss: plain optax cross-entropy averaged over weighted tokens."""
    batch = random_batch(rows=2, seq=16)
    _, metrics = step_once(1, batch)
    model = bind(CFG, init_params(CFG, jax.random.key(0)))
    logits = model.logits(model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"])[0])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    expected = np.sum(nll * batch["loss_weights"]) / np.sum(batch["loss_weights"])
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)


def test_non_finite_loss_leaves_the_state_unchanged():
    batch = random_batch(rows=2, seq=16)
    batch["loss_weights"] = batch["loss_weights"] * np.nan
    state, metrics = step_once(1, batch)
    assert not np.isfinite(metrics["loss"]) and int(state.step) == 0
    np.testing.assert_array_equal(state.params["embed"], init_params(CFG, jax.random.key(0))["embed"])


def test_optimizer_state_follows_parameter_shardings():
    mesh = make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
    opt_cfg = base_config().optimizer
    optimizer = make_optimizer(opt_cfg, learning_rate_schedule(opt_cfg, 10))
    _, shardings = abstract_train_state(CFG, optimizer, mesh)
    adam = shardings.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    assert adam.mu["layers"]["attn"]["wq"] == shardings.params["layers"]["attn"]["wq"]
    assert adam.count.spec == jax.sharding.PartitionSpec()


def test_lima_step_count_for_1000_examples_15_epochs_32_per_step(shared_dir):
    """The paper's recipe: 1,000 examples x 15 epochs / 32 per step = ~469 optimizer steps."""
    from lima_jax.data import pipeline

    config = base_config()
    config.data.update(train_path=str(shared_dir / "lima" / "train.jsonl"),
                       tokenizer_path=str(shared_dir / "llama" / "tokenizer.model"), dev_size=0, examples_per_step=32)
    data = pipeline.load_data(config.data, seed=0)
    plan = pipeline.make_plan(data, 32, epochs=15)
    assert len(data.train) == 1000
    assert plan.total_steps == 469
    schedule = learning_rate_schedule(config.optimizer, plan.total_steps)
    np.testing.assert_allclose([float(schedule(0)), float(schedule(plan.total_steps - 1))], [1e-5, 1e-6], rtol=1e-6)
