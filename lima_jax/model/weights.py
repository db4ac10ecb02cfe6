"""Weights the layers read like arrays: an int8 weight with per-channel scales, and a frozen
weight with its LoRA adapter. They sit below `dense` (which adds a LoraWeight's low-rank term)
and `lora` (which builds them), so neither imports the other.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedWeight:
    """An int8 weight with one scale per output channel: W = values * scale."""
    values: jax.Array  # int8 [..., *in, *out]
    scale: jax.Array  # float32, 1 on every input dim: [..., 1, ..., *out]

    def __getitem__(self, index):  # nnx reads a parameter as `param[...]`
        if index is not Ellipsis:
            raise IndexError("a quantized weight is read whole")
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def astype(self, dtype) -> jax.Array:
        return (self.values.astype(jnp.float32) * self.scale).astype(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraWeight:
    """A frozen weight with its adapter; `dense` computes x base + dropout(x) a b * scale."""
    base: Any  # [*in, *out] array or QuantizedWeight
    a: jax.Array  # [*in, rank]
    b: jax.Array  # [rank, *out]
    key: jax.Array | None  # the dropout key (None: no dropout)
    scale: float = dataclasses.field(metadata=dict(static=True))
    dropout: float = dataclasses.field(metadata=dict(static=True))

    def __getitem__(self, index):
        if index is not Ellipsis:
            raise IndexError("a LoRA weight is read whole")
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape

    def astype(self, dtype) -> "LoraWeight":
        return dataclasses.replace(self, base=self.base.astype(dtype), a=self.a.astype(dtype), b=self.b.astype(dtype))

    def delta(self, x: jax.Array) -> jax.Array:
        """The low-rank term for flat inputs x [N, in] -> [N, out]."""
        if self.key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(self.key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / jnp.asarray(1.0 - self.dropout, x.dtype), jnp.zeros_like(x))
        rank = self.a.shape[-1]
        return (x @ self.a.reshape(-1, rank)) @ self.b.reshape(rank, -1) * jnp.asarray(self.scale, x.dtype)


def base_weight(w):
    """The frozen part of a weight (itself when it has no adapter)."""
    return w.base if isinstance(w, LoraWeight) else w
