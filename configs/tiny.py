"""A tiny LLaMA that runs the whole LIMA pipeline on a laptop CPU in a minute or two."""

from lima_jax.config import base_config, set_llama
from lima_jax.data.demo import DEMO_PIECES, DEMO_TRAIN


def get_config():
    c = set_llama(base_config(), dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=344, max_seq_len=512)
    c.model.update(vocab_size=DEMO_PIECES + 1, vocab_multiple=8, dtype="float32", remat_policy="none")
    # The demo dataset shipped with lima_jax; an empty tokenizer_path builds the demo tokenizer.
    c.data.update(train_path=DEMO_TRAIN, tokenizer_path="", seq_len=256, dev_size=10)
    # A small model on 190 short examples learns fast: a larger learning rate than LIMA's 1e-5
    # so the demo visibly overfits; the rest of the recipe (AdamW, linear decay) is LIMA's.
    c.optimizer.update(learning_rate=3e-3, end_learning_rate=3e-4)
    c.train.update(epochs=15, sample_max_new_tokens=48, compilation_cache_dir="")
    return c
