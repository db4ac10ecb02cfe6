"""LLaMA 13B with the LIMA recipe."""

from lima_jax.config import base_config, set_llama


def get_config():
    return set_llama(base_config(), dim=5120, n_layers=40, n_heads=40, ffn_dim=13824, norm_eps=1e-6,
                     max_seq_len=2048, residual_dropout=0.2)
