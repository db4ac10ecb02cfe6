"""`config.train.wandb`: a tiny run logged to Weights & Biases offline, read back with wandb's own
reader (`wandb leet inspect --json`, wandb-core's parser of the run's .wandb log), not ours."""

import json
import shutil
import subprocess

import pytest

from tests.tiny_run import metric_rows, tiny_config

pytest.importorskip("wandb")


def wandb_records(run_dir) -> list[dict]:
    """The records of an offline run folder as wandb's own reader gives them."""
    (log,) = run_dir.glob("run-*.wandb")
    wandb = shutil.which("wandb")
    out = subprocess.run([wandb, "leet", "inspect", "--json", str(log)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def run_config(cache, **train):
    config = tiny_config(epochs=2, keep_epochs=(1, 2), eval_every_epoch=True, sample_dev_prompts=2,
                         sample_max_new_tokens=4, checkpoint_every_steps=2, wandb=True, wandb_project="lima-test",
                         compilation_cache_dir=str(cache), **train)  # the resume compiles nothing again
    config.model.update(dim=32, n_layers=1, ffn_dim=64)
    config.data.update(seq_len=128, dev_size=4)
    return config


def test_wandb_offline_history_equals_metrics_jsonl_across_a_resume(tmp_path, monkeypatch):
    from lima_jax.train import loop

    for var, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CACHE_DIR", tmp_path / "cache"),
                       ("WANDB_DATA_DIR", tmp_path / "data"), ("WANDB_CONFIG_DIR", tmp_path / "config")):
        monkeypatch.setenv(var, str(value))
    workdir = tmp_path / "run"
    loop.train(run_config(tmp_path / "xla", max_steps=3), workdir)  # stopped at step 3, saved at 2: resumed below
    run_id = (workdir / "wandb_run_id").read_text()
    loop.train(run_config(tmp_path / "xla"), workdir)
    assert (workdir / "wandb_run_id").read_text() == run_id

    runs = sorted((workdir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2  # one folder a start, both of the same W&B run
    history, tables, config = {}, {}, None
    for run_dir in runs:  # the resume's rows replace the first start's past its checkpoint, as in metrics.jsonl
        for record in wandb_records(run_dir):
            if record["type"] == "run":
                config = record["run"]["config"]["update"]
                assert record["run"]["run_id"] == run_id
            if record["type"] == "history":
                row = record["history"]["item"]
                step = record["history"]["step"]["num"]
                history[int(step)] = {k: v for k, v in row.items() if not k.startswith(("_", "dev_samples"))}
                if "dev_samples.path" in row:
                    table = json.loads((run_dir / "files" / row["dev_samples.path"]).read_text())
                    tables[int(step)] = [dict(zip(table["columns"], r)) for r in table["data"]]

    expected = {}
    for row in metric_rows(workdir):  # train and dev rows of one step are one W&B row
        expected.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k != "step"})
    assert history == expected
    assert sorted(history) == list(range(1, len(history) + 1)) and sum("dev_loss" in r for r in history.values()) == 2
    samples = {int(p.stem.split("step")[1]): [json.loads(x) for x in p.read_text().splitlines()]
               for p in (workdir / "dev_samples").glob("*.jsonl")}
    assert tables == samples and len(tables) == 2
    assert config["train"]["wandb"] is True and config["model"]["dim"] == 32  # the config as logged
