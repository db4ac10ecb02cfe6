"""LIMA's decoding transforms with each row's settings as arrays, so that one jitted step picks
the next token of rows that belong to different requests (a server's batch slots).

Per row b: `bias[b]` is added to the logits (OpenAI's `logit_bias`), then transforms.py's
order: repetition penalty, temperature, top-p, then a draw, or the argmax after the penalty
when `greedy[b]`. With a row's settings equal to a `SamplingSettings` (top_k 0, no bias),
a row's token equals `transforms.next_token`'s for the same logits, seen tokens and key
(tests/test_serving_slots.py compares them): a penalty or temperature of 1 changes nothing,
and top_p >= 1 keeps every token.

`top_p_floor` is `1 - top_p` computed on the host in float64, as transforms.top_p does with
a Python float; computing it in float32 on the device would move the threshold by an ulp.
top_p finds its threshold by bisection instead of a sort (see `top_p`): the same tokens
kept, up to float rounding of the probability sums at the nucleus's edge.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lima_jax.sampling.transforms import FILTERED


class RowSettings(NamedTuple):
    """Per-row decoding settings, each [B]."""

    temperature: jax.Array  # float32, > 0 (ignored where greedy)
    top_p: jax.Array  # float32 in (0, 1]
    top_p_floor: jax.Array  # float32: 1 - top_p, from float64
    penalty: jax.Array  # float32 repetition penalty, 1 = off
    greedy: jax.Array  # bool


def repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """logits [B, V], seen [B, V] bool, penalty [B]: transforms.repetition_penalty per row."""
    penalty = penalty[:, None]
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def top_p(logits: jax.Array, p: jax.Array, floor: jax.Array) -> jax.Array:
    """transforms.top_p per row (logits [B, V], p and floor = 1 - p [B]), without sorting.

    HF's rule removes the tokens whose ascending cumulative probability is <= 1 - p; that is
    a token x is removed iff the mass of the tokens with logits <= x's is <= 1 - p (ties
    included), and the most likely token is always kept. The threshold is found by bisection
    over the logits' order-preserving integer keys: 32 masked sums instead of a sort, which
    XLA:CPU runs ~30x slower than numpy (0.3-0.4 s for [16, 32k]). The kept set is HF's up
    to float rounding of the sums at the nucleus's edge."""
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


def next_tokens(logits: jax.Array, seen: jax.Array, bias: jax.Array, keys: jax.Array, s: RowSettings,
                sampling: jax.Array | bool = True) -> jax.Array:
    """logits, bias [B, V] float32, seen [B, V] bool, keys [B] PRNG keys -> [B] int32 token ids.
    `sampling` False (a traced bool too) skips the draw when every row that matters is greedy."""
    logits = repetition_penalty(logits + bias, seen, s.penalty)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():  # each row drawn over a [1, V] array, as generate.py draws it, so a seed gives the same token
        warped = top_p(logits / s.temperature[:, None], s.top_p, s.top_p_floor)
        return jax.vmap(lambda k, row: jax.random.categorical(k, row[None], axis=-1)[0])(keys, warped).astype(jnp.int32)

    drawn = jax.lax.cond(sampling, draw, lambda: greedy)  # top-p and the draw cost more than the model on CPU
    return jnp.where(s.greedy, greedy, drawn)
