"""Weight projections: x [..., *in] @ w [*in, *out], as flat 2-D matmuls.

Two choices here are about XLA:CPU speed, measured on bench-110m (2 cores, float32):

- Flat: the leading dims are folded into one row axis ([B*S, D] rather than [B, S, D]). A
  weight gradient that contracts over two dims (b and s) gets a physical transpose of an
  activation or gradient per weight, fused with the elementwise work before it (the SwiGLU
  gate's gradient alone took 0.3 s a layer). Flat, MLP forward + backward went 1.73 s ->
  1.01 s. The reshapes are free (bitcasts) and, the batch being the major dim, they keep its
  sharding on a mesh.

- `transposed_wgrad` (`model.transposed_wgrad`): a weight gradient x^T @ dy contracts the
  token axis, the major axis of x. XLA:CPU gives a dot to YNNPACK, its fast matmul library,
  only when the left operand contracts its minor axis; this one goes to Eigen instead and
  runs 20-30% slower (x [1024, 768], dy [1024, 2048]: 124 against 165-175 GFLOP/s from a
  transposed copy of x; PyTorch's CPU matmul runs every operand order at ~170). With this
  option the backward pass copies x transposed once, shared by every weight that reads x (q,
  k and v; gate and up), and the weight gradients read the copy; an optimization barrier
  keeps XLA from folding the transpose back into the dot. bench-110m train step: 4-5%
  faster. Off by default: GPU and TPU matmuls take any operand order at full speed, and the
  copy would only add memory traffic there.
"""

import math

import jax
import jax.numpy as jnp


def dense(x: jax.Array, w, axes: int = 1, transposed_wgrad: bool = False, out_dtype=None):
    """x [..., *in] @ w [*in, *out] -> [..., *out], contracting the last `axes` dims of x with
    the first `axes` dims of w. `w` may be a tuple of weights that share the input (q, k and
    v): then a tuple of outputs comes back, and the backward pass reads x once for all of them.
    `out_dtype`: the matmul's result type (float32 logits from bfloat16 operands)."""
    ws = w if isinstance(w, tuple) else (w,)
    k = math.prod(ws[0].shape[:axes])
    matmuls = _matmuls_transposed_wgrad if transposed_wgrad else _matmuls
    flat = matmuls(x.reshape(-1, k), tuple(w_.reshape(k, -1) for w_ in ws), out_dtype)
    ys = tuple(y.reshape(*x.shape[:x.ndim - axes], *w_.shape[axes:]) for y, w_ in zip(flat, ws))
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
