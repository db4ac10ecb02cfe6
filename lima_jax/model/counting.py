"""Parameter count and training FLOPs per token, from the config alone."""

import math

from lima_jax.model.config import ModelConfig


def param_count(cfg: ModelConfig, padded: bool = False) -> int:
    """All parameters (embedding and output head included, once when tied), as LLaMA's paper
    counts them."""
    v = cfg.padded_vocab_size if padded else cfg.vocab_size
    d, hd = cfg.dim, cfg.head_dim
    attn = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    attn += hd * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.qkv_bias + 2 * hd * cfg.qk_norm
    per_layer = attn + 3 * d * cfg.ffn_dim + 2 * d
    return (1 if cfg.tied_embeddings else 2) * v * d + d + cfg.n_layers * per_layer


def flops_per_token(cfg: ModelConfig, seq_len: int, lora=None) -> float:
    """Training FLOPs per token (forward + backward), PaLM's MFU convention: 6 x the matmul
    parameters (all but the embedding lookup) + 12 x layers x dim x seq for attention scores
    and values (counted in full, without the causal half). Remat recomputation is not counted.

    With `lora` (a LoraConfig) the base is frozen: its matmuls cost 4 x (forward and input
    gradients, no weight gradients), the adapters 6 x their parameters; an adapted head is
    merged into one matrix whose gradient is taken, so it stays at 6 x."""
    head = cfg.vocab_size * cfg.dim
    matmul_params = param_count(cfg) - (0 if cfg.tied_embeddings else head)  # the embedding lookup is no matmul
    attention = 12.0 * cfg.n_layers * cfg.dim * seq_len
    if lora is None:
        return 6.0 * matmul_params + attention
    from lima_jax.model.lora import HEAD, adapter_shapes  # lora imports the model; counting is imported by it

    trained = sum(math.prod(a) + math.prod(b) for a, b in adapter_shapes(cfg, lora).values())
    trained += head if HEAD in lora.targets else 0
    return 4.0 * (matmul_params - (head if HEAD in lora.targets else 0)) + 6.0 * trained + attention


def prefill_flops(cfg: ModelConfig, rows: int, fed: int, keys: int) -> float:
    """Model FLOPs of one prefill (a forward pass without the output head): `rows` rows of `fed`
    tokens, each attending over `keys` cache positions (scores and values, masked ones included)."""
    head = 0 if cfg.tied_embeddings else cfg.vocab_size * cfg.dim
    layers = param_count(cfg) - cfg.vocab_size * cfg.dim - head  # the embedding is a lookup, the head unused
    return rows * fed * (2.0 * layers + 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * keys)
