"""A small model config and random packed batches for the loss/sharding/train-step tests.
Not a test module: test modules import from here, never from each other."""

import jax
import numpy as np

from lima_jax.model import ModelConfig

jax.config.update("jax_default_matmul_precision", "highest")

CFG = ModelConfig(vocab_size=250, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_multiple=16,
                  remat_policy="full")


def random_batch(rows=8, seq=32, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CFG.vocab_size, (rows, seq + 1))
    seg = np.cumsum(rng.random((rows, seq)) < 0.1, axis=1) + 1  # packed-looking rows
    positions = np.zeros_like(seg)
    for r in range(rows):
        for t in range(1, seq):
            positions[r, t] = 0 if seg[r, t] != seg[r, t - 1] else positions[r, t - 1] + 1
    return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], positions=positions, segment_ids=seg,
                loss_weights=(rng.random((rows, seq)) < 0.7).astype(np.float32))
