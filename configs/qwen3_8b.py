"""Qwen3 8B (q/k norms, head_dim 128, grouped-query attention) with the LIMA recipe, in ChatML;
the tokenizer comes from the converted checkpoint (`init_checkpoint`)."""

from lima_jax.config import base_config, set_llama


def get_config():
    c = set_llama(base_config(), dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, ffn_dim=12288, norm_eps=1e-6,
                  max_seq_len=8192, residual_dropout=0.2)
    c.model.update(vocab_size=151936, rope_theta=1000000.0, head_dim=128, qk_norm=True)
    c.data.chat_format = "chatml"
    return c
