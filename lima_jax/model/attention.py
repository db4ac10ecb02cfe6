"""Attention kernels behind one signature, chosen by `config.model.attention`.

`attend(q, k, v, mask)`: head-major q [B, H, S, D], k and v [B, KV, T, D] with H a multiple
of KV, and an `AttentionMask` (`AttentionMask.packed` for training, `.over_cache` for
decoding) -> [B, H, S, D]. Grouped-query attention reshapes the queries
to [B, KV, H/KV, S, D] (a free reshape: heads of a group are adjacent) so each K/V head
serves its group without K/V ever being repeated.

- `xla`: plain einsums + float32 softmax; runs everywhere, the reference for the others. In
  training it skips the fully masked key blocks above the diagonal (`causal_blocks`).
- `cudnn`: cuDNN's fused flash attention through `jax.nn.dot_product_attention` (GPU), for
  training: causal, so cuDNN skips the tiles above the diagonal, with the packed segments as
  a mask.
- `splash`: the TPU Pallas splash-attention kernel (block-sparse flash attention) for
  training.
Decoding with a KV cache uses `xla` under every setting: one query a step over a cache gains
nothing from a flash kernel.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lima_jax import backend
from lima_jax.sharding import logical_to_spec


class AttentionMask(NamedTuple):
    """Which keys each query may see, in the forms the kernels want.

    allowed: [B, S, T] bool, True = may attend.
    segment_ids: [B, S], given only when queries and keys are the same S tokens and
      `allowed` is exactly "causal and same segment" (training, no cache). The xla path then
      skips fully masked blocks and splash builds its mask from the ids instead of `allowed`.
    """

    allowed: jax.Array
    segment_ids: jax.Array | None = None

    @classmethod
    def packed(cls, segment_ids: jax.Array) -> "AttentionMask":
        """Training: queries and keys are the same packed [B, S] tokens."""
        slots = jnp.arange(segment_ids.shape[1])[None, :]
        return cls(_causal_same_segment(slots, slots, segment_ids, segment_ids), segment_ids)

    @classmethod
    def over_cache(cls, segment_ids: jax.Array, cache_segment_ids: jax.Array, cache_index: jax.Array) -> "AttentionMask":
        """Decoding: the S new tokens [B, S], at slots cache_index[b] + s, see the cache's T slots
        whose segment ids [B, T] already include theirs."""
        q_slots = cache_index[:, None] + jnp.arange(segment_ids.shape[1])
        k_slots = jnp.arange(cache_segment_ids.shape[1])[None, :]
        return cls(_causal_same_segment(q_slots, k_slots, segment_ids, cache_segment_ids))


def _causal_same_segment(q_slots: jax.Array, k_slots: jax.Array, q_segments: jax.Array,
                         k_segments: jax.Array) -> jax.Array:
    """[B, S, T]: causal by slot, and never across packed examples or into another segment's padding."""
    causal = k_slots[:, None, :] <= q_slots[:, :, None]
    return causal & (k_segments[:, None, :] == q_segments[:, :, None])


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, impl: str = "xla",
           causal_blocks: int | None = None) -> jax.Array:
    """q [B, H, S, D], k and v [B, KV, T, D] -> [B, H, S, D] by the kernel `impl`; decoding (a
    mask without segment ids) always takes xla. `causal_blocks`: see `xla_attention`."""
    causal = mask.segment_ids is not None
    if impl == "splash" and causal:
        return splash_attention(q, k, v, mask.segment_ids)
    if impl == "cudnn" and causal:
        return cudnn_attention(q, k, v, mask.segment_ids)
    return xla_attention(q, k, v, mask.allowed, causal, causal_blocks)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, causal: bool = False,
                  causal_blocks: int | None = None) -> jax.Array:
    """Plain einsums, mask [B, S, T]. With `causal` (keys are the queries' own tokens and `mask`
    is causal within them) the queries are cut into `causal_blocks` blocks (None: the backend's
    choice, lima_jax.backend) and block i attends to keys [0, (i + 1) S / n) only: the keys it
    skips are masked for all its queries, so the result is exact, from (n + 1) / 2n of the scores."""
    b, h, s, d = q.shape
    kv, t = k.shape[1], k.shape[2]
    q = (q * jnp.asarray(d**-0.5, q.dtype)).reshape(b, kv, h // kv, s, d)
    n = backend.tuning().causal_blocks if causal_blocks is None else causal_blocks
    if not causal or n == 1 or s != t or s % n or s < 8 * n:
        return _attention(q, k, v, mask).reshape(b, h, s, d)
    blk = s // n
    outs = [_attention(q[:, :, :, i * blk:(i + 1) * blk], k[:, :, :(i + 1) * blk], v[:, :, :(i + 1) * blk],
                       mask[:, i * blk:(i + 1) * blk, :(i + 1) * blk]) for i in range(n)]
    return jnp.concatenate(outs, axis=3).reshape(b, h, s, d)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B, KV, G, S, D] (already scaled), k and v [B, KV, T, D], mask [B, S, T].

    The softmax is normalised after the value product (flash attention's order): the sum
    divides [.., S, D] outputs instead of [.., S, T] probabilities, and the row maximum is a
    constant to autodiff (softmax does not depend on it). The row maximum contributes
    exp(0) = 1, so the sum is >= 1 even for a fully masked row."""
    scores = jnp.einsum("bkgsd,bktd->bkgst", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    unnormalised = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    out = jnp.einsum("bkgst,bktd->bkgsd", unnormalised.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / jnp.sum(unnormalised, axis=-1, keepdims=True)).astype(v.dtype)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Causal attention within segments by cuDNN's fused kernel (GPU; bfloat16 or float16):
    q [B, H, S, D], k and v [B, KV, S, D], segment_ids [B, S] -> [B, H, S, D]. The causal
    part is cuDNN's own mask (it skips the tiles above the diagonal); the segments enter as
    a same-segment mask, which cuDNN adds to the scores as a bias."""
    seq_major = lambda x: x.swapaxes(1, 2)  # noqa: E731  jax.nn wants [B, T, N, D]
    same_segment = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    out = jax.nn.dot_product_attention(seq_major(q), seq_major(k), seq_major(v), mask=same_segment, is_causal=True,
                                       implementation="cudnn")
    return seq_major(out)


# Splash tiles: up to 512 queries x 512 keys (MaxText's default on v4/v5p), forward and backward
# alike. The kernel wants tiles that are multiples of the 128 TPU lanes and divide the sequence.
SPLASH_BLOCK = 512


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     interpret: bool = False) -> jax.Array:
    """Causal attention within segments by the Pallas TPU splash kernel: q [B, H, S, D], k and
    v [B, KV, S, D], segment_ids [B, S] -> [B, H, S, D]. Blocks above the diagonal are skipped
    and the [S, S] scores never reach HBM; the backward pass is the kernel's own.

    The kernel sees one device's shard: under a mesh it runs inside `shard_map` with the
    batch and heads split as `sharding.RULES` split the activations, one kernel per local
    example (vmap). `interpret=True` runs the kernel's interpreter (any backend; for tests).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # TPU kernels: imported on use

    s, d = q.shape[2], q.shape[3]
    block = math.gcd(SPLASH_BLOCK, s)
    if block % 128:
        raise ValueError(f"model.attention='splash' needs a sequence length that is a multiple of 128, got {s}")

    def local(q, k, v, segment_ids):
        sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
        mask = splash.MultiHeadMask([splash.CausalMask((s, s))] * q.shape[1])
        kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
        ids = splash.SegmentIds(q=segment_ids, kv=segment_ids)
        return jax.vmap(kernel)(q * jnp.asarray(d**-0.5, q.dtype), k, v, ids)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, segment_ids)
    spec = lambda *names: logical_to_spec(names, mesh.axis_names)  # noqa: E731
    q_spec, kv_spec = spec("batch", "act_heads", "length", None), spec("batch", "act_kv_heads", "length", None)
    return jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec, spec("batch", "length")), out_specs=q_spec,
                         check_vma=False)(q, k, v, segment_ids)
