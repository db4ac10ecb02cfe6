"""The tiny LIMA run end to end on 8 emulated CPU devices: it learns, it resumes exactly after
SIGKILL, it stops cleanly on SIGTERM and on a non-finite loss, and 2 processes x 4 devices
give the losses of 1 process x 8 devices. References are independent runs, never the code's
own numbers."""

import json
import signal
import socket
import time

import numpy as np
import pytest

from tests.tiny_run import finish, launch, losses, metric_rows, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")


def final_params(workdir):
    import jax
    import ml_collections

    from lima_jax import checkpoint as ckpt, model_store
    from lima_jax.config import model_config
    from lima_jax.model import abstract_params

    meta = model_store.read_meta(workdir)
    cfg = model_config(ml_collections.ConfigDict(meta.config))
    abstract = abstract_params(cfg)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = ckpt.restore_params(workdir, abstract, jax.tree.map(lambda _: device, abstract))
    return meta.step, jax.tree.map(np.asarray, params)


def wait_for(predicate, proc, timeout=300):
    start = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() - start < timeout
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    finish(launch(workdir, cache))
    return workdir


def test_tiny_run_overfits_the_demo_data(uninterrupted):
    loss = losses(uninterrupted)
    steps = sorted(loss)
    first, last = loss[steps[0]], np.mean([loss[s] for s in steps[-4:]])
    assert first > 5.5  # ~ln(512) at random init
    assert last < first / 2.5, (first, last)
    rows = metric_rows(uninterrupted)
    dev = [r["dev_loss"] for r in rows if "dev_loss" in r]
    assert len(dev) == 15 and dev[-1] < dev[0] / 2.5
    assert {"learning_rate", "grad_norm", "tokens_per_s", "step_time"} <= set(rows[0])
    assert (uninterrupted / "config.json").is_file() and list((uninterrupted / "tensorboard").iterdir())
    # Kept: the ends of epochs 5-10 (LIMA's candidates) and the latest; the rest were deleted.
    total = max(steps)
    kept = sorted(int(p.name) for p in (uninterrupted / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == sorted({round(total * e / 15) for e in range(5, 11)} | {total})


def test_resume_after_sigkill_and_sigterm_is_exact(tmp_path, cache, uninterrupted):
    workdir = tmp_path / "interrupted"
    ckpts = workdir / "checkpoints"
    stop_at = "--config.train.max_steps=15"  # the end of epoch 5: a step the uninterrupted run keeps
    # 1) SIGKILL as soon as the first checkpoint is complete (no chance to clean up).
    proc = launch(workdir, cache, stop_at)
    wait_for(lambda: ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()), proc)
    proc.kill()
    proc.wait()
    # 2) Resume, then SIGTERM mid-run: a clean exit with a complete checkpoint of that step.
    proc = launch(workdir, cache, stop_at)
    resumed_from = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    wait_for(lambda: max(losses(workdir), default=0) >= resumed_from + 3, proc)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert "signal 15: saving step" in out
    saved = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert saved > resumed_from and not [p for p in ckpts.iterdir() if "tmp" in p.name]
    # 3) Resume to step 15: bitwise the parameters and the losses of the uninterrupted run there.
    finish(launch(workdir, cache, stop_at))
    step_a, params_a = final_params(uninterrupted / "checkpoints" / "15")
    step_b, params_b = final_params(workdir)
    assert step_a == step_b == 15
    for a, b in zip(*(leaves(p) for p in (params_a, params_b))):
        np.testing.assert_array_equal(a, b)
    assert losses(workdir) == {step: loss for step, loss in losses(uninterrupted).items() if step <= 15}


def leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_two_processes_give_the_losses_of_one(tmp_path, cache, uninterrupted):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path / "multi"
    procs = [launch(workdir, cache, "--config.train.max_steps=4", devices=4, fast_compile=True,
                    extra=(f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"))
             for i in range(2)]
    for p in procs:
        finish(p)
    multi, single = losses(workdir), losses(uninterrupted)
    assert sorted(multi) == [1, 2, 3, 4]
    np.testing.assert_allclose([multi[s] for s in range(1, 5)], [single[s] for s in range(1, 5)], rtol=2e-5)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from lima_jax.data import pipeline
    from lima_jax.train import loop

    calls = {"n": 0}
    real = pipeline.global_batch

    def poisoned(batch, mesh):  # step 6's data is corrupt
        calls["n"] += 1
        if calls["n"] == 6:
            batch = dict(batch, loss_weights=batch["loss_weights"] * np.nan)
        return real(batch, mesh)

    monkeypatch.setattr(pipeline, "global_batch", poisoned)
    config = tiny_config(epochs=3, checkpoint_every_steps=4)
    with pytest.raises(loop.NonFiniteLoss, match="at step 6; stopping .rerunning resumes from checkpoint 4 "):
        loop.train(config, tmp_path)
    ckpts = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts == [4]  # every 4 steps (epoch 1's step 3 not kept): nothing saved after the bad step 6


def test_training_starts_from_converted_weights(tmp_path):
    """init_checkpoint: weights converted from a Hugging Face folder are what the run trains.
    With a zero learning rate the saved parameters must be the converted ones, bitwise; dev
    answers are written next to each epoch's checkpoint."""
    import jax

    from lima_jax.config import model_config
    from lima_jax.convert.to_orbax import convert_to_orbax
    from lima_jax.train import loop
    from tests.references import hf_model

    config = tiny_config(epochs=1, sample_dev_prompts=2, eval_every_epoch=True, sample_max_new_tokens=8)
    config.optimizer.update(learning_rate=0.0, end_learning_rate=0.0)
    cfg = model_config(config)
    hf = hf_model(cfg)
    hf.config.save_pretrained(tmp_path / "hf")
    hf.save_pretrained(tmp_path / "hf")
    convert_to_orbax("hf", tmp_path / "hf", tmp_path / "converted", vocab_multiple=cfg.vocab_multiple)
    config.init_checkpoint = str(tmp_path / "converted")
    loop.train(config, tmp_path / "run")
    _, trained = final_params(tmp_path / "run")
    from lima_jax.convert.layout import params_from_hf

    expected = params_from_hf({k: v.numpy() for k, v in hf.state_dict().items()}, cfg)
    jax.tree.map(np.testing.assert_array_equal, trained, expected)
    samples = list((tmp_path / "run" / "dev_samples").glob("epoch01_*.jsonl"))
    answers = [json.loads(line) for line in samples[0].read_text().splitlines()]
    assert len(answers) == 2 and all("answer" in a and a["prompt"] for a in answers)
