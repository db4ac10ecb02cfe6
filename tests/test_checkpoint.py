"""Checkpoint paths as users type them: relative local paths work (Orbax wants absolute ones)."""

import jax
import numpy as np

from lima_jax import checkpoint as ckpt
from lima_jax.model import ModelConfig, abstract_params, init_params


def test_relative_paths_save_and_restore(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=64)
    params = init_params(cfg, jax.random.key(0))
    ckpt.save_params("converted", params, {"model": cfg.__dict__})
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = abstract_params(cfg)
    restored = ckpt.restore_params("converted", abstract, jax.tree.map(lambda _: device, abstract))
    jax.tree.map(np.testing.assert_array_equal, restored, params)
    assert ckpt.read_meta_json("converted/0")["model"]["dim"] == 32
