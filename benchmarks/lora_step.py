"""The LoRA train step against the full fine-tuning step on this machine: time and peak memory.

  python benchmarks/lora_step.py [--steps 3] [--rank 16] [--output FILE]

The bench model of benchmarks/train_step.py ("bench-110m": 12 layers, hidden 768, 8 x 512
tokens a step, float32 compute, its CPU-tuned settings `TUNED`), the same random weights and
batch for both. Full: AdamW over every weight (float32 parameters and moments). LoRA: rank
`--rank` adapters on every projection, the base frozen in bfloat16 (`config.lora`), AdamW over
the adapters only. Each variant runs in its own child process (no memory or compile cache
shared): one step to compile and warm up, then `--steps` timed steps (median reported); the peak
is the child's peak RSS (weights, optimizer state, compilation and steps included).
Writes benchmarks/results/lora_step.json.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def child(rank: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    from train_step import TUNED, make_batch, model_cfg

    from lima_jax.backend import compile_step
    from lima_jax.config import base_config, run_config
    from lima_jax.model import init_params, lora as lora_lib
    from lima_jax.sharding import make_mesh
    from lima_jax.train.program import build_program
    from lima_jax.train.step import TrainState

    cfg = model_cfg(**TUNED)
    config = base_config()
    config.train.grad_accum_steps = TUNED["grad_accum_steps"]
    config.lora.update(rank=rank, base_dtype="bfloat16")
    program = build_program(dataclasses.replace(run_config(config), model=cfg), make_mesh(config.mesh, jax.devices()[:1]),
                            total_steps=1000)
    params = init_params(cfg, jax.random.key(0))
    if program.lora is None:
        state = TrainState(jnp.int32(0), params, program.optimizer.init(params))
    else:
        adapters = lora_lib.init_adapters(cfg, program.lora, jax.random.key(1))
        state = TrainState(jnp.int32(0), adapters, program.optimizer.init(adapters),
                           lora_lib.frozen_base(params, program.lora))
    del params
    batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
    key = jax.random.key(0)
    start = time.perf_counter()
    compiled = compile_step(program.train_step, state, batch, key)
    state, metrics = compiled(state, batch, key)
    first_loss = float(metrics["loss"])
    warmup = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, key)
        float(metrics["loss"])
        times.append(time.perf_counter() - start)
    trainable = sum(x.size for x in jax.tree.leaves(state.params))
    return dict(rank=rank, step_time_s=statistics.median(times), times=times, compile_and_first_step_s=warmup,
                first_loss=first_loss, trainable_params=int(trainable),
                peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "lora_step.json"))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.steps)), flush=True)
        return
    results = {}
    for name, rank in (("full", 0), ("lora", args.rank)):
        out = subprocess.run([sys.executable, __file__, f"--child={rank}", f"--steps={args.steps}"], check=True,
                             capture_output=True, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    results["lora_speedup"] = results["full"]["step_time_s"] / results["lora"]["step_time_s"]
    results["lora_peak_ratio"] = results["lora"]["peak_rss_gib"] / results["full"]["peak_rss_gib"]
    pathlib.Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.output).write_text(json.dumps(results, indent=2))
    print(f"lora step {results['lora']['step_time_s']:.2f} s vs full {results['full']['step_time_s']:.2f} s "
          f"({results['lora_speedup']:.2f}x); peak RSS {results['lora']['peak_rss_gib']:.2f} vs "
          f"{results['full']['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
