"""Masked next-token cross-entropy that never holds float32 logits for the whole batch.

The hidden states are cut along the sequence into `chunks` pieces; each piece's logits are
computed, reduced to (logsumexp - target logit) and dropped, under `jax.checkpoint` so the
backward pass recomputes them piece by piece too. At 65B a [tokens, 32k] float32 logits
array costs gigabytes per device; on CPU 4 chunks are also faster than one (notes).
"""

import jax
import jax.numpy as jnp

from lima_jax.model import bind


def cross_entropy_sum(model, hidden, targets, weights, chunks: int):
    """sum(weights * -log p(targets)) over [B, S]; `model.logits` maps [..., D] -> [..., V]."""
    b, s, d = hidden.shape
    n = chunks if chunks > 0 and s % chunks == 0 else 1

    def split(x):  # [B, S, ...] -> [n, B, S/n, ...], keeping the batch axis (and its sharding)
        return jnp.moveaxis(x.reshape(b, n, s // n, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def piece(total, xs):
        h, t, w = xs
        logits = model.logits(h)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
        return total + jnp.sum(nll * w), None

    total, _ = jax.lax.scan(piece, jnp.zeros((), jnp.float32), (split(hidden), split(targets), split(weights.astype(jnp.float32))))
    return total


def lm_loss(cfg, params, batch, dropout_key=None):
    """(mean loss per target token, (sum of losses, number of target tokens)).

    batch: `tokens`, `targets`, `positions`, `segment_ids` [B, S] int32 and `loss_weights`
    [B, S] (1 on assistant tokens and their EOT). The loss is normalised per target token,
    so packing many short examples in a row weighs every token the same.
    """
    model = bind(cfg, params)
    hidden, _ = model.hidden(batch["tokens"], batch["positions"], batch["segment_ids"], dropout_key)
    total = cross_entropy_sum(model, hidden, batch["targets"], batch["loss_weights"], cfg.logits_chunks)
    count = jnp.sum(batch["loss_weights"].astype(jnp.float32))
    return total / jnp.maximum(count, 1.0), (total, count)
