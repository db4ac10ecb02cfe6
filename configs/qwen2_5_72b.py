"""Qwen2.5 72B (q/k/v biases, grouped-query attention) with the LIMA recipe, in ChatML; the
tokenizer comes from the converted checkpoint (`init_checkpoint`)."""

from lima_jax.config import base_config, set_llama


def get_config():
    c = set_llama(base_config(), dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=29568, norm_eps=1e-6,
                  max_seq_len=8192, residual_dropout=0.3)
    c.model.update(vocab_size=152064, rope_theta=1000000.0, qkv_bias=True)
    c.data.chat_format = "chatml"
    c.data.examples_per_step = 32  # LIMA used 32 examples per step for 65B, 64 below
    return c
