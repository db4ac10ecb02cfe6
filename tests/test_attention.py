"""The attention kernels against the plain XLA path: the TPU splash kernel (run by its
interpreter here, so no TPU is needed) and, on a GPU, cuDNN's fused kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lima_jax.model import attention

jax.config.update("jax_default_matmul_precision", "highest")


def packed_inputs(heads, kv_heads, seq, head_dim=128, batch=2):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, heads, seq, head_dim))
    k, v = (jax.random.normal(key, (batch, kv_heads, seq, head_dim)) for key in keys[1:3])
    # Row 0 packs three examples and ends in padding (segment 0); row 1 is one example.
    segment_ids = np.ones((batch, seq), np.int32)
    segment_ids[0, seq // 3:] = 2
    segment_ids[0, seq // 2:] = 3
    segment_ids[0, seq - 40:] = 0
    segment_ids = jnp.asarray(segment_ids)
    slots = jnp.arange(seq)
    allowed = (slots[None, None, :] <= slots[None, :, None]) & (segment_ids[:, None, :] == segment_ids[:, :, None])
    return q, k, v, attention.AttentionMask(allowed, segment_ids), keys[3]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)], ids=["multi-head", "grouped-query"])
def test_splash_equals_xla_forward_and_backward(monkeypatch, heads, kv_heads):
    monkeypatch.setattr(attention, "SPLASH_BLOCK", 128)  # 2 x 2 tiles: one skipped above the diagonal
    q, k, v, mask, key = packed_inputs(heads, kv_heads, seq=256)
    cotangent = jax.random.normal(key, q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent)

    xla = lambda q, k, v: attention.xla_attention(q, k, v, mask.allowed, causal=True)  # noqa: E731
    splash = lambda q, k, v: attention.splash_attention(q, k, v, mask.segment_ids, interpret=True)  # noqa: E731
    np.testing.assert_allclose(splash(q, k, v), xla(q, k, v), atol=2e-5, rtol=0)
    for ours, reference in zip(jax.grad(loss(splash), (0, 1, 2))(q, k, v), jax.grad(loss(xla), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU (JAX_PLATFORMS=cuda)")
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)], ids=["multi-head", "grouped-query"])
def test_cudnn_equals_xla_forward_and_backward(heads, kv_heads):
    """cuDNN takes bfloat16; the reference is the xla path in float32 on the same rounded
    inputs, so the error is the kernel's bfloat16 arithmetic alone (about 1e-3 relative)."""
    q, k, v, mask, key = packed_inputs(heads, kv_heads, seq=512)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    cotangent = jax.random.normal(key, q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent)

    xla = lambda q, k, v: attention.xla_attention(q, k, v, mask.allowed, causal=True)  # noqa: E731
    cudnn = lambda q, k, v: attention.cudnn_attention(q, k, v, mask.segment_ids)  # noqa: E731
    upcast = [x.astype(jnp.float32) for x in (q, k, v)]
    # Jitted: op by op, every small op compiles its own GPU kernel (minutes for this test).
    ours = [jax.jit(cudnn)(q, k, v)] + list(jax.jit(jax.grad(loss(cudnn), (0, 1, 2)))(q, k, v))
    reference = [jax.jit(xla)(*upcast)] + list(jax.jit(jax.grad(loss(xla), (0, 1, 2)))(*upcast))
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, reference):
        a = np.asarray(a.astype(jnp.float32))
        assert np.isfinite(a).all(), name
        error = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert error < 1e-2, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("blocks", [2, 4, 8])
def test_causal_blocks_equal_full_attention(blocks):
    """The blocked causal path skips only keys masked for every query of a block: exact."""
    q, k, v, mask, _ = packed_inputs(4, 2, seq=128, head_dim=16)
    full = attention.xla_attention(q, k, v, mask.allowed, causal=True, causal_blocks=1)
    blocked = attention.xla_attention(q, k, v, mask.allowed, causal=True, causal_blocks=blocks)
    np.testing.assert_allclose(blocked, full, atol=1e-6, rtol=0)


def test_splash_rejects_a_sequence_it_cannot_tile():
    q, k, v, mask, _ = packed_inputs(2, 2, seq=200)
    with pytest.raises(ValueError, match="multiple of 128"):
        attention.splash_attention(q, k, v, mask.segment_ids, interpret=True)
