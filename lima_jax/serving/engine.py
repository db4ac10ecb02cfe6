"""The batching engine: a fixed number of slots over one KV cache, continuous batching.

A thread runs the loop: take new requests and cancellations (feed.py), prefill waiting
requests into free slots and advance every occupied slot by one token (sampling.decode's
Decoder: the decode step sample.py and the chat run too), hand each slot's token to its
request's callback, and free the slots whose request ended (a stop token, max_tokens, a
cancellation). A request that arrives while others are mid-answer joins at the next step;
none waits for a whole batch to finish.

A request submitted with `score=True` first gets its prompt's log-probabilities (a
PromptScores event: sampling.scoring, the server's `echo`); one with max_tokens 0 then ends
without taking a slot.

Callbacks run on the engine thread and must be quick (the HTTP app passes the events to its
event loop). Every process of a multi-host mesh runs this loop; only process 0 has callbacks.
"""

import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Callable

import numpy as np

from lima_jax.sampling.decode import DEFAULT_SLOTS, Request
from lima_jax.sampling.sampler import Sampler
from lima_jax.sampling.scoring import score_prompts
from lima_jax.serving.feed import LocalFeed

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Token:
    """A generated token with its log-probability and the most likely alternatives (the model's
    log-softmax over the real vocabulary, before decoding transforms)."""

    id: int
    logprob: float
    top_ids: np.ndarray
    top_logprobs: np.ndarray


@dataclasses.dataclass(frozen=True)
class PromptScores:
    """Prompt tokens 1..P-1 given those before: "logprob" [P-1], "top_ids"/"top_logprobs" [P-1, K]."""

    logprob: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


@dataclasses.dataclass(frozen=True)
class Finished:
    """The end of a request: "stop" (a stop token), "length" (max_tokens), "cancelled", "error"."""

    reason: str
    message: str = ""


Callback = Callable[[PromptScores | Token | Finished], None]


class Engine:
    """`submit` a Request with a callback; it receives Token events, then one Finished."""

    def __init__(self, sampler: Sampler, slots: int = DEFAULT_SLOTS, feed: LocalFeed | None = None,
                 prefix_cache_bytes: int = 0):
        self.sampler, self.cfg = sampler, sampler.cfg
        # over the model's whole context; prompts that start alike share prefilled blocks (0: off)
        self.decoder = sampler.decoder(slots, prefix_cache_bytes=prefix_cache_bytes)
        self.num_slots = self.decoder.num_slots
        self.feed = feed or LocalFeed()
        self._callbacks: dict[int, Callback] = {}
        self._pending: deque[tuple[int, Request]] = deque()
        self._scored: set[int] = set()  # pending requests whose prompt is scored first
        self._next_rid, self._lock = 0, threading.Lock()
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.peak_active = 0  # the most requests decoded together so far (/health reports it)

    # ---- the caller's side (any thread) ----

    def submit(self, request: Request, callback: Callback, score: bool = False) -> int:
        """Queue a request; returns its id (for `cancel`). `score`: a PromptScores event first."""
        self.check(request)
        if request.max_tokens == 0 and not score:
            raise ValueError("max_tokens=0 only scores the prompt: submit it with score=True")
        with self._lock:
            rid, self._next_rid = self._next_rid, self._next_rid + 1
            self._callbacks[rid] = callback
        self.feed.put(("submit", rid, request, score))
        return rid

    def cancel(self, rid: int) -> None:
        self.feed.put(("cancel", rid))

    def check(self, request: Request) -> None:
        """ValueError for a request the cache cannot hold."""
        if request.max_tokens == 0:  # scored only: the whole context is usable
            if not 1 <= len(request.prompt) <= self.decoder.length:
                raise ValueError(f"the prompt has {len(request.prompt)} tokens; this model scores 1 to "
                                 f"{self.decoder.length}")
            return
        self.decoder.check(request)

    @property
    def active(self) -> int:
        return self.decoder.active

    @property
    def waiting(self) -> int:
        """Requests queued for a free slot."""
        return len(self._pending)

    def prefix_cache_stats(self) -> dict:
        """The prefix cache's use: hits and misses (in blocks of `block_tokens` tokens), blocks
        and bytes used, the budget (0: no cache); and the prefills' model FLOPs so far."""
        cache = self.decoder.prefix_cache
        stats = cache.stats() if cache is not None else {"hits": 0, "misses": 0, "blocks_used": 0, "bytes_used": 0,
                                                         "budget_bytes": 0, "block_tokens": 0}
        return dict(stats, prefill_flops=self.decoder.prefill_stats["flops"])

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self.run, name="lima-engine", daemon=True)
        self._thread.start()
        return self

    def warmup(self, timeout: float = 600) -> None:
        """Compile the prefills (Decoder.compile_prefills) and the decode step (a one-token request)."""
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
                self.decoder.reset()
        self._fail_all("the server is shutting down")

    def _apply(self, events: list) -> bool:
        """Apply new requests and cancellations; False on stop."""
        for event in events:
            if event[0] == "stop":
                return False
            if event[0] == "submit":
                self._pending.append((event[1], event[2]))
                if event[3]:
                    self._scored.add(event[1])
            elif event[0] == "warmup":
                self.decoder.compile_prefills()
            elif event[0] == "cancel":
                self._cancel(event[1])
        return True

    def _cancel(self, rid: int) -> None:
        self._scored.discard(rid)
        for i, (waiting, _) in enumerate(self._pending):
            if waiting == rid:
                del self._pending[i]
                self._emit(rid, Finished("cancelled"))
                with self._lock:
                    self._callbacks.pop(rid, None)
                return
        for index, held in enumerate(self.decoder.slots):
            if held is not None and held[0] == rid:
                self.decoder.release(index)
                self._end(rid, Finished("cancelled"))

    def _admit(self) -> None:
        """Prefill waiting requests into free slots, those that came together at once; score the
        prompts of those that asked first (one that only scores needs no slot)."""
        batch, free = [], len(self.decoder.free)
        while self._pending and (free or self._pending[0][1].max_tokens == 0):  # in order
            batch.append(self._pending.popleft())
            free -= batch[-1][1].max_tokens > 0
        scored = [(rid, request) for rid, request in batch if rid in self._scored]
        try:
            if scored:
                scores = score_prompts(self.decoder, [r.prompt for _, r in scored])
                self._scored.difference_update(rid for rid, _ in scored)
                for (rid, request), score in zip(scored, scores):
                    self._emit(rid, PromptScores(score["logprob"], score["top_ids"], score["top_logprobs"]))
                    if request.max_tokens == 0:
                        self._end(rid, Finished("length"))
            batch = [(rid, request) for rid, request in batch if request.max_tokens > 0]
            if batch:
                self.decoder.admit(batch)
        except Exception:  # back in the queue, so the failure is reported to them too
            self._pending.extendleft(reversed(batch))
            raise
        self.peak_active = max(self.peak_active, self.active)

    def _step(self) -> None:
        out, events = self.decoder.step()
        self.steps += 1
        for index, rid, token, reason in events:
            if reason == "stop":
                self._end(rid, Finished("stop"))
                continue
            self._emit(rid, Token(token, float(out["logprob"][index]), out["top_ids"][index],
                                  out["top_logprobs"][index]))
            if reason == "length":
                self._end(rid, Finished("length"))

    def _end(self, rid: int, event: Finished) -> None:
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
        for index, held in enumerate(self.decoder.slots):
            if held is not None:
                self.decoder.release(index)
                self._end(held[0], Finished("error", message))
        while self._pending:
            rid, _ = self._pending.popleft()
            self._emit(rid, Finished("error", message))
        self._scored.clear()
