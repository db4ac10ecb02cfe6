"""The GPU benchmark's path (benchmarks/gpu_1b.sh: Llama 3.2 1B's family, bfloat16, lima_jax
against transformers) run on CPU at toy sizes, so that GPU time goes to measuring."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_llama32_1b_benchmark_path_runs_and_losses_agree_with_transformers(tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "benchmarks/train_step.py", "--model", "llama3.2-1b-tiny", "--bf16-only",
                             "--no-compile", "--steps", "1", "--output", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    variants = report["variants"]
    assert set(variants) == {"lima_jax-bf16", "torch-eager-bf16"}
    # tied embeddings and llama3 RoPE scaling on both sides: the same first loss from the same weights
    assert all(v["loss_matches_torch"] for v in variants.values()), variants
    assert variants["lima_jax-bf16"]["dtype"] == "bfloat16" and variants["lima_jax-bf16"]["mfu"] > 0
    assert report["model"]["tied_embeddings"] and report["model"]["rope_type"] == "llama3"
    assert report["speedup_vs_transformers_bf16"] > 0
    assert "speedup_vs_transformers_bf16:" in result.stdout
