"""The tiny LoRA demo (configs/tiny_lora.py) end to end on 8 emulated CPU devices, adapting a
tiny base trained here with configs/tiny.py: it overfits the demo data as full fine-tuning
from the same base does (the reference run), its checkpoints hold
only the adapters (and name their base), it resumes exactly after SIGKILL, and its PEFT export
loaded by `peft` onto the Hugging Face export of the base decodes the same greedy tokens as
lima_jax's sampler (the independent reference: transformers + peft)."""

import subprocess
import time

import numpy as np
import pytest

from tests.tiny_run import finish, launch, losses, metric_rows, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")
BASE_EPOCHS = 3  # the base: the full demo run stopped early, so LoRA has something left to learn
EPOCHS = 8  # of the LoRA run (the demo's 15 take longer than a test should)


RESUME_EPOCHS = 3  # the resume test stops at the end of epoch 3 (step 9), a step the uninterrupted run keeps


def launch_lora(workdir, cache, base, *overrides) -> subprocess.Popen:
    return launch(workdir, cache, f"--config.init_checkpoint={base}", f"--config.train.epochs={EPOCHS}",
                  f"--config.train.keep_epochs=({RESUME_EPOCHS},)", *overrides, config="tiny_lora.py")


def steps_saved(workdir) -> list[int]:
    ckpts = workdir / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []


def adapters(workdir) -> dict:
    from lima_jax import model_store

    meta = model_store.read_meta(workdir)
    return meta, model_store.read_adapters(workdir, meta.lora.settings)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from lima_jax.train import loop

    workdir = tmp_path_factory.mktemp("base")
    loop.train(tiny_config(epochs=BASE_EPOCHS), workdir)
    return workdir


@pytest.fixture(scope="module")
def full(tmp_path_factory, base):
    """The reference: full fine-tuning from the same base for the same epochs."""
    from lima_jax.train import loop

    workdir = tmp_path_factory.mktemp("full")
    config = tiny_config(epochs=EPOCHS, eval_every_epoch=True)
    config.init_checkpoint = str(base)
    loop.train(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache, base):
    workdir = tmp_path_factory.mktemp("lora")
    finish(launch_lora(workdir, cache, base))
    return workdir


def first_and_last_loss(workdir) -> tuple[float, float]:
    loss = losses(workdir)
    steps = sorted(loss)
    return loss[steps[0]], float(np.mean([loss[s] for s in steps[-4:]]))


def dev_losses(workdir) -> list[float]:
    return [r["dev_loss"] for r in metric_rows(workdir) if "dev_loss" in r]


def test_lora_demo_overfits_like_full_fine_tuning_and_saves_only_adapters(uninterrupted, base, full):
    (first, last), (full_first, full_last) = first_and_last_loss(uninterrupted), first_and_last_loss(full)
    assert abs(first - full_first) < 0.01  # both start as the base (b = 0)
    assert first - last > 0.8 * (full_first - full_last), (first, last, full_first, full_last)  # measured: 94%
    dev, full_dev = dev_losses(uninterrupted), dev_losses(full)
    assert len(dev) == EPOCHS and dev[-1] < 1.15 * full_dev[-1], (dev, full_dev)

    meta, trained = adapters(uninterrupted)
    assert meta.lora.base_checkpoint == str(base) and meta.lora.settings.rank == 16
    step = steps_saved(uninterrupted)[-1]
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())  # noqa: E731
    lora_step, base_step = uninterrupted / "checkpoints" / str(step), base / "checkpoints" / str(steps_saved(base)[-1])
    assert size(lora_step / "params") < size(base_step / "params") / 3  # adapters only
    assert size(lora_step / "opt_state") < size(base_step / "opt_state") / 3  # their moments only
    assert np.abs(trained["layers"]["mlp"]["w2"]["b"]).max() > 0 and np.abs(trained["lm_head"]["b"]).max() > 0


def test_resume_after_sigkill_is_exact(tmp_path, cache, base, uninterrupted):
    workdir = tmp_path / "interrupted"
    stop = steps_saved(uninterrupted)[0]  # the end of epoch RESUME_EPOCHS
    stop_at = f"--config.train.max_steps={stop}"
    proc = launch_lora(workdir, cache, base, stop_at)
    start = time.time()
    while not steps_saved(workdir):  # SIGKILL as soon as the first checkpoint is complete
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() - start < 300
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    resumed_from = steps_saved(workdir)[-1]
    assert resumed_from < stop
    out = finish(launch_lora(workdir, cache, base, stop_at))
    assert f"resuming from {workdir / 'checkpoints'}/{resumed_from}" in out and "LoRA base (frozen, bfloat16)" in out
    (meta_a, a), (meta_b, b) = adapters(uninterrupted / "checkpoints" / str(stop)), adapters(workdir)
    assert meta_a.step == meta_b.step == stop
    import jax

    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert losses(workdir) == {step: loss for step, loss in losses(uninterrupted).items() if step <= stop}


def test_peft_export_decodes_as_the_sampler(tmp_path, uninterrupted, base):
    import peft
    import torch
    import transformers

    from lima_jax.convert import export_hf
    from lima_jax.convert.lora_export import export_peft
    from lima_jax.sampling import SamplingSettings
    from lima_jax.sampling.sampler import load_sampler

    # The base as training held it (bfloat16), read by transformers in float32 like our compute.
    export_hf(base, tmp_path / "base_hf", dtype="bfloat16")
    export_peft(uninterrupted, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base_hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf", dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()

    sampler, _ = load_sampler(str(uninterrupted))
    settings = SamplingSettings(greedy=True, repetition_penalty=1.0, max_new_tokens=24)
    prompts = ["What is 25 plus 26?", "Which is larger, 257 or 121?", "Spell the word cat backwards."]
    for prompt in prompts:
        ids = sampler.prompt_ids(prompt)
        [ours] = sampler.generate_ids([ids], settings)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24, repetition_penalty=1.0,
                                 eos_token_id=list(sampler.stop_ids), pad_token_id=2)[0, len(ids):].tolist()
        theirs = out[:-1] if out and out[-1] in sampler.stop_ids else out
        assert ours["ids"] == theirs, (prompt, ours, out)

    # The merged Hugging Face export of the LoRA checkpoint is the PEFT model.
    export_hf(uninterrupted, tmp_path / "merged_hf")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged_hf", dtype=torch.float32).eval()
    tokens = torch.tensor([sampler.prompt_ids(prompts[0])])
    with torch.no_grad():
        np.testing.assert_allclose(merged(tokens).logits.numpy(), model(tokens).logits.numpy(), atol=1e-4, rtol=0)
