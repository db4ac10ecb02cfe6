"""Attention kernels behind one signature, chosen by `config.model.attention`.

`attend(q, k, v, mask)`: head-major q [B, H, S, D], k and v [B, KV, T, D] with H a multiple
of KV, mask [B, S, T] (True = may attend) -> [B, H, S, D]. Grouped-query attention reshapes
the queries to [B, KV, H/KV, S, D] (a free reshape: heads of a group are adjacent) so each
K/V head serves its group without K/V ever being repeated.

- `xla`: plain einsums + float32 softmax; runs everywhere, the reference for the others.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` (GPU fused attention).
- `splash`: TPU Pallas splash attention (the seam is here; see the speed issue).
"""

import jax
import jax.numpy as jnp


def attend(q, k, v, mask, impl: str = "xla", causal: bool = False):
    """`causal`: the caller promises that `mask` is False wherever key slot > query slot and
    queries and keys share slots (training, no cache): fully masked blocks are then skipped."""
    if impl == "xla":
        return xla_attention(q, k, v, mask, causal)
    if impl == "cudnn":
        seq_major = lambda x: x.swapaxes(1, 2)  # noqa: E731  jax.nn wants [B, T, N, D]
        out = jax.nn.dot_product_attention(seq_major(q), seq_major(k), seq_major(v), mask=mask[:, None],
                                           implementation="cudnn")
        return seq_major(out)
    raise NotImplementedError(f"config.model.attention={impl!r} is not available in this build")


# Causal path: the queries are cut into CAUSAL_BLOCKS blocks and block i attends to keys
# [0, (i + 1) * S / n) only, (n + 1) / 2n of the full score matrix (56% at n = 8). The skipped
# keys are masked for every query of the block, so they could only add exp(-huge) = 0 terms.
# bench-110m (S = 512), one layer's attention forward + backward on 2 cores: 0.60 s in full,
# 0.41 s with 2 blocks, 0.33 s with 4, 0.29 s with 8.
CAUSAL_BLOCKS = 8


def xla_attention(q, k, v, mask, causal: bool = False):
    b, h, s, d = q.shape
    kv, t = k.shape[1], k.shape[2]
    q = (q * jnp.asarray(d**-0.5, q.dtype)).reshape(b, kv, h // kv, s, d)
    n = CAUSAL_BLOCKS
    if not causal or s != t or s % n or s < 8 * n:
        return _attention(q, k, v, mask).reshape(b, h, s, d)
    blk = s // n
    outs = [_attention(q[:, :, :, i * blk:(i + 1) * blk], k[:, :, :(i + 1) * blk], v[:, :, :(i + 1) * blk],
                       mask[:, i * blk:(i + 1) * blk, :(i + 1) * blk]) for i in range(n)]
    return jnp.concatenate(outs, axis=3).reshape(b, h, s, d)


def _attention(q, k, v, mask):
    """q [B, KV, G, S, D] (already scaled), k and v [B, KV, T, D], mask [B, S, T]."""
    scores = jnp.einsum("bkgsd,bktd->bkgst", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgst,bktd->bkgsd", probs, v)
