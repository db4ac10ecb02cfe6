"""The model FLOPs behind MFU (lima_jax.model.flops_per_token) against what XLA itself counts
in the compiled gradient step, for full fine-tuning and for LoRA on a frozen base (where the
base's weight gradients are never computed)."""

import jax
import jax.numpy as jnp
import pytest

from lima_jax.model import ModelConfig, flops_per_token, init_params, lora as lora_lib
from lima_jax.train.loss import lm_loss

SEQ, ROWS = 128, 2
CFG = ModelConfig(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=688, max_seq_len=SEQ,
                  dtype="float32", scan_layers=False, remat_policy="none", logits_chunks=1, causal_blocks=1,
                  transposed_wgrad=False)


def batch():
    tokens = jnp.zeros((ROWS, SEQ), jnp.int32)
    return dict(tokens=tokens, targets=tokens, positions=jnp.broadcast_to(jnp.arange(SEQ), (ROWS, SEQ)),
                segment_ids=jnp.ones_like(tokens), loss_weights=jnp.ones((ROWS, SEQ), jnp.float32))


def compiled_flops(fn, *args) -> float:
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("lora", [None, lora_lib.LoraConfig(rank=8, alpha=16.0),
                                  lora_lib.LoraConfig(rank=8, alpha=16.0, targets=lora_lib.TARGET_NAMES)],
                         ids=["full", "lora", "lora-with-head"])
def test_flops_per_token_matches_the_compiler(lora):
    params = init_params(CFG, jax.random.key(0))
    if lora is None:
        flops = compiled_flops(jax.grad(lambda p, b: lm_loss(CFG, p, b)[0]), params, batch())
    else:
        base, adapters = lora_lib.frozen_base(params, lora), lora_lib.init_adapters(CFG, lora, jax.random.key(1))
        loss = lambda a, b, base: lm_loss(CFG, lora_lib.attach(base, a, lora), b)[0]  # noqa: E731
        flops = compiled_flops(jax.grad(loss), adapters, batch(), base)
    counted = flops_per_token(CFG, SEQ, lora) * ROWS * SEQ
    # The compiler also counts softmax, norms and the elementwise rest; under LoRA it skips the
    # first layer's input gradients (the embedding is frozen). Counting 6N for LoRA is 1.5x over.
    assert 0.95 * counted <= flops <= 1.1 * counted, (flops, counted, flops / counted)
