"""The LLaMA building blocks: RMSNorm, rotary embeddings, attention and the SwiGLU MLP, with
the family switches of ModelConfig (RoPE scaling, q/k/v biases, q/k norms, explicit head_dim).

Weights are stored in `param_dtype` and cast to the compute `dtype` at use; norms, RoPE and
softmax run in float32. Every parameter carries logical axis names (see lima_jax.sharding).

RoPE uses the "rotate half" layout (Hugging Face's, and MaxText's): pairs are (i, i + d/2),
not Meta's interleaved (2i, 2i + 1). Halves are contiguous lanes on TPU, interleaved pairs
are not; Meta checkpoints are permuted once at conversion instead (lima_jax.convert.layout).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lima_jax.model.attention import AttentionMask, attend
from lima_jax.model.config import ModelConfig
from lima_jax.model.dense import dense
from lima_jax.model.kv_cache import LayerCache
from lima_jax.sharding import constrain

INIT_STD = 0.02  # Hugging Face LlamaConfig.initializer_range


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype: jnp.dtype,
          init: str = "normal") -> nnx.Param:
    """A parameter with logical axis names; placement is decided later from the names."""
    if init in ("ones", "zeros"):
        value = (jnp.ones if init == "ones" else jnp.zeros)(shape, dtype)
    else:
        value = (INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """Over the model's width, or (`size`, `axis`) over each head's head_dim (Qwen3's q/k norms)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, size: int | None = None, axis: str = "norm"):
        self.eps = cfg.norm_eps
        self.scale = param(rngs, (size or cfg.dim,), (axis,), cfg.weight_dtype, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """The rotary inverse frequencies [head_dim / 2] in float32, as transformers computes them
    for `rope_type` default, linear (all divided by the factor) and llama3 (Llama 3.1: long
    wavelengths divided by the factor, short ones kept, a smooth blend between)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / np.float32(cfg.rope_theta) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd))
    if cfg.rope_type == "linear":
        return (inv_freq / np.float32(cfg.rope_factor)).astype(np.float32)
    if cfg.rope_type != "llama3":
        return inv_freq
    factor, low, high = (np.float32(v) for v in (cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor))
    old = np.float32(cfg.rope_original_max_len)
    wavelen = np.float32(2 * np.pi) / inv_freq
    scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, cfg: ModelConfig, max_position: int) -> tuple[jax.Array, jax.Array]:
    """(sin, cos), each [batch, seq, 1, head_dim / 2] in float32, for integer `positions` in
    [0, max_position).

    The angles' sines and cosines are a table computed on the host at trace time (a constant
    of max_position x head_dim / 2, 0.5 MB at 2,048 x 64) and gathered by position: computed
    on the device, XLA fuses sin and cos into every consumer and evaluates them per element of
    q and k, once per head. Float32 angles, as Hugging Face computes them. A position outside
    the table reads NaN (`jnp.take`'s fill)."""
    angles = np.arange(max_position, dtype=np.float32)[:, None] * rope_inv_freq(cfg)
    return tuple(jnp.take(jnp.asarray(f(angles)), positions, axis=0)[:, :, None] for f in (np.sin, np.cos))


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head attention with grouped-query support (n_kv_heads <= n_heads).

    Queries, keys and values are projected as flat matmuls (see `dense`) and then laid out
    head-major, [B, heads, S, head_dim], by one explicit transpose each: the attention einsums
    then need no transposes (the KV cache's layout is the backend's: see lima_jax.model.kv_cache).
    RoPE is applied before that transpose, while each head's pairs are contiguous in the
    projection's output."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, kv, hd, pd = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.weight_dtype
        self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), pd)
        self.wk = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.wv = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), pd)
        if cfg.qkv_bias:
            self.q_bias = param(rngs, (h, hd), ("heads", "head_dim"), pd, init="zeros")
            self.k_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), pd, init="zeros")
            self.v_bias = param(rngs, (kv, hd), ("kv_heads", "head_dim"), pd, init="zeros")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg, rngs, hd, "head_dim")
            self.k_norm = RMSNorm(cfg, rngs, hd, "head_dim")

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], mask: AttentionMask,
                 cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
        """x [B, S, D] -> [B, S, D]; `mask` is shared by all layers (see Llama). With a `cache`,
        the S new keys and values are written into it and the queries attend over the layer's
        whole cache; the updated cache comes back (None without one)."""
        cfg = self.cfg
        dt = cfg.compute_dtype
        q, k, v = dense(x, tuple(w[...].astype(dt) for w in (self.wq, self.wk, self.wv)),
                        transposed_wgrad=cfg.transposed_wgrad)
        if cfg.qkv_bias:
            q, k, v = (y + b[...].astype(dt) for y, b in ((q, self.q_bias), (k, self.k_bias), (v, self.v_bias)))
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q = constrain(q.transpose(0, 2, 1, 3), "batch", "act_heads", "length", None)
        k = constrain(k.transpose(0, 2, 1, 3), "batch", "act_kv_heads", "length", None)
        v = constrain(v.transpose(0, 2, 1, 3), "batch", "act_kv_heads", "length", None)
        if cache is not None:
            cache, k, v = cache.append(k, v)
        out = attend(q, k, v, mask, impl=cfg.attention, causal_blocks=cfg.causal_blocks)
        out = constrain(out, "batch", "act_heads", "length", None)
        return dense(out.transpose(0, 2, 1, 3), self.wo[...].astype(dt), axes=2,
                     transposed_wgrad=cfg.transposed_wgrad), cache


class MLP(nnx.Module):
    """SwiGLU: w2(silu(x w1) * (x w3))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f, pd = cfg.dim, cfg.ffn_dim, cfg.weight_dtype
        self.w1 = param(rngs, (d, f), ("embed", "mlp"), pd)
        self.w3 = param(rngs, (d, f), ("embed", "mlp"), pd)
        self.w2 = param(rngs, (f, d), ("mlp", "embed"), pd)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt, transposed_wgrad = self.cfg.compute_dtype, self.cfg.transposed_wgrad
        gate, up = dense(x, (self.w1[...].astype(dt), self.w3[...].astype(dt)), transposed_wgrad=transposed_wgrad)
        hidden = constrain(jax.nn.silu(gate) * up, "batch", "length", "act_mlp")
        return dense(hidden, self.w2[...].astype(dt), transposed_wgrad=transposed_wgrad)
