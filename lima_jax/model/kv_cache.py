"""The KV cache: its layout, and the writes of the new tokens' keys, values and segment ids.

The cache (allocated by lima_jax.sampling.decode.init_cache) is {"k", "v": [L, B, T, KV, D]
or [L, B, KV, T, D], "segment_ids": [B, T]}; a forward pass over S new tokens writes them at
slots index[b] .. index[b] + S - 1 of each row b. The whole k and v ride through the layers and
each layer writes its own slice in place: slicing a layer out and writing it back would copy it
three times per decoded token.

Two layouts, one per backend (`Layout.of(cfg)`: `model.kv_position_major`, None the backend's,
lima_jax.backend, for the program being traced):
- position-major [L, B, T, KV, D] (TPU, and GPU): the layout the TPU compiler gives the cache
  inside the layer loop of a decode step (one query a head against T keys); a head-major cache
  was copied whole into that layout and back at every step, a second cache in temporaries (65B
  LoRA on v5p-8: 20.58 GiB, 0.58 position-major). Attention reads a layer's slice transposed.
- head-major [L, B, KV, T, D] (CPU): attention's own order ([B, KV, T, D] a layer), read in
  place; reading a position-major layer transposed makes the CPU decode step at batch 4 over
  1,024 positions about 1.5x slower (docs/benchmarks.md).

`Layout` is the one place that knows the order: every shape, logical axis name, index and time
axis of a cache (and of the prefix cache's pool, the same layout cut into pages) comes from it.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lima_jax import backend
from lima_jax.model.config import ModelConfig

Cache = dict[str, jax.Array]  # {"k", "v": [L, B, T, KV, D] or [L, B, KV, T, D] (Layout), "segment_ids": [B, T]}


@dataclasses.dataclass(frozen=True)
class Layout:
    """The order of a cache's k and v: [L, B, T, KV, D] if `position_major`, else [L, B, KV, T, D]."""

    position_major: bool

    @classmethod
    def of(cls, cfg: ModelConfig) -> "Layout":
        """`cfg.kv_position_major`, None: the backend's for the program being traced."""
        chosen = cfg.kv_position_major
        return cls(backend.tuning().kv_position_major if chosen is None else chosen)

    @property
    def time_axis(self) -> int:
        """The positions' axis (T) of [L, B, ., ., D]."""
        return 2 if self.position_major else 3

    def _order(self, time, heads) -> tuple:
        return (time, heads) if self.position_major else (heads, time)

    def shape(self, cfg: ModelConfig, batch: int, length: int) -> tuple[int, ...]:
        """k's (and v's) shape for `batch` rows of `length` positions."""
        return (cfg.n_layers, batch, *self._order(length, cfg.n_kv_heads), cfg.head_dim)

    def axes(self, batch: str | None = "cache_batch", length: str | None = "cache_length") -> tuple:
        """k's logical axis names (lima_jax.sharding), with these names for B and T."""
        return ("cache_layers", batch, *self._order(length, "cache_kv_heads"), "cache_head_dim")

    def at(self, layer, batch, time) -> tuple:
        """The index of [L, B, ., ., D] at layer, batch and time (each an int, array or slice), all
        heads. With arrays for all three, the selection is [*their broadcast shape, KV, D] in
        either layout (NumPy puts the indexed axes first when a slice separates them)."""
        return (layer, batch, time) if self.position_major else (layer, batch, slice(None), time)

    def heads_first(self, layer: jax.Array) -> jax.Array:
        """One layer's slice [B, ., ., D] as attention reads it, [B, KV, T, D]."""
        return layer.transpose(0, 2, 1, 3) if self.position_major else layer


class LayerCache(NamedTuple):
    """One layer's view of the cache: every layer's k and v, which layer this is, where to write."""

    k: jax.Array  # [L, B, T, KV, D] or [L, B, KV, T, D]
    v: jax.Array  # as k
    layer: jax.Array  # int32 scalar
    index: jax.Array  # [B] int32: slot of each row's first new token
    layout: Layout

    def append(self, k_new: jax.Array, v_new: jax.Array) -> tuple["LayerCache", jax.Array, jax.Array]:
        """Write k_new, v_new [B, KV, S, D] into this layer's slots; returns the updated cache and
        this layer's whole k and v [B, KV, T, D] in the new tokens' dtype, for attention."""
        k, v = (write_layer_rows(c, new.astype(c.dtype), self.layer, self.index, self.layout)
                for c, new in ((self.k, k_new), (self.v, v_new)))
        k_layer, v_layer = (self.layout.heads_first(jax.lax.dynamic_index_in_dim(c, self.layer, 0, keepdims=False))
                            .astype(k_new.dtype) for c in (k, v))
        return self._replace(k=k, v=v), k_layer, v_layer


def write_rows(buffer: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """buffer [B, T, ...] with new [B, S, ...] written at slot index[b] of each row b."""
    return jax.vmap(lambda buf, x, i: jax.lax.dynamic_update_slice_in_dim(buf, x, i, axis=0))(buffer, new, index)


def write_layer_rows(cache: jax.Array, new: jax.Array, layer: jax.Array, index: jax.Array,
                     layout: Layout) -> jax.Array:
    """cache (in `layout`) with new [B, KV, S, D] written at layer `layer`, row b, position
    index[b] + s: one scatter into the carried buffer, which XLA updates in place."""
    rows = jnp.arange(new.shape[0])[:, None]
    slots = index[:, None] + jnp.arange(new.shape[2])[None, :]
    return cache.at[layout.at(layer, rows, slots)].set(new.transpose(0, 2, 1, 3), mode="promise_in_bounds")
