"""The KV cache's writes: the new tokens' keys, values and segment ids into their slots.

The cache (allocated by lima_jax.sampling.decode.init_cache) is {"k", "v": [L, B, T, KV, D],
"segment_ids": [B, T]}; a forward pass over S new tokens writes them at slots index[b] ..
index[b] + S - 1 of each row b. The whole k and v ride through the layers and each layer
writes its own slice in place: slicing a layer out and writing it back would copy it three
times per decoded token.

Position-major ([.., T, KV, D], not head-major [.., KV, T, D] as attention reads it): it is the
layout the TPU compiler gives the cache inside the layer loop of a decode step (one query a
head against T keys); a head-major cache was copied whole into that layout and back at every
step, a second cache in temporaries (the 65B LoRA decode step did not fit v5p-8 for it).
Attention reads a layer's slice transposed.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

Cache = dict[str, jax.Array]  # {"k", "v": [L, B, T, KV, D], "segment_ids": [B, T]}


class LayerCache(NamedTuple):
    """One layer's view of the cache: every layer's k and v, which layer this is, where to write."""

    k: jax.Array  # [L, B, T, KV, D]
    v: jax.Array  # [L, B, T, KV, D]
    layer: jax.Array  # int32 scalar
    index: jax.Array  # [B] int32: slot of each row's first new token

    def append(self, k_new: jax.Array, v_new: jax.Array) -> tuple["LayerCache", jax.Array, jax.Array]:
        """Write k_new, v_new [B, KV, S, D] into this layer's slots; returns the updated cache and
        this layer's whole k and v [B, KV, T, D] in the new tokens' dtype, for attention."""
        k, v = (write_layer_rows(c, new.astype(c.dtype), self.layer, self.index)
                for c, new in ((self.k, k_new), (self.v, v_new)))
        k_layer, v_layer = (jax.lax.dynamic_index_in_dim(c, self.layer, 0, keepdims=False).astype(k_new.dtype)
                            .transpose(0, 2, 1, 3) for c in (k, v))
        return self._replace(k=k, v=v), k_layer, v_layer


def write_rows(buffer: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """buffer [B, T, ...] with new [B, S, ...] written at slot index[b] of each row b."""
    return jax.vmap(lambda buf, x, i: jax.lax.dynamic_update_slice_in_dim(buf, x, i, axis=0))(buffer, new, index)


def write_layer_rows(cache: jax.Array, new: jax.Array, layer: jax.Array, index: jax.Array) -> jax.Array:
    """cache [L, B, T, KV, D] with new [B, KV, S, D] written at [layer, b, index[b] + s]: one
    scatter into the carried buffer, which XLA updates in place."""
    rows = jnp.arange(new.shape[0])[:, None]
    slots = index[:, None] + jnp.arange(new.shape[2])[None, :]
    return cache.at[layer, rows, slots].set(new.transpose(0, 2, 1, 3), mode="promise_in_bounds")
