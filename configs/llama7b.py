"""LLaMA 7B with the LIMA recipe."""

from lima_jax.config import base_config, set_llama


def get_config():
    return set_llama(base_config(), dim=4096, n_layers=32, n_heads=32, ffn_dim=11008, norm_eps=1e-6,
                     max_seq_len=2048, residual_dropout=0.2)
