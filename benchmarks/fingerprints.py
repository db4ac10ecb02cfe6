"""What checkpoint fingerprints cost: computing them for a train state (params + AdamW state) on
8 emulated CPU devices, against saving and restoring that state with Orbax, for the tiny demo
model and for bench-110m (benchmarks/train_step.py's model). One run, ratios in that run.

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/fingerprints.py
"""

import dataclasses
import importlib.util
import pathlib
import sys
import tempfile
import time

import jax
import orbax.checkpoint as ocp

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lima_jax import checkpoint as ckpt, config as config_lib  # noqa: E402
from lima_jax.model import init_params  # noqa: E402
from lima_jax.sharding import make_mesh  # noqa: E402
from lima_jax.train.program import build_program  # noqa: E402


def load(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn, repeats: int = 3) -> tuple[float, float]:
    """(best wall seconds, CPU seconds of that run) over `repeats` runs."""
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def measure(name: str, config, model_cfg) -> dict:
    mesh = make_mesh(config.mesh)
    program = build_program(dataclasses.replace(config_lib.run_config(config), model=model_cfg), mesh, total_steps=10)
    shardings = program.state_shardings
    params = jax.jit(init_params, static_argnums=0, out_shardings=shardings.params)(model_cfg, jax.random.key(0))
    opt_state = jax.jit(program.optimizer.init, out_shardings=shardings.opt_state)(params)
    state = {"params": params, "opt_state": opt_state}
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    fingerprint = lambda: {k: ckpt.with_dtypes(v) for k, v in state.items()}  # noqa: E731
    fingerprint()  # compile once, as a run does at its first save
    fp_wall, fp_cpu = timed(fingerprint)
    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(100))

        def save():
            with ckpt.manager(tmp, keep_latest=1, async_save=False) as mngr:
                mngr.save(next(counter), args=ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in state.items()}))
                mngr.wait_until_finished()

        save_wall, save_cpu = timed(save)
        targets = {k: ckpt.target_tree(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), v),
                                       getattr(shardings, k)) for k, v in state.items()}

        def restore():
            with ckpt.manager(tmp, read_only=True) as mngr:
                return dict(mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
                    **{k: ocp.args.StandardRestore(t) for k, t in targets.items()})))

        restore_wall, restore_cpu = timed(restore)
    row = dict(model=name, state_mib=n_bytes / 2**20, fingerprint_s=fp_wall, save_s=save_wall,
               restore_s=restore_wall, fingerprint_cpu_s=fp_cpu, save_cpu_s=save_cpu, restore_cpu_s=restore_cpu)
    print(f"{name}: state {row['state_mib']:.1f} MiB; fingerprints {fp_wall:.3f} s (CPU {fp_cpu:.2f} s); "
          f"Orbax save {save_wall:.3f} s (CPU {save_cpu:.2f}), restore {restore_wall:.3f} s (CPU {restore_cpu:.2f}); "
          f"fingerprints / save = {fp_wall / save_wall:.3f}, / restore = {fp_wall / restore_wall:.3f} "
          f"(CPU {fp_cpu / save_cpu:.3f}, {fp_cpu / restore_cpu:.3f})", flush=True)
    return row


def main():
    tiny = load("tiny", ROOT / "configs" / "tiny.py").get_config()
    measure("tiny", tiny, config_lib.model_config(tiny))
    bench = load("train_step", ROOT / "benchmarks" / "train_step.py")
    config = config_lib.base_config()
    config.mesh.fsdp = -1
    measure("bench-110m", config, bench.model_cfg())


if __name__ == "__main__":
    main()
