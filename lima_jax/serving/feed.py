"""How requests reach the engine loop of every process.

The engine loop takes a list of events each iteration: ("submit", rid, Request, score), ("cancel",
rid), ("warmup",) or ("stop",). With one process they come straight from a queue (`LocalFeed`). With
several, only process 0 serves HTTP: it takes its queue's events and broadcasts them to
every process (`BroadcastFeed`, jax.experimental.multihost_utils.broadcast_one_to_all), so
every process admits the same requests into the same slots in the same iteration, and the
jitted steps, which span every process's devices, run in lockstep.
"""

import pickle
import queue

import numpy as np

Event = tuple


class LocalFeed:
    """Events from this process's own queue. `take(wait)` blocks for the first event only when
    the engine has nothing else to do."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()

    def put(self, event: Event) -> None:
        self._queue.put(event)

    def take(self, wait: bool, timeout: float | None = None) -> list[Event]:
        events = []
        if wait:
            try:
                events.append(self._queue.get(timeout=timeout))
            except queue.Empty:
                return events
        while True:
            try:
                events.append(self._queue.get_nowait())
            except queue.Empty:
                return events


class BroadcastFeed(LocalFeed):
    """Process 0's events, broadcast to every process once per engine iteration. An idle
    process 0 still broadcasts (an empty list) every `idle_s` seconds, so the others are never
    stuck in a collective for long."""

    def __init__(self, idle_s: float = 0.05):
        super().__init__()
        import jax

        self.is_source = jax.process_index() == 0
        self.idle_s = idle_s

    def take(self, wait: bool, timeout: float | None = None) -> list[Event]:
        from jax.experimental import multihost_utils

        events = super().take(wait, self.idle_s) if self.is_source else []
        payload = np.frombuffer(pickle.dumps(events), np.uint8)
        size = int(multihost_utils.broadcast_one_to_all(np.int32(payload.size)))
        width = 1 << max(size - 1, 1).bit_length()  # a few padded sizes: a few compilations
        buffer = np.zeros(width, np.uint8)
        if self.is_source:
            buffer[:size] = payload
        received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
        return pickle.loads(received[:size].tobytes())
