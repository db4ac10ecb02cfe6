"""LLaMA 33B with the LIMA recipe."""

from lima_jax.config import base_config, set_llama


def get_config():
    return set_llama(base_config(), dim=6656, n_layers=60, n_heads=52, ffn_dim=17920, norm_eps=1e-6,
                     max_seq_len=2048, residual_dropout=0.2)
