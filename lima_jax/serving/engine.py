"""The batching engine: a fixed number of slots over one KV cache, continuous batching.

A thread runs the loop: take new requests and cancellations (feed.py), prefill waiting
requests into free slots (several at once, sampling.slots.insert), advance every occupied
slot by one token (sampling.slots.decode_step, one jitted function whatever the requests'
settings), hand each slot's token to its request's callback, and free the slots whose
request ended (a stop token, max_tokens, a cancellation). A request that arrives while
others are mid-answer joins at the next step; none waits for a whole batch to finish.

Callbacks run on the engine thread and must be quick (the HTTP app passes the events to its
event loop). Every process of a multi-host mesh runs this loop; only process 0 has callbacks.
"""

import contextlib
import dataclasses
import logging
import math
import threading
from collections import deque
from collections.abc import Callable

import jax
import numpy as np

from lima_jax.sampling.row_transforms import RowSettings
from lima_jax.sampling.sampler import PROMPT_BUCKET, Sampler
from lima_jax.sampling.slots import decode_step, init_slots, insert, request_key
from lima_jax.serving.feed import LocalFeed

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation: prompt ids and its decoding (LIMA's by default)."""

    prompt: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.2
    greedy: bool = False
    seed: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Token:
    """A generated token with its log-probability and the most likely alternatives (the model's
    log-softmax over the real vocabulary, before decoding transforms)."""

    id: int
    logprob: float
    top_ids: np.ndarray
    top_logprobs: np.ndarray


@dataclasses.dataclass(frozen=True)
class Finished:
    """The end of a request: "stop" (a stop token), "length" (max_tokens), "cancelled", "error"."""

    reason: str
    message: str = ""


Callback = Callable[[Token | Finished], None]


@dataclasses.dataclass
class _Slot:
    rid: int
    max_tokens: int
    emitted: int = 0


class Engine:
    """`submit` a Request with a callback; it receives Token events, then one Finished."""

    def __init__(self, sampler: Sampler, slots: int = 16, feed: LocalFeed | None = None):
        self.sampler, self.cfg = sampler, sampler.cfg
        self.group = sampler._batch_multiple()  # rows a prefill takes: the mesh's batch shards
        self.num_slots = math.ceil(slots / self.group) * self.group
        self.feed = feed or LocalFeed()
        self.stop_ids = frozenset(sampler.stop_ids)
        self._callbacks: dict[int, Callback] = {}
        self._pending: deque[tuple[int, Request]] = deque()
        self._slots: list[_Slot | None] = [None] * self.num_slots
        self._next_rid, self._lock = 0, threading.Lock()
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.peak_active = 0  # the most requests decoded together so far (/health reports it)

    # ---- the caller's side (any thread) ----

    def submit(self, request: Request, callback: Callback) -> int:
        """Queue a request; returns its id (for `cancel`)."""
        self.check(request)
        with self._lock:
            rid, self._next_rid = self._next_rid, self._next_rid + 1
            self._callbacks[rid] = callback
        self.feed.put(("submit", rid, request))
        return rid

    def cancel(self, rid: int) -> None:
        self.feed.put(("cancel", rid))

    def check(self, request: Request) -> None:
        """ValueError for a request the cache cannot hold."""
        limit = self.cfg.max_seq_len
        if not 1 <= len(request.prompt) <= limit - 1:
            raise ValueError(f"the prompt has {len(request.prompt)} tokens; this model takes 1 to {limit - 1}")
        if not 1 <= request.max_tokens <= limit - len(request.prompt):
            raise ValueError(f"max_tokens={request.max_tokens}: 1 to {limit - len(request.prompt)} for this prompt")

    @property
    def active(self) -> int:
        return sum(s is not None for s in self._slots)

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self.run, name="lima-engine", daemon=True)
        self._thread.start()
        return self

    def warmup(self, timeout: float = 600) -> None:
        """Compile the prefills (`_compile_prefills`) and the decode step (a one-token request)."""
        self.feed.put(("warmup",))
        done = threading.Event()
        bos = self.sampler.tokenizer.bos_id or 0  # any token compiles the step (Qwen has no BOS)
        self.submit(Request((bos,), 1), lambda e: done.set() if isinstance(e, Finished) else None)
        if not done.wait(timeout):
            raise TimeoutError(f"the engine did not answer a one-token request in {timeout} s")

    def shutdown(self) -> None:
        self.feed.put(("stop",))
        if self._thread is not None:
            self._thread.join()

    # ---- the loop (every process) ----

    def run(self) -> None:
        mesh = self.sampler.mesh
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            self._state = init_slots(self.cfg, self.num_slots)
            while True:
                events = self.feed.take(wait=not self._pending and self.active == 0)
                try:
                    if not self._apply(events):
                        break
                    self._admit()
                    if self.active:
                        self._step()
                except Exception as e:  # fail the requests in flight, keep serving
                    log.exception("engine step failed")
                    self._fail_all(f"{type(e).__name__}: {e}")
                    self._state = init_slots(self.cfg, self.num_slots)
        self._fail_all("the server is shutting down")

    def _apply(self, events: list) -> bool:
        """Apply new requests and cancellations; False on stop."""
        for event in events:
            if event[0] == "stop":
                return False
            if event[0] == "submit":
                self._pending.append((event[1], event[2]))
            elif event[0] == "warmup":
                self._compile_prefills()
            elif event[0] == "cancel":
                self._cancel(event[1])
        return True

    def _cancel(self, rid: int) -> None:
        for i, (waiting, _) in enumerate(self._pending):
            if waiting == rid:
                del self._pending[i]
                self._emit(rid, Finished("cancelled"))
                with self._lock:
                    self._callbacks.pop(rid, None)
                return
        for index, slot in enumerate(self._slots):
            if slot is not None and slot.rid == rid:
                self._finish(index, Finished("cancelled"))

    def _admit(self) -> None:
        """Prefill waiting requests into free slots, all in one insert (see `_prefill_rows`)."""
        free = [i for i, s in enumerate(self._slots) if s is None]
        while free and self._pending:
            rows = self._prefill_rows(min(len(free), len(self._pending)))
            batch = [self._pending.popleft() for _ in range(min(rows, len(free), len(self._pending)))]
            slots, free = free[:len(batch)], free[len(batch):]
            new = self._insert_rows(batch, slots, rows)
            self._state = insert(self.cfg, self.sampler.params, self._state, new)
            for (rid, request), index in zip(batch, slots):
                self._slots[index] = _Slot(rid, request.max_tokens)
        self.peak_active = max(self.peak_active, self.active)

    def _prefill_rows(self, waiting: int) -> int:
        """Rows of one prefill: `group` (the mesh's batch shards) times a power of two, enough for
        `waiting` up to the slot count: requests that arrive together are prefilled together,
        and only a few shapes ever compile (`_compile_prefills` does them at warmup)."""
        rows = self.group
        while rows < waiting:
            rows *= 2
        return min(rows, self.num_slots)

    def _compile_prefills(self) -> None:
        """Run every prefill shape once at the shortest width, with filler rows only (no-ops)."""
        rows = self.group
        while True:
            self._state = insert(self.cfg, self.sampler.params, self._state, self._insert_rows([], [], rows))
            if rows >= self.num_slots:
                return
            rows = self._prefill_rows(rows + 1)

    def _insert_rows(self, batch: list[tuple[int, Request]], slots: list[int], rows: int) -> dict:
        vocab = self.cfg.padded_vocab_size
        longest = max((len(r.prompt) for _, r in batch), default=1)
        width = min(math.ceil(longest / PROMPT_BUCKET) * PROMPT_BUCKET, self.cfg.max_seq_len)
        new = {"slot": np.full(rows, self.num_slots, np.int32), "tokens": np.zeros((rows, width), np.int32),
               "length": np.ones(rows, np.int32), "key": np.zeros((rows, *request_key(0).shape), np.uint32),
               "bias": np.zeros((rows, vocab), np.float32)}
        settings = np.ones((5, rows), np.float32)
        for row, ((_, r), index) in enumerate(zip(batch, slots)):
            new["slot"][row], new["length"][row] = index, len(r.prompt)
            new["tokens"][row, :len(r.prompt)] = r.prompt
            new["key"][row] = np.asarray(request_key(r.seed))
            for token, value in r.logit_bias:
                new["bias"][row, token] += value
            # greedy rows divide by 1, not by a temperature of 0; 1 - top_p in float64 (row_transforms)
            settings[:, row] = (1.0 if r.greedy else r.temperature, r.top_p, 1.0 - r.top_p, r.repetition_penalty,
                                r.greedy)
        new["settings"] = RowSettings(*settings[:4], settings[4].astype(bool))
        return new

    def _step(self) -> None:
        active = np.array([s is not None for s in self._slots])
        self._state, out = decode_step(self.cfg, self.sampler.params, self._state, active)
        out = jax.device_get(out)
        self.steps += 1
        for index, slot in enumerate(self._slots):
            if slot is None:
                continue
            token = int(out["token"][index])
            if token in self.stop_ids:
                self._finish(index, Finished("stop"))
                continue
            self._emit(slot.rid, Token(token, float(out["logprob"][index]), out["top_ids"][index],
                                       out["top_logprobs"][index]))
            slot.emitted += 1
            if slot.emitted >= slot.max_tokens:
                self._finish(index, Finished("length"))

    def _finish(self, index: int, event: Finished) -> None:
        rid = self._slots[index].rid
        self._slots[index] = None
        self._emit(rid, event)
        with self._lock:
            self._callbacks.pop(rid, None)

    def _emit(self, rid: int, event: Token | Finished) -> None:
        callback = self._callbacks.get(rid)
        if callback is None:
            return
        try:
            callback(event)
        except Exception:  # one client's failing callback must not stop the others' answers
            log.exception("request %d: its callback failed; it is cancelled", rid)
            with self._lock:
                self._callbacks.pop(rid, None)
            self.feed.put(("cancel", rid))

    def _fail_all(self, message: str) -> None:
        for index, slot in enumerate(self._slots):
            if slot is not None:
                self._finish(index, Finished("error", message))
        while self._pending:
            rid, _ = self._pending.popleft()
            self._emit(rid, Finished("error", message))
