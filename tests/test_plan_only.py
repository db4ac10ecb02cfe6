"""launch/tpu_train.py --plan_only: the plan, read from its key=value line, and nothing restored,
compiled or trained. The demo's figures are checked against arithmetic on the examples; LIMA's
against the recipe (446 steps of 32 for 65B) and issue 28's bar (at least 95% real tokens)."""

import math
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, cpu_env

PLAN_LINE = re.compile(r"plan_only: steps=(\d+) examples_per_step=(\d+) row_shapes=([\d/]+)x(\d+) "
                       r"rows_per_step=(\d+) real_token_share=([\d.]+)%")


def plan_only(workdir, config: str, *overrides: str) -> tuple[re.Match, str]:
    cmd = [sys.executable, str(ROOT / "launch" / "tpu_train.py"), "--config", str(ROOT / "configs" / config),
           "--workdir", str(workdir), "--plan_only", *overrides]
    out = subprocess.run(cmd, env=cpu_env(1), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    match = PLAN_LINE.search(out.stdout)
    assert match, out.stdout[-3000:]
    return match, out.stdout


def test_plan_only_prints_the_demo_plan_and_stops(tmp_path):
    from lima_jax.data.demo import DEMO_TRAIN
    from lima_jax.data.pipeline import load_data
    from tests.tiny_run import tiny_config

    match, out = plan_only(tmp_path, "tiny.py")
    steps, per_step, shapes, seq, rows, share = match.groups()
    config = tiny_config()
    examples = load_data(config.data, config.seed).train  # what the run trains on (dev held out)
    assert config.data.train_path == DEMO_TRAIN and int(per_step) == 64 and int(seq) == 256
    assert int(steps) == math.ceil(len(examples) * config.train.epochs / 64)
    assert shapes.split("/")[-1] == rows
    real = sum(len(e["ids"]) - 1 for e in examples) * config.train.epochs  # inputs: ids[:-1]
    if "/" not in shapes:  # one step shape: every step's slots are rows x seq
        assert float(share) == pytest.approx(100 * real / (int(steps) * int(rows) * int(seq)), abs=0.051)  # NN.N%
    assert "% real tokens" in out and "batch:" in out  # the loop's own plan lines too
    assert "resuming" not in out and "initial weights" not in out and "step/s" not in out
    assert not any((tmp_path / "checkpoints").glob("[0-9]*"))


@pytest.mark.parametrize("config, per_step, steps", [("llama65b.py", 32, 446), ("llama7b.py", 64, None)])
def test_lima_plans_reach_95_percent_real_tokens(tmp_path, shared_dir, config, per_step, steps):
    match, _ = plan_only(tmp_path, config, f"--config.data.train_path={shared_dir}/lima/train.jsonl",
                         f"--config.data.tokenizer_path={shared_dir}/llama/tokenizer.model")
    assert int(match.group(2)) == per_step and (steps is None or int(match.group(1)) == steps)
    assert float(match.group(6)) >= 95.0
