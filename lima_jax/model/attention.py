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


def attend(q, k, v, mask, impl: str = "xla"):
    if impl == "xla":
        return xla_attention(q, k, v, mask)
    if impl == "cudnn":
        seq_major = lambda x: x.swapaxes(1, 2)  # noqa: E731  jax.nn wants [B, T, N, D]
        out = jax.nn.dot_product_attention(seq_major(q), seq_major(k), seq_major(v), mask=mask[:, None],
                                           implementation="cudnn")
        return seq_major(out)
    raise NotImplementedError(f"config.model.attention={impl!r} is not available in this build")


def xla_attention(q, k, v, mask):
    b, h, s, d = q.shape
    kv = k.shape[1]
    q = (q * jnp.asarray(d**-0.5, q.dtype)).reshape(b, kv, h // kv, s, d)
    scores = jnp.einsum("bkgsd,bktd->bkgst", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,bktd->bkgsd", probs, v)
    return out.reshape(b, h, s, d)
