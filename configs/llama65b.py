"""LLaMA 65B with the LIMA recipe."""

from lima_jax.config import base_config, set_llama


def get_config():
    c = set_llama(base_config(), dim=8192, n_layers=80, n_heads=64, ffn_dim=22016, norm_eps=1e-5,
                     max_seq_len=2048, residual_dropout=0.3)
    c.data.examples_per_step = 32  # LIMA used 32 examples per step for 65B, 64 below
    return c
