"""Running the tiny LIMA config in tests: as a subprocess (`launch`, `finish`) like a user
would, or in this process (`tiny_config` + lima_jax.train.loop.train); reading what a run
wrote (`losses`, `metric_rows`)."""

import importlib.util
import json
import subprocess
import sys

from tests.conftest import ROOT, cpu_env

LAUNCHED: list[subprocess.Popen] = []  # every run `launch` started; conftest kills those a test left running


def launch(workdir, cache, *overrides, devices=8, extra=(), config="tiny.py", fast_compile=False) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "launch" / "tpu_train.py"), "--config", str(ROOT / "configs" / config),
           "--workdir", str(workdir), "--config.train.sample_dev_prompts=0",
           f"--config.train.compilation_cache_dir={cache}", "--config.train.checkpoint_every_steps=4",
           *overrides, *extra]
    proc = subprocess.Popen(cmd, env=cpu_env(devices, fast_compile), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    LAUNCHED.append(proc)
    return proc


def finish(proc: subprocess.Popen, timeout: int = 400) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def metric_rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses(workdir) -> dict[int, float]:
    """step -> train loss; a resumed run drops an interrupted run's rows after its checkpoint,
    so every step has one row."""
    rows = metric_rows(workdir)
    loss = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert len(loss) == sum("loss" in r for r in rows), f"steps logged twice in {workdir}/metrics.jsonl"
    return loss


def tiny_config(**train):
    """configs/tiny.py with quiet defaults for in-process runs; `train` overrides config.train."""
    spec = importlib.util.spec_from_file_location("tiny", ROOT / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.train.update(**{**dict(sample_dev_prompts=0, eval_every_epoch=False, async_checkpointing=False), **train})
    return config
