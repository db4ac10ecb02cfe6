"""Llama 3.2 1B (tied embeddings, grouped-query attention) with the LIMA recipe.

Convert the Hugging Face folder first (`convert_checkpoint.py --source hf --config
configs/llama3_1b.py`) and set `init_checkpoint`: the RoPE scaling (Llama 3.2's llama3 type,
factor 32) and the tokenizer come from that checkpoint. 128,256 ids; `<|eot_id|>` ends a turn."""

from lima_jax.config import base_config, set_llama


def get_config():
    c = set_llama(base_config(), dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, norm_eps=1e-5,
                  max_seq_len=8192, residual_dropout=0.2)
    c.model.update(vocab_size=128256, rope_theta=500000.0, tied_embeddings=True)
    c.data.chat_format = "llama3"
    return c
