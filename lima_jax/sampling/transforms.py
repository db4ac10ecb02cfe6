"""Decoding transforms: small pure functions on logits [..., V] (float32), and the settings.

Each transform follows the Hugging Face logits processor of the same name, so a user who
knows `generate(...)` knows what these do (the tests compare them on random logits):

- `repetition_penalty`: logits of tokens already seen are divided by the penalty when
  positive and multiplied by it when negative (`RepetitionPenaltyLogitsProcessor`).
- `temperature`: logits / t (`TemperatureLogitsWarper`).
- `top_k`: keep the k largest logits (`TopKLogitsWarper`; ties with the k-th are kept).
- `top_p`: keep the smallest set of largest-probability tokens whose mass exceeds p, at
  least one token (`TopPLogitsWarper`).

Removed tokens get `-inf` (HF's filter value). The order is HF's: penalty, temperature,
top-k, top-p, then sample (or argmax when greedy).
"""

import dataclasses

import jax
import jax.numpy as jnp

FILTERED = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How to pick the next token. The defaults are LIMA's (Zhou et al. 2023, section 2):
    nucleus sampling with p = 0.9, temperature 0.7, repetition penalty 1.2 on previously
    generated tokens, at most 2,048 new tokens.

    `penalize_prompt`: whether prompt tokens count as "seen" for the repetition penalty.
    Default False: LIMA penalises *previously generated* tokens only, and penalising the
    prompt would push the model away from words of the question it should repeat. Set it to
    True for the behaviour of `transformers` `generate(repetition_penalty=...)`, whose
    `input_ids` include the prompt.
    `greedy`: argmax after the repetition penalty (temperature, top-k and top-p do not
    change the argmax and are skipped), like `generate(do_sample=False)`.
    """

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.2  # 1.0 = off
    penalize_prompt: bool = False
    greedy: bool = False
    max_new_tokens: int = 2048

    def __post_init__(self):
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (use greedy=True for argmax)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0 or self.repetition_penalty <= 0 or self.max_new_tokens < 1:
            raise ValueError(f"invalid settings: {self}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """logits [..., V], seen [..., V] bool: seen tokens' logits divided (>0) / multiplied (<0) by penalty."""
    if penalty == 1.0:
        return logits
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def temperature(logits: jax.Array, t: float) -> jax.Array:
    return logits if t == 1.0 else logits / t


def top_k(logits: jax.Array, k: int) -> jax.Array:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, FILTERED, logits)


def top_p(logits: jax.Array, p: float) -> jax.Array:
    """HF's rule: sort ascending, drop tokens whose cumulative probability is <= 1 - p, keep the top one."""
    if p >= 1.0:
        return logits
    ascending = jnp.sort(logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    removed = (cumulative <= 1.0 - p).at[..., -1].set(False)
    # `removed` is a prefix of the ascending order: the smallest kept logit is the threshold.
    threshold = jnp.take_along_axis(ascending, removed.sum(-1, keepdims=True), axis=-1)
    return jnp.where(logits < threshold, FILTERED, logits)


def process(logits: jax.Array, seen: jax.Array, s: SamplingSettings) -> jax.Array:
    """All transforms in HF's order (greedy stops after the penalty)."""
    logits = repetition_penalty(logits, seen, s.repetition_penalty)
    if s.greedy:
        return logits
    return top_p(top_k(temperature(logits, s.temperature), s.top_k), s.top_p)


def next_token(logits: jax.Array, seen: jax.Array, key: jax.Array, s: SamplingSettings) -> jax.Array:
    """[B, V] float32 logits -> [B] int32 token ids."""
    logits = process(logits, seen, s)
    if s.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
