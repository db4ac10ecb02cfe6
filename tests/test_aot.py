"""launch/aot_check.py compiles the real train step for TPU topologies on this CPU machine."""

import json
import os
import subprocess
import sys

import pytest

from lima_jax.aot import parse_topology
from tests.conftest import ROOT

pytest.importorskip("libtpu")


def run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, str(ROOT / "launch" / "aot_check.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_slice_names_map_to_cloud_tpu_shapes():
    assert parse_topology("v4-8")[1:] == (4, "2x2x1")
    assert parse_topology("v4-256")[1:] == (128, "4x4x8")
    assert parse_topology("v5p-128")[1:] == (64, "4x4x4")
    assert parse_topology("v5e-16")[1:] == (16, "4x4")
    with pytest.raises(ValueError, match="v4-N"):
        parse_topology("v4_8")


def test_tiny_fits_a_small_slice_and_reports_memory(tmp_path):
    out = tmp_path / "report.json"
    r = run("--config", "configs/tiny.py", "--topology", "v5e-4", f"--json={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("verdict: FITS") == 2  # the train step and the server's decode step
    train, decode = json.loads(out.read_text())
    assert (train["step"], decode["step"]) == ("train", "decode")
    assert train["devices"] == 4 and train["mesh"] == {"data": 1, "fsdp": 4, "context": 1, "tensor": 1}
    assert 0 < train["total_gib"] < train["hbm_gib"] == 16
    assert train["compiler_flops_per_device"] > 0
    assert (decode["rows"], decode["seq_len"]) == (16, 512)  # serve.py's 16 slots over the whole context


def test_oversized_config_is_reported_as_not_fitting():
    # LLaMA-7B with full fine-tuning state on one 16 GiB v5e chip cannot fit (params+Adam ~ 80 GiB).
    r = run("--config", "configs/llama7b.py", "--topology", "v5e-1", "--config.model.n_layers=4", "--nodecode")
    assert r.returncode != 0
    assert "DOES NOT FIT" in r.stdout + r.stderr


def test_splash_attention_compiles_for_tpu(tmp_path):
    # The Pallas kernels go through Mosaic (libtpu's compiler) here; their numerics are checked
    # against the XLA path in tests/test_attention.py (interpreted).
    out = tmp_path / "report.json"
    r = run("--config", "configs/tiny.py", "--topology", "v5e-4", "--config.model.attention=splash", "--nodecode",
            f"--json={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    (train,) = json.loads(out.read_text())
    assert train["attention"] == "splash" and train["fits"]
    assert train["pallas_kernels"] >= 3  # forward, dq and dkv kernels of the layer


def test_optimizer_state_offload_is_compiled_and_reported(tmp_path):
    # The moments leave HBM for host memory: the compiler's host arguments are their bytes.
    import jax

    from lima_jax.config import model_config
    from lima_jax.model import abstract_params
    from tests.tiny_run import tiny_config

    out = tmp_path / "report.json"
    r = run("--config", "configs/tiny.py", "--topology", "v5e-4", "--config.train.opt_state_memory=pinned_host",
            "--nodecode", f"--json={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    (train,) = json.loads(out.read_text())
    assert train["opt_state_memory"] == "pinned_host" and train["fits"]
    assert "offload: optimizer state in pinned_host memory" in r.stdout
    params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_params(model_config(tiny_config()))))
    # mu and nu over fsdp 4, and less than twice that (the TPU layouts pad some of the tiny shapes)
    assert 2 * params / 4 <= train["host_argument_gib"] * 2**30 < 2 * 2 * params / 4
    assert train["argument_gib"] < train["host_argument_gib"]  # on device: the parameters (half the moments), the batch
