"""The model's hyperparameters as a frozen dataclass.

The ml-collections config (`config.model`) is the user-facing form; the model code takes this
hashable, typed copy so it can be a static argument of `jax.jit` and a cache key.

Three fields only change speed, and their best values depend on the backend: `transposed_wgrad`,
`causal_blocks` and `kv_position_major`. None (the default) means the backend's choice
(lima_jax.backend), read when the model is traced, for the platform of the mesh it is traced
under (else the running backend); True/False or a number is an explicit override.
`cfg.for_platform("tpu")` fills them for a named platform.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from lima_jax import backend

REMAT_POLICIES = ("none", "full", "dots")
ROPE_TYPES = ("default", "llama3", "linear")  # transformers' rope_type names the model implements
# The RoPE scaling fields: a converted checkpoint's own (Llama 3 and 3.1 share shapes, not scaling).
ROPE_SCALING_KEYS = ("rope_type", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                     "rope_original_max_len")
FAMILY_KEYS = ("head_dim", "tied_embeddings", "qkv_bias", "qk_norm", *ROPE_SCALING_KEYS)  # off for LLaMA
ATTENTION_IMPLS = ("xla", "cudnn", "splash")
BACKEND_TUNED = ("transposed_wgrad", "causal_blocks", "kv_position_major")  # None in the config: lima_jax.backend chooses


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
    kv_position_major: bool | None = None  # the KV cache's layout (model/kv_cache.py); None: backend's
    # Family switches (a family is these plus a conversion mapping; all off for LLaMA):
    head_dim: int | None = None  # None: dim / n_heads; Qwen3's small sizes set it explicitly
    tied_embeddings: bool = False  # the output head is the embedding's transpose (Qwen2.5 small, Llama 3.2)
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3)
    # RoPE scaling as transformers computes the inverse frequencies (`rope_parameters`):
    rope_type: str = "default"  # "llama3" (Llama 3.1+), "linear"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_len: int = 8192  # llama3 only: original_max_position_embeddings

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"model.dim={self.dim} is not a multiple of model.n_heads={self.n_heads}; "
                                 "set model.head_dim")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)  # stored: checkpoints record it
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim} must be even (RoPE rotates halves)")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"model.rope_type={self.rope_type!r}; choose one of {ROPE_TYPES}")
        if self.rope_type != "default" and not self.rope_factor > 0:
            raise ValueError(f"model.rope_factor={self.rope_factor!r} must be > 0")
        if self.rope_type == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ValueError(f"model.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                             f"model.rope_low_freq_factor={self.rope_low_freq_factor}")
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

    @classmethod
    def family_defaults(cls) -> dict:
        """FAMILY_KEYS -> their LLaMA values (what a config or checkpoint without them means)."""
        return {f.name: f.default for f in dataclasses.fields(cls) if f.name in FAMILY_KEYS}

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
