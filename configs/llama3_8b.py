"""Llama 3 / 3.1 8B with the LIMA recipe.

3.0 and 3.1 share these shapes; 3.1's RoPE scaling (llama3, factor 8) comes from the converted
checkpoint (`init_checkpoint`), as does the tokenizer (128,256 ids, `<|eot_id|>` ends a turn)."""

from lima_jax.config import base_config, set_llama


def get_config():
    c = set_llama(base_config(), dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, norm_eps=1e-5,
                  max_seq_len=8192, residual_dropout=0.2)
    c.model.update(vocab_size=128256, rope_theta=500000.0)
    c.data.chat_format = "llama3"
    return c
