"""Decoding in fixed batch slots, for continuous batching: a new request's prompt is written
into a free slot of a shared KV cache while other slots are mid-answer, and one jitted step
advances every slot by one token, each at its own position with its own settings.

The state (`init_slots`) holds, per slot b of B: the cache row ([L, B, KV, T, D], T the
model's max_seq_len), the token to feed next and its position, how many tokens it has
emitted, the tokens it has emitted (for the repetition penalty), its logit bias, PRNG key
and decoding settings (row_transforms.RowSettings).

`insert` prefills up to M prompts at once (M a multiple of the mesh's batch shards; rows
with slot = B are filler and write nothing). A prompt of length P writes its first P - 1
tokens at slots 0..P-2; its last token becomes the slot's next token at position P - 1, so
the step that feeds it picks the first answer token and every token of an answer comes
from the same step. Cache slots past the prompt keep the previous request's entries with
segment 0 or behind the causal mask, so a row sees exactly its own prompt and answer, as
generate.py's rows do (greedy answers equal the Sampler's: tests/test_serving.py).

`decode_step` feeds each active slot's token at its position and returns, per slot, the new
token, its log-probability and the `TOP_LOGPROBS` most likely tokens with theirs: the
log-softmax of the model's logits over the real vocabulary, before any decoding transform.
Randomness is generate.py's for row id 0: token t of a request with seed s is drawn with
`fold_in(fold_in(key(s), 0), t)`, so a seeded request gets the Sampler's sampled answer.
"""

import functools

import jax
import jax.numpy as jnp

from lima_jax.model import ModelConfig, bind
from lima_jax.sampling.generate import constrain_cache, init_cache
from lima_jax.sampling.row_transforms import RowSettings, next_tokens
from lima_jax.sharding import constrain

TOP_LOGPROBS = 20  # OpenAI's largest top_logprobs


def request_key(seed: int) -> jax.Array:
    """The raw key data of a request's stream: generate.py's row 0 with this seed."""
    return jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 0))


@functools.partial(jax.jit, static_argnums=(0, 1))
def init_slots(cfg: ModelConfig, slots: int) -> dict:
    """An empty state of `slots` slots over a cache of cfg.max_seq_len positions."""
    vocab = cfg.padded_vocab_size
    zeros = lambda dtype: jnp.zeros(slots, dtype)  # noqa: E731
    return {"cache": init_cache(cfg, slots, cfg.max_seq_len), "token": zeros(jnp.int32), "position": zeros(jnp.int32),
            "count": zeros(jnp.int32), "seen": jnp.zeros((slots, vocab), bool),
            "bias": jnp.zeros((slots, vocab), jnp.float32), "key": jnp.zeros((slots, *request_key(0).shape), jnp.uint32),
            "settings": RowSettings(jnp.ones(slots), jnp.ones(slots), jnp.zeros(slots), jnp.ones(slots),
                                    jnp.ones(slots, bool))}


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("state",))
def insert(cfg: ModelConfig, params: dict, state: dict, new: dict) -> dict:
    """Prefill new requests into their slots.

    new: "slot" [M] int32 (B for a filler row), "tokens" [M, W] right-padded prompts (W <=
    T), "length" [M] prompt lengths (1 <= P <= W), "key" [M, ...] uint32 (request_key), "bias" [M, V]
    float32, "settings" a RowSettings of [M] arrays."""
    slot, tokens, length = new["slot"], new["tokens"], new["length"]
    rows, width = tokens.shape
    in_prompt = (jnp.arange(width)[None, :] < (length - 1)[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(width), tokens.shape)
    _, fresh = bind(cfg, params).hidden(tokens, positions, in_prompt, cache=init_cache(cfg, rows, width),
                                        cache_index=jnp.zeros(rows, jnp.int32))
    cache = state["cache"]
    segments = jnp.zeros((rows, cache["segment_ids"].shape[1]), jnp.int32).at[:, :width].set(in_prompt)
    cache = {"k": cache["k"].at[:, slot, :, :width].set(fresh["k"], mode="drop"),
             "v": cache["v"].at[:, slot, :, :width].set(fresh["v"], mode="drop"),
             "segment_ids": cache["segment_ids"].at[slot].set(segments, mode="drop")}
    put = lambda old, value: old.at[slot].set(value, mode="drop")  # noqa: E731
    last = tokens[jnp.arange(rows), length - 1]
    return {"cache": constrain_cache(cache), "token": put(state["token"], last),
            "position": put(state["position"], length - 1), "count": put(state["count"], 0),
            "seen": put(state["seen"], False), "bias": put(state["bias"], new["bias"]),
            "key": put(state["key"], new["key"]),
            "settings": jax.tree.map(put, state["settings"], new["settings"])}


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("state",))
def decode_step(cfg: ModelConfig, params: dict, state: dict, active: jax.Array) -> tuple[dict, dict]:
    """One token for every active slot (active [B] bool; inactive slots change nothing that
    matters). Returns the new state and {"token" [B], "logprob" [B], "top_ids" [B, K],
    "top_logprobs" [B, K]}."""
    model = bind(cfg, params)
    position = state["position"]
    hidden, cache = model.hidden(state["token"][:, None], position[:, None], active[:, None].astype(jnp.int32),
                                 cache=state["cache"], cache_index=position)
    logits = model.logits(hidden[:, 0])
    logprobs = jax.nn.log_softmax(logits[:, :cfg.vocab_size])  # the model's own distribution
    top_logprobs, top_ids = jax.lax.top_k(logprobs, TOP_LOGPROBS)
    keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(state["key"]), state["count"])
    settings = state["settings"]
    token = next_tokens(logits, state["seen"], state["bias"], keys, settings, jnp.any(active & ~settings.greedy))
    rows = jnp.arange(token.shape[0])
    last = cache["segment_ids"].shape[1] - 1
    state = dict(state, cache=constrain_cache(cache), token=jnp.where(active, token, state["token"]),
                 position=jnp.where(active, jnp.minimum(position + 1, last), position),
                 count=state["count"] + active, seen=state["seen"].at[rows, token].max(active))
    out = {"token": token, "logprob": logprobs[rows, jnp.minimum(token, cfg.vocab_size - 1)],
           "top_ids": top_ids.astype(jnp.int32), "top_logprobs": top_logprobs}
    return state, {name: constrain(x, *(None,) * x.ndim) for name, x in out.items()}  # replicated: every host reads it
