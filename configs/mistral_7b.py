"""Mistral 7B v0.3 (no sliding window: LLaMA's architecture) with the LIMA recipe.

Its SentencePiece vocabulary (32,768 pieces) has no end-of-turn token, so the conversion adds
LIMA's EOT row (`convert_checkpoint.py --source hf --add_eot`: 32,769 ids) and the chat format
is LIMA's."""

from lima_jax.config import base_config, set_llama


def get_config():
    c = set_llama(base_config(), dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, norm_eps=1e-5,
                  max_seq_len=8192, residual_dropout=0.2)
    c.model.update(vocab_size=32769, rope_theta=1000000.0)
    c.data.chat_format = "lima"
    return c
