"""The LIMA recipe holds on any mesh and across resumes (issue 16): the same optimizer steps,
examples and losses on 8 devices as on 1; every refusal happens before compiling and names
the key; dev sets off, carved or from their own file; damaged checkpoints are stepped over."""

import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from lima_jax import checkpoint as ckpt, model_store
from lima_jax.data import demo
from lima_jax.train import loop
from tests.conftest import cpu_env
from tests.tiny_run import LAUNCHED, finish, launch, metric_rows, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


def test_fewer_rows_than_batch_shards_trains_like_one_device(tmp_path, cache):
    """fsdp=8 with 4 examples a step (one packed row): the 8 devices split the row's tokens
    (context parallel) instead of growing the batch. Reference: the same run on 1 device."""
    recipe = ("--config.data.examples_per_step=4", "--config.model.residual_dropout=0", "--config.train.epochs=1",
              "--config.train.max_steps=8")
    out8 = finish(launch(tmp_path / "d8", cache, *recipe, "--config.mesh.fsdp=8", fast_compile=True))
    finish(launch(tmp_path / "d1", cache, *recipe, devices=1, fast_compile=True))
    assert "context parallel" in out8 and "48 steps over 1 epochs, 4 examples a step" in out8
    rows8, rows1 = ([r for r in metric_rows(tmp_path / d) if "loss" in r] for d in ("d8", "d1"))
    assert [r["step"] for r in rows8] == [r["step"] for r in rows1] == list(range(1, 9))
    assert [r["examples"] for r in rows8] == [r["examples"] for r in rows1] == [4] * 8
    assert [r["target_tokens"] for r in rows8] == [r["target_tokens"] for r in rows1]
    np.testing.assert_allclose([r["loss"] for r in rows8], [r["loss"] for r in rows1], rtol=2e-5)


def test_resume_with_a_changed_recipe_is_refused(tmp_path, cache):
    config = tiny_config(max_steps=1, checkpoint_every_steps=1, compilation_cache_dir=str(cache))
    loop.train(config, tmp_path)
    assert model_store.read_meta(tmp_path).tokenizer  # the tokenizer travels with the checkpoint
    for key, value, listed in (("train.epochs", 30, "train.epochs: 15 -> 30"), ("seed", 1, "seed: 0 -> 1"),
                               ("data.seq_len", 128, "data.seq_len: 256 -> 128"),
                               ("data.dev_size", 5, "data.dev_size: 10 -> 5")):
        changed = tiny_config(max_steps=1)
        section, _, name = key.rpartition(".")
        (changed[section] if section else changed)[name] = value
        with pytest.raises(loop.ResumeRefused, match=f"(?s){listed}.*accept_changed"):
            loop.prepare(changed, tmp_path)
    accepted = tiny_config(max_steps=1, accept_changed=("train.epochs",))
    accepted.train.epochs = 30
    loop.prepare(accepted, tmp_path)  # deliberately accepted: no refusal
    faster = tiny_config(max_steps=1)
    faster.model.remat_policy, faster.train.grad_accum_steps = "full", 2
    faster.mesh.update(data=2, fsdp=4)
    loop.prepare(faster, tmp_path)  # speed settings and the mesh are not the recipe


@pytest.mark.parametrize("key, value, message", [
    ("data.examples_per_step", 0, r"config\.data\.examples_per_step=0: must be an integer >= 1"),
    ("train.log_every_steps", 0, r"config\.train\.log_every_steps=0"),
    ("train.epochs", -1, r"config\.train\.epochs=-1"),
    ("data.seq_len", 1024, r"config\.data\.seq_len=1024 is longer than config\.model\.max_seq_len=512"),
    ("data.rows_per_step", 1, r"config\.data\.rows_per_step=1: the fullest step's examples need \d+ rows"),
    ("train.grad_accum_steps", 3, r"grad_accum_steps=3 does not divide config\.data\.rows_per_step=4"),
    ("model.vocab_size", 600, r"512 ids \(pieces \+ EOT\), but config\.model\.vocab_size=600"),
    ("train.accept_changed", ("data.packing",), r"accept_changed names \['data.packing'\]"),
])
def test_invalid_values_are_refused_naming_the_key(tmp_path, key, value, message):
    config = tiny_config()
    if key == "train.grad_accum_steps":
        config.data.rows_per_step = 4
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=message):
        loop.prepare(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_no_dev_set_runs_without_dev_loss_or_samples(tmp_path, cache):
    config = tiny_config(epochs=1, eval_every_epoch=True, sample_dev_prompts=2, compilation_cache_dir=str(cache))
    config.data.dev_size = 0
    loop.train(config, tmp_path)
    rows = metric_rows(tmp_path)
    assert rows and not [r for r in rows if "dev_loss" in r] and not (tmp_path / "dev_samples").exists()
    assert sum(r["examples"] for r in rows) == 200  # all of train.jsonl trains


def test_dev_path_holds_out_nothing_of_train(tmp_path, cache):
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(pathlib.Path(demo.DEMO_TRAIN).read_text().splitlines(keepends=True)[:7]))
    config = tiny_config(epochs=1, eval_every_epoch=True, compilation_cache_dir=str(cache))
    config.data.dev_path = str(dev)
    loop.train(config, tmp_path / "run")
    rows = metric_rows(tmp_path / "run")
    assert sum(r.get("examples", 0) for r in rows) == 200
    assert len([r for r in rows if "dev_loss" in r]) == 1


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, cache, capsys):
    # 45 steps, epoch 1 ends at step 3 (kept), then a checkpoint at step 4
    config = tiny_config(max_steps=4, checkpoint_every_steps=4, keep_epochs=(1,), compilation_cache_dir=str(cache))
    loop.train(config, tmp_path)
    assert ckpt.manager(tmp_path / "checkpoints", read_only=True).all_steps() == [3, 4]
    flip_bytes(tmp_path / "checkpoints" / "4" / "params")
    config.train.max_steps = 5
    loop.train(config, tmp_path)
    out = capsys.readouterr().out
    assert "/4 is damaged" in out and "checkpoints/3\n" in out  # resumed from 3
    assert ckpt.manager(tmp_path / "checkpoints", read_only=True).all_steps() == [3, 4]  # 4 trained again
    assert (tmp_path / "checkpoints" / "damaged" / "4").is_dir()  # kept for inspection, never deleted


def flip_bytes(folder: pathlib.Path) -> None:
    """Invert every byte of the array data files under `folder` (a corrupted disk or copy)."""
    files = [p for p in folder.rglob("*") if p.is_file() and "d" in p.parent.name and p.stat().st_size > 64]
    assert files, list(folder.rglob("*"))
    for p in files:
        p.write_bytes(bytes(255 - b for b in p.read_bytes()))


WORKER = r'''
import sys
from lima_jax.train import loop
from tests.tiny_run import tiny_config
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", 2, int(sys.argv[2]))
config = tiny_config(epochs=int(sys.argv[5]))
config.data.train_path = sys.argv[3]
try:
    loop.prepare(config, sys.argv[4])
except ValueError as e:
    print("REFUSED", e)
'''


@pytest.mark.parametrize("differ", ["data", "epochs"])
def test_processes_running_different_jobs_are_refused(tmp_path, differ):
    """Two processes of one run that read different data, or were given different epochs, stop
    before compiling with the keys that differ (they hung, or aborted in gloo, before)."""
    other = tmp_path / "other.jsonl"
    other.write_text("".join(pathlib.Path(demo.DEMO_TRAIN).read_text().splitlines(keepends=True)[:150]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    args = [(demo.DEMO_TRAIN, "15"), (str(other), "15") if differ == "data" else (demo.DEMO_TRAIN, "10")]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, port, str(i), path, str(tmp_path / "w"), epochs],
                              env=cpu_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=pathlib.Path(__file__).parents[1])
             for i, (path, epochs) in enumerate(args)]
    LAUNCHED.extend(procs)  # killed after the test should a communicate() time out
    outs = [p.communicate(timeout=300)[0] for p in procs]
    expected = "process 1: config.data.train_path, run.data.dev, run.data.train" if differ == "data" else \
        "process 1: config.train.epochs, run.train.epochs"
    for out in outs:
        assert "REFUSED processes run different jobs" in out and expected in out, out[-2000:]
