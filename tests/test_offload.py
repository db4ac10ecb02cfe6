"""The optimizer state in host memory (train.opt_state_memory="pinned_host"): the same losses as
on the device, and it saves and restores through lima_jax.checkpoint staying in host memory.

XLA:CPU has jax's three memory kinds (device, pinned_host, unpinned_host), so the transfers the
train step makes on a TPU are made here too; what CPU cannot show is the HBM they free (launch/
aot_check.py reports that for TPU slices)."""

import dataclasses

import grain
import jax
import numpy as np
import pytest

from lima_jax import checkpoint as ckpt
from lima_jax.config import base_config, run_config, validate_values
from lima_jax.errors import ConfigError
from lima_jax.sharding import check_memory_kind, make_mesh
from lima_jax.train.program import build_program
from lima_jax.train.step import TrainState
from tests.train_fixtures import CFG, random_batch

STEPS = 4
MODEL = dataclasses.replace(CFG, remat_policy="none", logits_chunks=1)  # the smallest step to compile


def program(memory: str):
    config = base_config()
    config.optimizer.learning_rate = 1e-3
    config.train.opt_state_memory = memory
    return build_program(dataclasses.replace(run_config(config), model=MODEL), make_mesh(config.mesh), total_steps=10)


def start(prog) -> TrainState:
    shardings = prog.state_shardings
    rng = np.random.default_rng(0)  # random weights made on the host: no init program to compile
    params = jax.tree.map(lambda a, s: jax.device_put(rng.normal(0, 0.05, a.shape).astype(a.dtype), s),
                          prog.abstract_state.params, shardings.params)
    opt_state = jax.jit(prog.optimizer.init, out_shardings=shardings.opt_state)(params)
    return TrainState(jax.device_put(np.int32(0), shardings.step), params, opt_state)


def run(prog, state, steps) -> tuple[TrainState, list[float]]:
    losses = []
    with jax.set_mesh(prog.mesh):
        for step in steps:
            batch = jax.device_put(random_batch(rows=8, seq=32, seed=step), prog.batch_sharding)
            state, metrics = prog.train_step(state, batch, jax.random.key(1))
            losses.append(float(metrics["loss"]))
    return state, losses


def memory_kinds(tree) -> set[str]:
    return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}


def test_host_optimizer_state_gives_the_device_losses_and_resumes(tmp_path):
    _, reference = run(program("device"), start(program("device")), range(STEPS))

    host = program("pinned_host")
    state, first = run(host, start(host), range(STEPS // 2))
    assert memory_kinds(state.opt_state) == {"pinned_host"} and memory_kinds(state.params) == {"device"}
    data_iter = iter(grain.MapDataset.range(8).to_iter_dataset())
    manager = ckpt.manager(tmp_path, async_save=False)
    ckpt.save_train_state(manager, STEPS // 2, state.params, state.opt_state, data_iter, {})
    manager.wait_until_finished()

    targets = [ckpt.target_tree(a, s) for a, s in ((host.abstract_state.params, host.state_shardings.params),
                                                   (host.abstract_state.opt_state, host.state_shardings.opt_state))]
    step, params, opt_state, _ = ckpt.restore_train_state(manager, *targets, data_iter, warn=pytest.fail)
    manager.close()
    assert step == STEPS // 2 and memory_kinds(opt_state) == {"pinned_host"}
    jax.tree.map(np.testing.assert_array_equal, opt_state, state.opt_state)
    resumed = TrainState(jax.device_put(np.int32(step), host.state_shardings.step), params, opt_state)
    _, second = run(host, resumed, range(STEPS // 2, STEPS))
    np.testing.assert_allclose(first + second, reference, rtol=1e-6)


def test_memory_kind_is_checked_before_compiling():
    config = base_config()
    config.train.opt_state_memory = "hbm"
    with pytest.raises(ConfigError, match=r"config.train.opt_state_memory='hbm': one of \['device', 'pinned_host'\]"):
        validate_values(config)
    with pytest.raises(ConfigError, match="config.train.opt_state_memory='unpinned_host': the cpu devices have"):
        check_memory_kind(jax.devices(), "unpinned_host", "train.opt_state_memory")
