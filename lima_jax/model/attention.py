"""Attention kernels behind one signature, chosen by `config.model.attention`.

`attend(q, k, v, mask)`: q [B, S, H, D], k and v [B, T, KV, D] with H a multiple of KV, mask
[B, S, T] (True = may attend). Grouped-query attention reshapes the queries to
[B, KV, H/KV, S, D] so each K/V head serves its group without K/V ever being repeated.

- `xla`: plain einsums + float32 softmax; runs everywhere, the reference for the others.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` (GPU fused attention).
- `splash`: TPU Pallas splash attention (the seam is here; see the speed issue).
"""

import jax
import jax.numpy as jnp


def attend(q, k, v, mask, impl: str = "xla"):
    if impl == "xla":
        return xla_attention(q, k, v, mask)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")
    raise NotImplementedError(f"config.model.attention={impl!r} is not available in this build")


def xla_attention(q, k, v, mask):
    b, s, h, d = q.shape
    kv = k.shape[2]
    # Heads before sequence: on XLA:CPU the score/value einsums run ~1.5x faster in this
    # layout than with the sequence axis in the middle (see notes/xla-cpu-performance.md).
    q = (q * jnp.asarray(d**-0.5, q.dtype)).reshape(b, s, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    k = k.transpose(0, 2, 1, 3)
    v = v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkgsd,bktd->bkgst", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,bktd->bkgsd", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)
