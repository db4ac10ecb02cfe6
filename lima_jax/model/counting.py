"""Parameter count and training FLOPs per token, from the config alone."""

from lima_jax.model.config import ModelConfig


def param_count(cfg: ModelConfig, padded: bool = False) -> int:
    """All parameters (embedding and output head included), as LLaMA's paper counts them."""
    v = cfg.padded_vocab_size if padded else cfg.vocab_size
    d, hd = cfg.dim, cfg.head_dim
    attn = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    per_layer = attn + 3 * d * cfg.ffn_dim + 2 * d
    return 2 * v * d + d + cfg.n_layers * per_layer


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM's MFU convention: 6 x the matmul
    parameters (all but the embedding lookup) + 12 x layers x dim x seq for attention scores
    and values (counted in full, without the causal half). Remat recomputation is not counted."""
    matmul_params = param_count(cfg) - cfg.vocab_size * cfg.dim
    return 6.0 * matmul_params + 12.0 * cfg.n_layers * cfg.dim * seq_len
