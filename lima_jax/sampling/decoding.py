"""LIMA's decoding: the settings (written once, with LIMA's defaults) and the transforms that
pick each row's next token from its logits, every row with its own settings as arrays, so one
jitted step decodes rows of different requests.

Each transform follows the Hugging Face logits processor of the same name (the tests compare
them on random logits), in HF's order: `repetition_penalty` (seen tokens' logits divided by
the penalty when positive, multiplied when negative), `temperature` (logits / t), `top_k`
(keep the k largest, ties with the k-th kept), `top_p` (keep the smallest set of most likely
tokens whose mass exceeds p, at least one), then a draw, or the argmax after the penalty when
greedy. Removed tokens get `-inf` (HF's filter value). A row's "off" values (penalty 1,
temperature 1, top_k 0, top_p 1) change nothing.
"""

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

FILTERED = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How to pick the next token. The defaults are LIMA's (Zhou et al. 2023, section 2):
    nucleus sampling with p = 0.9, temperature 0.7, repetition penalty 1.2 on previously
    generated tokens, at most 2,048 new tokens. sample.py's flags, the server's request
    defaults, the HF export's generation_config and training's dev answers all read them here.

    `penalize_prompt`: whether prompt tokens count as "seen" for the repetition penalty.
    Default False: LIMA penalises *previously generated* tokens only. True gives
    `transformers` `generate(repetition_penalty=...)`, whose `input_ids` include the prompt.
    `greedy`: argmax after the repetition penalty, like `generate(do_sample=False)`.
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

    def generation_config(self) -> dict:
        """These settings as transformers' generation_config.json fields."""
        return {"do_sample": not self.greedy, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "repetition_penalty": self.repetition_penalty, "max_new_tokens": self.max_new_tokens}


LIMA = SamplingSettings()


class RowSettings(NamedTuple):
    """Per-row decoding settings, each [B]."""

    temperature: jax.Array  # float32, > 0 (1 where greedy)
    top_p: jax.Array  # float32 in (0, 1]
    top_p_floor: jax.Array  # float32: 1 - top_p computed in float64, as HF's Python float
    top_k: jax.Array  # int32, 0 = off
    penalty: jax.Array  # float32 repetition penalty, 1 = off
    greedy: jax.Array  # bool

    @classmethod
    def of(cls, rows: Sequence[SamplingSettings]) -> "RowSettings":
        """Host arrays for a list of settings (greedy rows divide by 1, not by their temperature)."""
        f32 = lambda values: np.asarray(values, np.float32)  # noqa: E731
        return cls(f32([1.0 if s.greedy else s.temperature for s in rows]), f32([s.top_p for s in rows]),
                   f32([1.0 - s.top_p for s in rows]), np.asarray([s.top_k for s in rows], np.int32),
                   f32([s.repetition_penalty for s in rows]), np.asarray([s.greedy for s in rows], bool))


def repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """logits [B, V], seen [B, V] bool, penalty [B]: seen tokens' logits / penalty (> 0) or * penalty (< 0)."""
    penalty = penalty[:, None]
    return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def temperature(logits: jax.Array, t: jax.Array) -> jax.Array:
    return logits / t[:, None]


def top_k(logits: jax.Array, k: jax.Array) -> jax.Array:
    """Keep each row's k largest logits (k [B]; 0 = off), ties with the k-th kept (HF's rule).
    The k-th largest is found by bisection over the logits' order-preserving integer keys
    (counts are exact, so the threshold is the sort's), as `top_p` finds its threshold."""
    keys = _order_keys(logits)

    def bisect(_, bounds):  # the largest key with at least k logits at or above it
        lo, hi = bounds
        mid = lo + (hi - lo + 1) // 2
        enough = (keys >= mid[:, None]).sum(-1) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    kth, _ = jax.lax.fori_loop(0, 32, bisect, (keys.min(-1), keys.max(-1)))
    off = (k <= 0) | (k >= logits.shape[-1])
    return jnp.where(off[:, None] | (keys >= kth[:, None]), logits, FILTERED)


def top_p(logits: jax.Array, p: jax.Array, floor: jax.Array) -> jax.Array:
    """HF's top-p per row (p and floor = 1 - p [B]), without sorting.

    HF's rule removes the tokens whose ascending cumulative probability is <= 1 - p; that is a
    token x is removed iff the mass of the tokens with logits <= x's is <= 1 - p (ties
    included), and the most likely token is always kept. The threshold is found by bisection
    over the logits' order-preserving integer keys: 32 masked sums instead of a sort, which
    XLA:CPU runs ~30x slower than numpy (0.3-0.4 s for [16, 32k]). The kept set is HF's up to
    float rounding of the sums at the nucleus's edge, which changes a draw only when the token
    on that edge is the one drawn."""
    probs = jax.nn.softmax(logits, axis=-1)
    keys = _order_keys(logits)

    def mass_upto(key):  # [B] -> [B]: the probability of the tokens whose key is <= key
        return jnp.where(keys <= key[:, None], probs, 0.0).sum(-1)

    def bisect(_, bounds):  # the smallest key whose mass exceeds the floor
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        above = mass_upto(mid) > floor
        return jnp.where(above, lo, mid + 1), jnp.where(above, mid, hi)

    threshold, _ = jax.lax.fori_loop(0, 32, bisect, (keys.min(-1), keys.max(-1)))
    kept = (keys >= threshold[:, None]) | (logits == logits.max(-1, keepdims=True))
    return jnp.where((p[:, None] >= 1.0) | kept, logits, FILTERED)


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys ordered as the float32 values: sign bit flipped for positives, all bits for negatives
    (-0.0 made +0.0 first: the two are equal as floats, so they must tie)."""
    x = jnp.where(x == 0, jnp.float32(0), x.astype(jnp.float32))
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def process(logits: jax.Array, seen: jax.Array, s: RowSettings) -> jax.Array:
    """The sampling transforms in HF's order (a greedy row's argmax needs only the penalty)."""
    logits = temperature(repetition_penalty(logits, seen, s.penalty), s.temperature)
    return top_p(top_k(logits, s.top_k), s.top_p, s.top_p_floor)


def next_tokens(logits: jax.Array, seen: jax.Array, bias: jax.Array, keys: jax.Array, s: RowSettings,
                sampling: jax.Array | bool = True) -> jax.Array:
    """logits, bias [B, V] float32 (bias: OpenAI's logit_bias, added first), seen [B, V] bool,
    keys [B] PRNG keys -> [B] int32 token ids. `sampling` False (a traced bool too) skips the
    transforms and the draw when every row that matters is greedy."""
    logits = logits + bias
    greedy = jnp.argmax(repetition_penalty(logits, seen, s.penalty), axis=-1).astype(jnp.int32)

    def draw():  # each row drawn over a [1, V] array: a row's token depends on its key alone
        warped = process(logits, seen, s)
        return jax.vmap(lambda k, row: jax.random.categorical(k, row[None], axis=-1)[0])(keys, warped).astype(jnp.int32)

    drawn = jax.lax.cond(sampling, draw, lambda: greedy)  # top-p and the draw cost more than the model on CPU
    return jnp.where(s.greedy, greedy, drawn)
