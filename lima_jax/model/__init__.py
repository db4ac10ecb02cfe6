"""The LLaMA model: config, layers, KV-cache writes, the scanned decoder and its functional view."""

from lima_jax.model.config import ModelConfig
from lima_jax.model.counting import flops_per_token, param_count
from lima_jax.model.transformer import (
    Llama,
    abstract_params,
    bind,
    head_weight,
    init_params,
    output_logits,
    param_logical_axes,
)

__all__ = ["Llama", "ModelConfig", "abstract_params", "bind", "flops_per_token", "head_weight", "init_params",
           "output_logits", "param_count", "param_logical_axes"]
