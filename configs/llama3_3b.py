"""Llama 3.2 3B (tied embeddings, grouped-query attention) with the LIMA recipe.

The RoPE scaling (llama3, factor 32) and the tokenizer come from the converted checkpoint
(`init_checkpoint`); see configs/llama3_1b.py."""

from lima_jax.config import base_config, set_llama


def get_config():
    c = set_llama(base_config(), dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192, norm_eps=1e-5,
                  max_seq_len=8192, residual_dropout=0.2)
    c.model.update(vocab_size=128256, rope_theta=500000.0, tied_embeddings=True)
    c.data.chat_format = "llama3"
    return c
