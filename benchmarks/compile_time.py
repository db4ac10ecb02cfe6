"""Compile time of the train step for 2 and 16 layers of the tiny width: with layers under
`jax.lax.scan` it must not grow with depth (goal: ratio < 2). Prints a table, writes JSON."""

import dataclasses
import json
import os
import pathlib
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from lima_jax.config import base_config, run_config  # noqa: E402
from lima_jax.model import ModelConfig  # noqa: E402
from lima_jax.sharding import make_mesh  # noqa: E402
from lima_jax.train.program import build_program  # noqa: E402


def compile_seconds(n_layers: int, scan: bool) -> float:
    cfg = ModelConfig(vocab_size=512, dim=128, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_dim=344,
                      vocab_multiple=8, remat_policy="full", scan_layers=scan)
    config = base_config()
    program = build_program(dataclasses.replace(run_config(config), model=cfg), make_mesh(config.mesh, jax.devices()[:1]),
                            total_steps=100)
    start = time.perf_counter()
    program.train_step.lower(*program.abstract_args(8, 256)).compile()
    return time.perf_counter() - start


def main():
    rows = []
    for scan in (True, False):
        two, sixteen = compile_seconds(2, scan), compile_seconds(16, scan)
        rows.append(dict(scan_layers=scan, layers_2_s=two, layers_16_s=sixteen, ratio=sixteen / two))
    print("| scan_layers | 2 layers (s) | 16 layers (s) | ratio |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['scan_layers']} | {r['layers_2_s']:.2f} | {r['layers_16_s']:.2f} | {r['ratio']:.2f} |")
    out = pathlib.Path(__file__).parent / "results" / "compile_time.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
