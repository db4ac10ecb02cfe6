"""Prefill + decode against a preallocated KV cache, the whole loop inside one jitted function.

Prompts come right-padded in one [B, P] array with their lengths. The cache holds
T = P + max_new_tokens slots per row (static shapes). Prefill writes the prompt at slots
0..P-1 (real tokens segment 1, padding segment 0, so padding is never attended); decode
step t writes the previous token of row b at slot len_b + t - 1 with segment 1, over the
stale padding, at RoPE position len_b + t - 1 - so every row sees exactly its own prompt
followed by its own answer, as if it were alone. A `jax.lax.while_loop` runs until every
row has emitted a stop token or `max_new_tokens` are out.

Sharding: run `generate` under `jax.set_mesh(mesh)` with params placed by
`named_shardings(param_logical_axes(cfg), mesh)`; the cache is constrained to its own
logical axes (`cache_batch`, `cache_kv_heads`, ...) from lima_jax.sharding.RULES.

Randomness: row b's token t is drawn with `fold_in(fold_in(key, row_ids[b]), t)`, so an
answer depends on the seed and the example's id, not on which batch or mesh it ran in.
"""

import functools

import jax
import jax.numpy as jnp

from lima_jax.model import ModelConfig, bind
from lima_jax.sampling.transforms import SamplingSettings, next_token
from lima_jax.sharding import constrain

CACHE_AXES = ("cache_layers", "cache_batch", "cache_kv_heads", "cache_length", "cache_head_dim")


def cache_logical_axes() -> dict:
    return {"k": CACHE_AXES, "v": CACHE_AXES, "segment_ids": ("cache_batch", "cache_length")}


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict:
    """An empty cache (segment 0 everywhere: nothing attendable), constrained to the cache axes."""
    shape = (cfg.n_layers, batch, cfg.n_kv_heads, length, cfg.head_dim)  # head-major, as the model
    dtype = dtype or cfg.compute_dtype
    return constrain_cache({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                            "segment_ids": jnp.zeros((batch, length), jnp.int32)})


def constrain_cache(cache: dict) -> dict:
    axes = cache_logical_axes()
    return {name: constrain(cache[name], *axes[name]) for name in axes}


@functools.partial(jax.jit, static_argnames=("cfg", "settings", "stop_ids", "on_token"))
def generate(cfg: ModelConfig, settings: SamplingSettings, params: dict, prompts: jax.Array,
             prompt_lengths: jax.Array, key: jax.Array, row_ids: jax.Array | None = None,
             stop_ids: tuple[int, ...] = (), on_token=None) -> dict:
    """Answer a batch of right-padded prompts.

    prompts [B, P] int32, prompt_lengths [B] (>= 1), key: a PRNG key (unused when greedy),
    row_ids [B]: per-row stream ids for sampling (default 0..B-1).
    on_token: None, or a hashable host callable `(step, tokens [B])` called as each step's
    tokens are picked (streaming; unordered, as ordered effects need one device: see
    sampler._StreamCallback for putting steps back in order).
    Returns {"tokens": [B, N] int32 (0 after a row stopped), "lengths": [B] answer tokens
    before the stop token, "stopped": [B] bool (emitted a stop token), "steps": loop steps}.
    """
    batch, prompt_len = prompts.shape
    n_new = settings.max_new_tokens
    model = bind(cfg, params)
    rows = jnp.arange(batch)
    row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(rows if row_ids is None else row_ids)
    stops = jnp.asarray(stop_ids or (-1,), jnp.int32)
    prompt_lengths = prompt_lengths.astype(jnp.int32)

    def pick(logits, seen, t):
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(row_keys)
        pick_row = lambda lg, sn, k: next_token(lg[None], sn[None], k, settings)[0]  # noqa: E731
        return jax.vmap(pick_row)(logits, seen, step_keys)

    # ---- prefill: the whole prompt at once, logits at each row's last real token ----
    slots = jnp.arange(prompt_len)[None, :]
    in_prompt = slots < prompt_lengths[:, None]
    cache = init_cache(cfg, batch, prompt_len + n_new)
    hidden, cache = model.hidden(prompts, jnp.broadcast_to(slots, prompts.shape), in_prompt.astype(jnp.int32),
                                 cache=cache, cache_index=jnp.zeros(batch, jnp.int32))
    last = hidden[rows, prompt_lengths - 1]
    seen = jnp.zeros((batch, cfg.padded_vocab_size), bool)
    if settings.penalize_prompt:
        seen = seen.at[rows[:, None], prompts].max(in_prompt)
    token = pick(model.logits(last), seen, 0)
    out = jnp.zeros((batch, n_new), jnp.int32).at[:, 0].set(token)
    done = jnp.isin(token, stops)
    seen = seen.at[rows, token].set(True)
    if on_token is not None:
        jax.debug.callback(on_token, 0, token)

    # ---- decode: one token per row per step ----
    def cond(state):
        t, _, _, _, done, _ = state
        return (t < n_new) & ~jnp.all(done)

    def body(state):
        t, cache, token, out, done, seen = state
        slot = prompt_lengths + t - 1
        hidden, cache = model.hidden(token[:, None], slot[:, None], jnp.ones((batch, 1), jnp.int32),
                                     cache=cache, cache_index=slot)
        new = pick(model.logits(hidden[:, 0]), seen, t)
        new = jnp.where(done, 0, new)
        out = out.at[:, t].set(new)
        if on_token is not None:
            jax.debug.callback(on_token, t, new)
        seen = seen.at[rows, new].max(~done)
        done = done | jnp.isin(new, stops)
        return t + 1, constrain_cache(cache), new, out, done, seen

    steps, _, _, out, done, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, token, out, done, seen))
    is_stop = jnp.isin(out, stops) & (jnp.arange(n_new) < steps)
    stopped = is_stop.any(axis=1)
    lengths = jnp.where(stopped, jnp.argmax(is_stop, axis=1), steps)
    return {"tokens": out, "lengths": lengths, "stopped": stopped, "steps": steps}
