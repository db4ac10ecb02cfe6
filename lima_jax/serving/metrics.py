"""The server's `/metrics` in Prometheus text (prometheus_client, one registry per app): requests
by path and status, prompt and answer tokens, time to first token, slot use, and the engine's
prefix cache where it has one (`Engine.prefix_cache_stats()`: hits, misses, blocks_used,
bytes_used, budget_bytes).
"""

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize",
         "/detokenize", "/tokenizer_info")  # other paths count as "other": labels stay few
PREFIX_CACHE_COUNTERS = ("hits", "misses")
PREFIX_CACHE_GAUGES = ("blocks_used", "bytes_used", "budget_bytes")


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.requests = Counter("lima_requests", "HTTP requests answered", ["path", "status"], registry=self.registry)
        self.prompt_tokens = Counter("lima_prompt_tokens", "prompt tokens of served requests", registry=self.registry)
        self.completion_tokens = Counter("lima_completion_tokens", "answer tokens generated", registry=self.registry)
        self.first_token = Histogram("lima_time_to_first_token_seconds", "from a request's arrival to its first "
                                     "token (or its prompt's scores)", registry=self.registry,
                                     buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.registry.register(EngineCollector(engine))

    def on_response(self, path: str, status: int) -> None:
        self.requests.labels(path if path in PATHS else "other", str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineCollector:
    """Slot use and the prefix cache, read from the engine at each scrape."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        engine = self.engine
        yield GaugeMetricFamily("lima_slots", "requests the engine decodes together", engine.num_slots)
        yield GaugeMetricFamily("lima_slots_active", "slots holding a request", engine.active)
        yield GaugeMetricFamily("lima_requests_waiting", "requests queued for a free slot", engine.waiting)
        yield CounterMetricFamily("lima_decode_steps", "decode steps run", engine.steps)
        stats = getattr(engine, "prefix_cache_stats", None)
        if stats is not None:
            stats = stats()
            for name in PREFIX_CACHE_COUNTERS:
                yield CounterMetricFamily(f"lima_prefix_cache_{name}", f"prefix cache {name}", stats[name])
            for name in PREFIX_CACHE_GAUGES:
                yield GaugeMetricFamily(f"lima_prefix_cache_{name}", f"prefix cache {name.replace('_', ' ')}",
                                        stats[name])
