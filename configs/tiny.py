"""A tiny LLaMA that runs the whole LIMA pipeline on a laptop CPU in a minute or two."""

from lima_jax.config import base_config, set_llama
from lima_jax.data.demo import DEMO_PIECES, DEMO_TRAIN


def get_config():
    c = set_llama(base_config(), dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=344, max_seq_len=512)
    c.model.update(vocab_size=DEMO_PIECES + 1, vocab_multiple=8, dtype="float32", remat_policy="none")
    # The demo dataset shipped with lima_jax; an empty tokenizer_path builds the demo tokenizer.
    c.data.update(train_path=DEMO_TRAIN, tokenizer_path="", seq_len=256)
    return c
