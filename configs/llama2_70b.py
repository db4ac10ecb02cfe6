"""LLaMA-2 70B (grouped-query attention, 8 KV heads) with the LIMA recipe."""

from lima_jax.config import base_config, set_llama


def get_config():
    c = set_llama(base_config(), dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, norm_eps=1e-5,
                     max_seq_len=4096, residual_dropout=0.3)
    c.data.examples_per_step = 32  # LIMA used 32 examples per step for 65B, 64 below
    return c
