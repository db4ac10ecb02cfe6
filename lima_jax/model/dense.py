"""Weight projections: x [..., *in] @ w [*in, *out], as flat 2-D matmuls.

- Flat: the leading dims are folded into one row axis ([B*S, D] rather than [B, S, D]), so
  each weight gradient contracts one dim; contracting two (b and s) cost XLA:CPU a physical
  transpose per weight. The reshapes are free (bitcasts) and keep the batch's sharding.
- `transposed_wgrad`: the backward pass copies x transposed once, shared by every weight that
  reads x (q, k and v; gate and up), and the weight gradients x^T @ dy read the copy: XLA:CPU
  hands a dot to its fast matmul library only in that operand order. An optimization barrier
  keeps XLA from folding the transpose back into the dot. Chosen per backend (lima_jax.backend).
- LoRA: a `LoraWeight` (lima_jax.model.weights) in place of a weight adds its low-rank term
  x a b * scale to that output; the frozen base goes through the same matmuls as any weight.
Measurements: docs/benchmarks.md.
"""

import math

import jax
import jax.numpy as jnp

from lima_jax import backend
from lima_jax.model.weights import LoraWeight, base_weight


def dense(x: jax.Array, w: jax.Array | tuple[jax.Array, ...], axes: int = 1, transposed_wgrad: bool | None = None,
          out_dtype: jnp.dtype | None = None) -> jax.Array | tuple[jax.Array, ...]:
    """x [..., *in] @ w [*in, *out] -> [..., *out], contracting the last `axes` dims of x with
    the first `axes` dims of w. `w` may be a tuple of weights that share the input (q, k and
    v): then a tuple of outputs comes back, and the backward pass reads x once for all of them.
    `transposed_wgrad`: None is the backend's choice. `out_dtype`: the matmul's result type
    (float32 logits from bfloat16 operands)."""
    ws = w if isinstance(w, tuple) else (w,)
    bases = tuple(base_weight(w_) for w_ in ws)  # a LoraWeight's frozen part; its adapter is added below
    k = math.prod(bases[0].shape[:axes])
    if transposed_wgrad is None:
        transposed_wgrad = backend.tuning().transposed_wgrad
    matmuls = _matmuls_transposed_wgrad if transposed_wgrad else _matmuls
    x_flat = x.reshape(-1, k)
    flat = matmuls(x_flat, tuple(b.reshape(k, -1) for b in bases), out_dtype)
    flat = tuple(y + w_.delta(x_flat).astype(y.dtype) if isinstance(w_, LoraWeight) else y for y, w_ in zip(flat, ws))
    ys = tuple(y.reshape(*x.shape[:x.ndim - axes], *b.shape[axes:]) for y, b in zip(flat, bases))
    return ys if isinstance(w, tuple) else ys[0]


def _matmuls(x, ws, out_dtype):
    return tuple(jnp.matmul(x, w, preferred_element_type=out_dtype) for w in ws)


_matmuls_transposed_wgrad = jax.custom_vjp(_matmuls, nondiff_argnums=(2,))


def _forward(x, ws, out_dtype):
    return _matmuls(x, ws, out_dtype), (x, ws)


def _backward(out_dtype, residuals, dys):
    x, ws = residuals
    f32 = jnp.float32
    dx = sum(jnp.matmul(dy, w.T, preferred_element_type=f32) for dy, w in zip(dys, ws))
    x_t = jax.lax.optimization_barrier(x.T)  # a real copy, read by every weight gradient below
    dws = tuple(jnp.matmul(x_t, dy, preferred_element_type=f32).astype(w.dtype) for dy, w in zip(dys, ws))
    return dx.astype(x.dtype), dws


_matmuls_transposed_wgrad.defvjp(_forward, _backward)
