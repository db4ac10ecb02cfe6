"""The model's hyperparameters as a frozen dataclass.

The ml-collections config (`config.model`) is the user-facing form; the model code takes this
hashable, typed copy so it can be a static argument of `jax.jit` and a cache key.

Two fields only change speed, and their best values depend on the backend: `transposed_wgrad`
and `causal_blocks`. None (the default) means the backend's choice (lima_jax.backend), read
when the model is traced, for the platform of the mesh it is traced under (else the running
backend); True/False or a number is an explicit override. `cfg.for_platform("tpu")` fills
them for a named platform.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from lima_jax import backend

REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("xla", "cudnn", "splash")
BACKEND_TUNED = ("transposed_wgrad", "causal_blocks")  # None in the config: lima_jax.backend chooses


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int  # real tokens (32,001 with LIMA's EOT); logits beyond it are masked
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int  # == n_heads for LLaMA-1; fewer for grouped-query attention
    ffn_dim: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    vocab_multiple: int = 128  # embedding rows are padded to this so the vocab axis shards evenly
    dtype: str = "float32"  # compute dtype of matmuls
    param_dtype: str = "float32"
    remat_policy: str = "full"
    scan_layers: bool = True
    attention: str = "xla"
    residual_dropout: float = 0.0  # rate at the last layer; 0 at the first, linear between
    logits_chunks: int = 4  # hidden states are cut in this many pieces for the loss
    transposed_wgrad: bool | None = None  # weight gradients read a transposed copy (model/dense.py); None: backend's
    causal_blocks: int | None = None  # query blocks of causal xla attention (model/attention.py); None: backend's

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}")
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not a multiple of model.n_heads={self.n_heads}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"model.remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention={self.attention!r}; choose one of {ATTENTION_IMPLS}")
        if self.causal_blocks is not None and self.causal_blocks < 1:
            raise ValueError(f"model.causal_blocks={self.causal_blocks} must be at least 1 (1: no blocks)")

    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any]) -> "ModelConfig":
        """From `config.model` (a ConfigDict or a plain dict); unknown keys are an error."""
        values = dict(model_cfg)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config.model keys: {unknown}")
        return cls(**values)

    def for_platform(self, platform: str | None = None) -> "ModelConfig":
        """This config with the backend-dependent speed settings left None filled with
        `platform`'s (None: lima_jax.backend.target_platform()); explicit values stay."""
        chosen = backend.tuning(platform)
        return dataclasses.replace(self, **{name: getattr(chosen, name) for name in BACKEND_TUNED
                                            if getattr(self, name) is None})

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return -(-self.vocab_size // m) * m

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)
