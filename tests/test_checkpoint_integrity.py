"""Checkpoints cannot lie (issue 25): a fingerprint of every saved array that any flipped bit
changes, checked on every restore with non-finite values; training steps back past a damaged
checkpoint; readers refuse a damaged step they were asked for by name."""

import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lima_jax import checkpoint as ckpt, fingerprints as fp
from lima_jax.errors import DamagedCheckpoint
from lima_jax.model import ModelConfig, abstract_params, init_params
from lima_jax.train import loop
from tests.checkpoint_faults import flip_bit, save_nan, stored_arrays
from tests.conftest import ROOT, cpu_env
from tests.tiny_run import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int32"])
def test_every_single_bit_flip_changes_the_fingerprint(dtype):
    """Every bit of a few elements flipped, one at a time: each gives another fingerprint, on
    the devices and on the host (the converter's) alike."""
    x = np.asarray(jax.random.normal(jax.random.key(0), (3, 4, 5)) * 50).astype(jnp.dtype(dtype))
    clean = fp.fingerprints({"w": jnp.asarray(x)})["w"]
    host = fp.HostFingerprint()
    for layer in range(3):  # the converter's order: one layer at a time, here backwards
        host.add(x[2 - layer], (2 - layer) * x[0].size)
    assert host.hex() == clean
    bits = 8 * x.dtype.itemsize
    for index in (0, 17, x.size - 1):
        flipped = set()
        for bit in range(bits):
            y = x.copy()
            y.reshape(-1).view(f"uint{bits}")[index] ^= 1 << bit
            flipped.add(fp.fingerprints({"w": jnp.asarray(y)})["w"])
        assert clean not in flipped and len(flipped) == bits  # each flip of an element its own fingerprint


def _converted(tmp_path):
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=64)
    params = init_params(cfg, jax.random.key(0))
    ckpt.save_params(tmp_path / "ckpt", params, {"model": cfg.__dict__})
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = abstract_params(cfg)
    return params, abstract, jax.tree.map(lambda _: device, abstract)


def test_a_flipped_bit_in_saved_params_is_refused_with_its_leaf(tmp_path):
    params, abstract, shardings = _converted(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, ckpt.restore_params(tmp_path / "ckpt", abstract, shardings), params)
    name = [n for n in stored_arrays(tmp_path / "ckpt" / "0" / "params") if "layers" in n][0]
    flip_bit(tmp_path / "ckpt" / "0" / "params", name, flat_index=5, bit=0)  # the lowest mantissa bit
    with pytest.raises(DamagedCheckpoint, match=f"{name.replace('.', '/')} differ from their fingerprints"):
        ckpt.restore_params(tmp_path / "ckpt", abstract, shardings)
    # read in another dtype (a LoRA base in bfloat16): still checked, in the dtype it was saved in
    bf16 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), abstract)
    with pytest.raises(DamagedCheckpoint, match="differ from their fingerprints"):
        ckpt.restore_params(tmp_path / "ckpt", bf16, shardings)


def test_a_params_tree_read_in_another_dtype_restores_cast(tmp_path):
    params, abstract, shardings = _converted(tmp_path)
    bf16 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), abstract)
    restored = ckpt.restore_params(tmp_path / "ckpt", bf16, shardings)
    jax.tree.map(lambda r, p: np.testing.assert_array_equal(r, p.astype(jnp.bfloat16)), restored, params)
    assert {x.dtype for x in jax.tree.leaves(restored)} == {jnp.dtype(jnp.bfloat16)}


def test_a_subtree_restores_in_the_saved_and_in_another_dtype(tmp_path):
    """The int8 LoRA base's path: some leaves only, checked like the whole tree."""
    params, abstract, shardings = _converted(tmp_path)
    for dtype in (jnp.float32, jnp.bfloat16):
        part = {"layers": {"mlp": {"w1": jax.ShapeDtypeStruct(abstract["layers"]["mlp"]["w1"].shape, dtype)}}}
        where = {"layers": {"mlp": {"w1": shardings["layers"]["mlp"]["w1"]}}}
        restored = ckpt.restore_params(tmp_path / "ckpt", part, where, part=True)
        np.testing.assert_array_equal(restored["layers"]["mlp"]["w1"], params["layers"]["mlp"]["w1"].astype(dtype))


def test_newest_good_steps_back_from_a_work_dir_and_refuses_a_named_step(tmp_path):
    params, abstract, shardings = _converted(tmp_path)
    shutil.copytree(tmp_path / "ckpt" / "0", tmp_path / "ckpt" / "5")  # a later step, then damaged
    flip_bit(tmp_path / "ckpt" / "5" / "params", stored_arrays(tmp_path / "ckpt" / "5" / "params")[0])
    warnings = []

    def load(step_dir):
        return int(step_dir.name), ckpt.restore_params(step_dir, abstract, shardings)

    step, restored = ckpt.newest_good(tmp_path / "ckpt", load, warnings.append)
    assert step == 0 and "step 5 is damaged" in warnings[0]
    jax.tree.map(np.testing.assert_array_equal, restored, params)
    with pytest.raises(DamagedCheckpoint, match="named explicitly"):
        ckpt.newest_good(tmp_path / "ckpt" / "5", load, warnings.append)


def test_the_hf_export_passes_over_a_damaged_step_and_refuses_it_by_name(tmp_path, capsys):
    from safetensors.numpy import load_file

    from lima_jax.convert import export_hf

    _converted(tmp_path)
    export_hf(tmp_path / "ckpt" / "0", tmp_path / "reference")
    shutil.copytree(tmp_path / "ckpt" / "0", tmp_path / "ckpt" / "5")  # a later step, then damaged
    flip_bit(tmp_path / "ckpt" / "5" / "params", "layers.mlp.w1", flat_index=7, bit=30)
    export_hf(tmp_path / "ckpt", tmp_path / "fallback")
    assert "step 5 is damaged" in capsys.readouterr().err
    for shard in (tmp_path / "reference").glob("*.safetensors"):
        ours = load_file(tmp_path / "fallback" / shard.name)
        jax.tree.map(np.testing.assert_array_equal, ours, load_file(shard))
    with pytest.raises(DamagedCheckpoint, match="layers/mlp/w1 differ from their fingerprints"):
        export_hf(tmp_path / "ckpt" / "5", tmp_path / "named")
    assert not (tmp_path / "named").exists() and not any(tmp_path.glob("named.tmp*"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run's work dir with checkpoints at steps 3 (epoch 1, kept) and 4."""
    workdir = tmp_path_factory.mktemp("run")
    cache = tmp_path_factory.mktemp("xla_cache")
    config = tiny_config(max_steps=4, checkpoint_every_steps=4, keep_epochs=(1,), compilation_cache_dir=str(cache))
    loop.train(config, workdir)
    return workdir, config


@pytest.mark.parametrize("damage", ["params bit", "opt_state bit", "opt_state nan"])
def test_training_resumes_from_the_step_before_a_damaged_one(trained, tmp_path, capsys, damage):
    workdir, config = trained
    shutil.copytree(workdir, tmp_path / "run")
    step4 = tmp_path / "run" / "checkpoints" / "4"
    item = damage.split()[0]
    name = [n for n in stored_arrays(step4 / item) if "mu" in n or item == "params"][-1]
    if damage.endswith("nan"):
        save_nan(step4 / item, name)
        reason = "its opt_state hold non-finite values"
    else:
        flip_bit(step4 / item, name, bit=7)
        reason = f"the {item} array(s) {name.replace('.', '/')} differ from their fingerprints"
    config = config.copy_and_resolve_references()
    config.train.max_steps = 5
    capsys.readouterr()
    loop.train(config, tmp_path / "run")
    out = capsys.readouterr().out
    assert "/4 is damaged" in out and reason in out and "checkpoints/3\n" in out, out[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "damaged" / "4").is_dir()


def test_sample_py_answers_as_the_step_before_a_damaged_one_and_refuses_it_by_name(trained, tmp_path):
    """sample.py given the work dir: the newest step fails its fingerprints, so the answer is the
    previous step's (the reference: that step named explicitly), with a warning on stderr;
    the damaged step named explicitly is refused with exit status 2."""
    workdir, _ = trained
    shutil.copytree(workdir, tmp_path / "run")
    step4 = tmp_path / "run" / "checkpoints" / "4"
    flip_bit(step4 / "params", stored_arrays(step4 / "params")[0], flat_index=3, bit=20)

    def sample(checkpoint):
        cmd = [sys.executable, str(ROOT / "launch" / "sample.py"), "--checkpoint", str(checkpoint), "--prompt",
               "Tell me about the sea.", "--format", "raw", "--temperature", "1.0", "--top_p", "1.0", "--seed", "3",
               "--max_new_tokens", "12", "--nostream"]  # seeded sampling: an early model's greedy answer is empty
        return subprocess.run(cmd, env=cpu_env(1, fast_compile=True), capture_output=True, text=True, timeout=600,
                              cwd=ROOT)

    fallback, reference = sample(tmp_path / "run"), sample(tmp_path / "run" / "checkpoints" / "3")
    assert reference.returncode == 0 and reference.stdout.strip(), reference.stderr[-2000:]
    assert fallback.returncode == 0 and fallback.stdout == reference.stdout, fallback.stderr[-2000:]
    assert "checkpoint step 4 is damaged" in fallback.stderr and "differ from their fingerprints" in fallback.stderr
    named = sample(step4)
    assert named.returncode == 2 and "damaged checkpoint" in named.stderr and "named explicitly" in named.stderr
