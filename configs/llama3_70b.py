"""Llama 3 / 3.1 / 3.3 70B with the LIMA recipe.

The versions share these shapes; the RoPE scaling (3.1 and 3.3: llama3, factor 8) comes from
the converted checkpoint (`init_checkpoint`), as does the tokenizer."""

from lima_jax.config import base_config, set_llama


def get_config():
    c = set_llama(base_config(), dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, norm_eps=1e-5,
                  max_seq_len=8192, residual_dropout=0.3)
    c.model.update(vocab_size=128256, rope_theta=500000.0)
    c.data.chat_format = "llama3"
    c.data.examples_per_step = 32  # LIMA used 32 examples per step for 65B, 64 below
    return c
