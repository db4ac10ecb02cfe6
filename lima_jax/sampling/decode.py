"""The decode step: fixed batch slots over one KV cache, continuous batching. sample.py (one
prompt or a whole answers file), the chat, the server and aot_check all run it.

A prompt is written into a free slot while other slots are mid-answer (`insert`), and one
jitted step advances every slot by one token, each at its own position with its own settings
(`decode_step`). The state (`init_slots`) holds, per slot b of B: its cache row (row b of
[L, B, T, KV, D], or of [L, B, KV, T, D] on CPU: model.kv_cache.Layout), the token to feed
next and its position, how many tokens it has emitted, the tokens it has emitted (for the
repetition penalty), its logit bias, PRNG key and decoding settings.

`insert` prefills up to M prompts at once (M a multiple of the mesh's batch shards; rows with
slot = B are filler and write nothing). A prompt of length P writes its first P - 1 tokens at
cache slots 0..P-2; its last token becomes the slot's next token at position P - 1, so the
step that feeds it picks the first answer token and every answer token comes from the same
step. Cache entries past the prompt keep the previous occupant's keys with segment 0 or behind
the causal mask, so a row sees exactly its own prompt and answer, whatever its neighbours.

Randomness: token t of a request with seed s and stream id r (an answers file's row: its
index in the prompts file) is drawn with `fold_in(fold_in(key(s), r), t)`, so an answer
depends on the seed and its row id, never on its slot, its neighbours or the mesh.

`Decoder` is the host side: which request holds which slot, prefills grouped into a few
shapes, stop tokens and length limits. The serving engine and the Sampler drive it.
"""

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lima_jax.model import ModelConfig, bind
from lima_jax.model.counting import prefill_flops
from lima_jax.model.kv_cache import Layout
from lima_jax.sampling.decoding import LIMA, RowSettings, SamplingSettings, next_tokens
from lima_jax.sharding import constrain, logical_to_spec

TOP_LOGPROBS = 20  # OpenAI's largest top_logprobs
DEFAULT_SLOTS = 16  # serve.py's --slots, and so aot_check's decode step
PROMPT_BUCKET = 64  # prompts are right-padded to a multiple of this: one prefill compilation per bucket


def cache_logical_axes(cfg: ModelConfig) -> dict:
    """The cache's logical axis names, in the layout of the program being traced (Layout.of)."""
    kv = Layout.of(cfg).axes()
    return {"k": kv, "v": kv, "segment_ids": ("cache_batch", "cache_length")}


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict:
    """An empty cache (segment 0 everywhere: nothing attendable), constrained to the cache axes."""
    shape = Layout.of(cfg).shape(cfg, batch, length)
    dtype = dtype or cfg.compute_dtype
    return constrain_cache(cfg, {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                                 "segment_ids": jnp.zeros((batch, length), jnp.int32)})


def constrain_cache(cfg: ModelConfig, cache: dict) -> dict:
    axes = cache_logical_axes(cfg)
    return {name: constrain(cache[name], *axes[name]) for name in axes}


def request_key(seed: int, row: int = 0) -> jax.Array:
    """The raw key data of a request's stream: row `row` of seed `seed`."""
    return jax.random.key_data(jax.random.fold_in(jax.random.key(seed), row))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def init_slots(cfg: ModelConfig, slots: int, length: int) -> dict:
    """An empty state of `slots` slots over a cache of `length` positions."""
    vocab = cfg.padded_vocab_size
    zeros = lambda dtype: jnp.zeros(slots, dtype)  # noqa: E731
    return {"cache": init_cache(cfg, slots, length), "token": zeros(jnp.int32), "position": zeros(jnp.int32),
            "count": zeros(jnp.int32), "seen": jnp.zeros((slots, vocab), bool),
            "bias": jnp.zeros((slots, vocab), jnp.float32), "key": jnp.zeros((slots, *request_key(0).shape), jnp.uint32),
            "settings": RowSettings(*(jnp.asarray(a) for a in RowSettings.of([LIMA] * slots)))}


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("state",))
def insert(cfg: ModelConfig, params: dict, state: dict, new: dict) -> dict:
    """Prefill new requests into their slots.

    new: "slot" [M] int32 (B for a filler row), "tokens" [M, W] right-padded prompts (W <= T),
    "length" [M] prompt lengths (1 <= P <= W), "key" [M, ...] uint32 (request_key), "bias" [M, V]
    float32, "penalize" [M] bool (prompt tokens count as seen), "settings" a RowSettings of [M]."""
    rows, width = new["tokens"].shape
    return prefill_rows(cfg, params, state, new, new["tokens"], jnp.zeros(rows, jnp.int32),
                        init_cache(cfg, rows, width))


def prefill_rows(cfg: ModelConfig, params: dict, state: dict, new: dict, feed: jax.Array, start: jax.Array,
                 row_cache: dict) -> dict:
    """`insert`'s body, feeding each row's prompt from `start` [M] on: `feed` [M, S] holds its
    tokens start .. start + S - 1, and `row_cache` (width C >= start + S, C <= T) already holds
    its first `start` tokens' keys and values (segment 1; a prefix cache's blocks), which the
    fed tokens attend to. With start 0 and an empty row cache it is a whole prompt's prefill."""
    slot, tokens, length = new["slot"], new["tokens"], new["length"]
    rows, width = tokens.shape
    columns = jnp.arange(width)[None, :]
    positions = start[:, None] + jnp.arange(feed.shape[1])[None, :]
    in_prompt = (positions < (length - 1)[:, None]).astype(jnp.int32)
    _, fresh = bind(cfg, params).hidden(feed, positions, in_prompt, cache=row_cache, cache_index=start)
    cache, filled = state["cache"], row_cache["segment_ids"].shape[1]
    segments = jnp.zeros((rows, cache["segment_ids"].shape[1]), jnp.int32).at[:, :filled].set(fresh["segment_ids"])
    into = Layout.of(cfg).at(slice(None), slot, slice(None, filled))  # every layer, the slots' first positions
    cache = {"k": cache["k"].at[into].set(fresh["k"], mode="drop"),
             "v": cache["v"].at[into].set(fresh["v"], mode="drop"),
             "segment_ids": cache["segment_ids"].at[slot].set(segments, mode="drop")}
    seen = jnp.zeros((rows, state["seen"].shape[1]), bool).at[jnp.arange(rows)[:, None], tokens].max(
        (columns < length[:, None]) & new["penalize"][:, None])
    put = lambda old, value: old.at[slot].set(value, mode="drop")  # noqa: E731
    last = tokens[jnp.arange(rows), length - 1]
    return {"cache": constrain_cache(cfg, cache), "token": put(state["token"], last),
            "position": put(state["position"], length - 1), "count": put(state["count"], 0),
            "seen": put(state["seen"], seen), "bias": put(state["bias"], new["bias"]),
            "key": put(state["key"], new["key"]),
            "settings": jax.tree.map(put, state["settings"], new["settings"])}


def _advance(cfg: ModelConfig, params: dict, state: dict, active: jax.Array) -> tuple[dict, jax.Array, jax.Array]:
    """One token for every active slot: (new state, the model's logits [B, Vp], the tokens [B])."""
    model = bind(cfg, params)
    position = state["position"]
    hidden, cache = model.hidden(state["token"][:, None], position[:, None], active[:, None].astype(jnp.int32),
                                 cache=state["cache"], cache_index=position)
    logits = model.logits(hidden[:, 0])
    keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(state["key"]), state["count"])
    settings = state["settings"]
    token = next_tokens(logits, state["seen"], state["bias"], keys, settings, jnp.any(active & ~settings.greedy))
    rows = jnp.arange(token.shape[0])
    last = cache["segment_ids"].shape[1] - 1
    state = dict(state, cache=constrain_cache(cfg, cache), token=jnp.where(active, token, state["token"]),
                 position=jnp.where(active, jnp.minimum(position + 1, last), position),
                 count=state["count"] + active, seen=state["seen"].at[rows, token].max(active))
    return state, logits, token


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("state",))
def decode_step(cfg: ModelConfig, params: dict, state: dict, active: jax.Array) -> tuple[dict, dict]:
    """One token for every active slot (active [B] bool; inactive slots change nothing that
    matters). Returns the new state and {"token" [B], "logprob" [B], "top_ids" [B, K],
    "top_logprobs" [B, K]}: the log-softmax of the model's logits over the real vocabulary,
    before any decoding transform, for the token and the K most likely."""
    state, logits, token = _advance(cfg, params, state, active)
    logprobs = jax.nn.log_softmax(logits[:, :cfg.vocab_size])  # the model's own distribution
    top_logprobs, top_ids = jax.lax.top_k(logprobs, TOP_LOGPROBS)
    rows = jnp.arange(token.shape[0])
    out = {"token": token, "logprob": logprobs[rows, jnp.minimum(token, cfg.vocab_size - 1)],
           "top_ids": top_ids.astype(jnp.int32), "top_logprobs": top_logprobs}
    return state, {name: constrain(x, *(None,) * x.ndim) for name, x in out.items()}  # replicated: every host reads it


@functools.partial(jax.jit, static_argnames=("cfg", "steps"), donate_argnames=("state",))
def decode_steps(cfg: ModelConfig, params: dict, state: dict, active: jax.Array, steps: int) -> tuple[dict, dict]:
    """`steps` tokens for every active slot in one call, without logprobs: {"token" [steps, B]}.
    A slot whose answer ends mid-call goes on decoding for nothing until the call returns; the
    host reads its tokens up to the end. For callers that need no token-by-token latency
    (an answers file): one host round trip per `steps` tokens."""
    def body(state, _):
        state, _, token = _advance(cfg, params, state, active)
        return state, token

    state, tokens = jax.lax.scan(body, state, length=steps)
    return state, {"token": constrain(tokens, None, None)}


@dataclasses.dataclass(frozen=True)
class Request:
    """One answer to decode: prompt ids, at most `max_tokens` new tokens, its decoding (LIMA's
    by default), its seed and stream id (`row`), and OpenAI's logit_bias."""

    prompt: tuple[int, ...]
    max_tokens: int
    temperature: float = LIMA.temperature
    top_p: float = LIMA.top_p
    repetition_penalty: float = LIMA.repetition_penalty
    greedy: bool = LIMA.greedy
    seed: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    top_k: int = LIMA.top_k
    penalize_prompt: bool = LIMA.penalize_prompt
    row: int = 0

    @classmethod
    def of(cls, prompt, settings: SamplingSettings, seed: int = 0, row: int = 0) -> "Request":
        return cls(tuple(prompt), settings.max_new_tokens, settings.temperature, settings.top_p,
                   settings.repetition_penalty, settings.greedy, seed, (), settings.top_k, settings.penalize_prompt, row)

    def settings(self) -> SamplingSettings:
        return SamplingSettings(self.temperature if not self.greedy else 1.0, self.top_p, self.top_k,
                                self.repetition_penalty, self.penalize_prompt, self.greedy, self.max_tokens)


def batch_multiple(mesh: Mesh | None) -> int:
    """Rows a batch needs a multiple of: the mesh's batch shards."""
    if mesh is None:
        return 1
    spec = logical_to_spec(("batch",), mesh.axis_names)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(mesh.shape[a] for a in axes)


class Decoder:
    """Requests in fixed slots (`num_slots`: `slots` rounded up to the mesh's batch shards) over a
    cache of `length` positions. `admit` prefills requests into free slots; `step` advances every
    occupied slot by one token and frees the slots whose request ended. `prompt_width`: every
    prefill pads its prompts to this width (one compilation per row count) instead of to the
    longest prompt's PROMPT_BUCKET multiple (one per row count and width: a server's prompts are
    not known ahead)."""

    def __init__(self, cfg: ModelConfig, params: dict, mesh: Mesh | None, stop_ids, slots: int = DEFAULT_SLOTS,
                 length: int | None = None, prompt_width: int | None = None, prefix_cache=None):
        self.cfg, self.params, self.mesh = cfg, params, mesh
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.group = batch_multiple(mesh)  # rows a prefill takes
        self.num_slots = math.ceil(slots / self.group) * self.group
        self.length = length or cfg.max_seq_len
        self.prompt_width = prompt_width
        if prefix_cache is not None and prompt_width is not None:
            raise ValueError("a prefix cache feeds prompts of varying widths: give no prompt_width")
        self.prefix_cache = prefix_cache  # a prefix_cache.PrefixCache, or None
        self.prefill_stats = {"prefills": 0, "tokens_fed": 0, "flops": 0.0}  # padding and filler rows included
        self.reset()

    def reset(self) -> None:
        """Every slot free, an empty cache (and prefix cache)."""
        self.slots: list[tuple[object, Request] | None] = [None] * self.num_slots
        self.emitted = [0] * self.num_slots
        with self.on_mesh():
            self.state = init_slots(self.cfg, self.num_slots, self.length)
            if self.prefix_cache is not None:
                self.prefix_cache.reset()
                self.prefix_cache.allocate()

    def on_mesh(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def check(self, request: Request) -> None:
        """ValueError for a request the cache cannot hold."""
        limit = self.length
        if not 1 <= len(request.prompt) <= limit - 1:
            raise ValueError(f"the prompt has {len(request.prompt)} tokens; this model takes 1 to {limit - 1}")
        if not 1 <= request.max_tokens <= limit - len(request.prompt):
            raise ValueError(f"max_tokens={request.max_tokens}: 1 to {limit - len(request.prompt)} for this prompt")

    @property
    def free(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is None]

    @property
    def active(self) -> int:
        return self.num_slots - len(self.free)

    def admit(self, requests: list[tuple[object, Request]]) -> None:
        """Prefill (tag, request) pairs, at most `len(free)`, into free slots; requests that come
        together are prefilled together, in as few inserts as `prefill_rows` allows."""
        free = self.free
        assert len(requests) <= len(free), "admit at most as many requests as there are free slots"
        requests = list(requests)
        with self.on_mesh():
            while requests:
                rows = self.prefill_rows(len(requests))
                batch, requests = requests[:rows], requests[rows:]
                slots, free = free[:len(batch)], free[len(batch):]
                self._prefill(batch, slots, rows)
                for item, index in zip(batch, slots):
                    self.slots[index], self.emitted[index] = item, 0

    def prefill_rows(self, waiting: int) -> int:
        """Rows of one prefill: `group` times a power of two, enough for `waiting` up to the slot
        count, so only a few shapes ever compile (`compile_prefills` does them ahead)."""
        rows = self.group
        while rows < waiting:
            rows *= 2
        return min(rows, self.num_slots)

    def compile_prefills(self) -> None:
        """Run every prefill shape once at the shortest width, with filler rows only (no-ops)."""
        rows = self.group
        with self.on_mesh():
            while True:
                self.state = insert(self.cfg, self.params, self.state, self._insert_rows([], [], rows))
                if rows >= self.num_slots:
                    return
                rows = self.prefill_rows(rows + 1)

    def _prefill(self, batch: list[tuple[object, Request]], slots: list[int], rows: int) -> None:
        new = self._insert_rows(batch, slots, rows)
        if self.prefix_cache is None:
            self.state = insert(self.cfg, self.params, self.state, new)
            self._count_prefill(*new["tokens"].shape, new["tokens"].shape[1])
        else:
            self.state, fed, keys = self.prefix_cache.prefill(self.cfg, self.params, self.state, new,
                                                              [r.prompt for _, r in batch], slots, self.length)
            self._count_prefill(rows, fed, keys)

    def _count_prefill(self, rows: int, fed: int, keys: int) -> None:
        stats = self.prefill_stats
        stats["prefills"] += 1
        stats["tokens_fed"] += rows * fed
        stats["flops"] += prefill_flops(self.cfg, rows, fed, keys)

    def _insert_rows(self, batch: list[tuple[object, Request]], slots: list[int], rows: int) -> dict:
        vocab = self.cfg.padded_vocab_size
        longest = max((len(r.prompt) for _, r in batch), default=1)
        width = self.prompt_width or min(math.ceil(longest / PROMPT_BUCKET) * PROMPT_BUCKET, self.length)
        new = {"slot": np.full(rows, self.num_slots, np.int32), "tokens": np.zeros((rows, width), np.int32),
               "length": np.ones(rows, np.int32), "key": np.zeros((rows, *request_key(0).shape), np.uint32),
               "bias": np.zeros((rows, vocab), np.float32), "penalize": np.zeros(rows, bool)}
        settings = [LIMA] * rows
        for row, ((_, r), index) in enumerate(zip(batch, slots)):
            new["slot"][row], new["length"][row], new["penalize"][row] = index, len(r.prompt), r.penalize_prompt
            new["tokens"][row, :len(r.prompt)] = r.prompt
            new["key"][row] = np.asarray(request_key(r.seed, r.row))
            for token, value in r.logit_bias:
                new["bias"][row, token] += value
            settings[row] = r.settings()
        new["settings"] = RowSettings.of(settings)
        return new

    def step(self, steps: int = 1) -> tuple[dict, list[tuple[int, object, int, str | None]]]:
        """`steps` tokens for every occupied slot: (the host outputs of decode_step, or of
        decode_steps when steps > 1, [(slot, tag, token, reason)] in token order) where reason
        is "stop" (the token is a stop id, not part of the answer), "length" (the answer's last
        token) or None; ended requests' slots are freed, and their later tokens dropped."""
        active = np.array([s is not None for s in self.slots])
        with self.on_mesh():
            if steps == 1:
                self.state, out = decode_step(self.cfg, self.params, self.state, active)
            else:
                self.state, out = decode_steps(self.cfg, self.params, self.state, active, steps)
        out = jax.device_get(out)
        events = []
        for tokens in out["token"].reshape(steps, -1):
            for index, held in enumerate(self.slots):
                if held is None:
                    continue
                tag, request = held
                token, reason = int(tokens[index]), None
                if token in self.stop_ids:
                    reason = "stop"
                else:
                    self.emitted[index] += 1
                    if self.emitted[index] >= request.max_tokens:
                        reason = "length"
                if reason is not None:
                    self.slots[index] = None
                events.append((index, tag, token, reason))
        return out, events

    def release(self, index: int) -> None:
        self.slots[index] = None
