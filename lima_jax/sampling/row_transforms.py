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
    """transforms.top_p per row: logits [B, V], p and floor (= 1 - p) [B]."""
    ascending = jnp.sort(logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    removed = (cumulative <= floor[:, None]).at[..., -1].set(False)
    threshold = jnp.take_along_axis(ascending, removed.sum(-1, keepdims=True), axis=-1)
    kept = jnp.where(logits < threshold, FILTERED, logits)
    return jnp.where(p[:, None] >= 1.0, logits, kept)


def next_tokens(logits: jax.Array, seen: jax.Array, bias: jax.Array, keys: jax.Array, s: RowSettings) -> jax.Array:
    """logits, bias [B, V] float32, seen [B, V] bool, keys [B] PRNG keys -> [B] int32 token ids."""
    logits = repetition_penalty(logits + bias, seen, s.penalty)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    warped = top_p(logits / s.temperature[:, None], s.top_p, s.top_p_floor)
    # each row drawn over a [1, V] array, as generate.py draws it, so a seed gives the same token
    draw = jax.vmap(lambda k, row: jax.random.categorical(k, row[None], axis=-1)[0])(keys, warped)
    return jnp.where(s.greedy, greedy, draw.astype(jnp.int32))
