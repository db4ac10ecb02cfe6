"""Qwen2.5 7B (q/k/v biases, grouped-query attention) with the LIMA recipe, in ChatML.

Convert the Hugging Face folder first and set `init_checkpoint`: the tokenizer (`<|im_end|>`
ends a turn) comes from that checkpoint. 152,064 embedding rows (the tokenizer has fewer ids)."""

from lima_jax.config import base_config, set_llama


def get_config():
    c = set_llama(base_config(), dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, ffn_dim=18944, norm_eps=1e-6,
                  max_seq_len=8192, residual_dropout=0.2)
    c.model.update(vocab_size=152064, rope_theta=1000000.0, qkv_bias=True)
    c.data.chat_format = "chatml"
    return c
