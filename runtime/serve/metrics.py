"""The server's Prometheus metrics (`GET /metrics`), named as vLLM names its own (vllm-project/vllm
docs/design/metrics.md, `vllm:` prefix, label `model_name`), so that dashboards and alerts written for vLLM read
them unchanged.

| metric | type | what |
|---|---|---|
| `vllm:num_requests_running` | gauge | requests in a batch slot (prefill or decode), read from the worker at scrape |
| `vllm:num_requests_waiting` | gauge | requests submitted to the worker and not yet in a slot |
| `vllm:kv_cache_usage_perc` | gauge | fraction of the KV cache's slots in use (each slot holds one request's whole cache: 1 = all) |
| `vllm:prompt_tokens_total` | counter | prompt tokens of finished requests (= their `usage.prompt_tokens`) |
| `vllm:generation_tokens_total` | counter | generated tokens of finished requests (= their `usage.completion_tokens`) |
| `vllm:time_to_first_token_seconds` | histogram | request arrival (headers read) to its first generated token |
| `vllm:inter_token_latency_seconds` | histogram | between consecutive generated tokens of a request |
| `vllm:e2e_request_latency_seconds` | histogram | arrival to the last token of a finished request |
| `vllm:request_success_total` | counter | finished requests, label `finished_reason`: `stop` or `length` |
| `vllm:prefix_cache_queries_total` | counter | prompt tokens looked up in the in-flight engine's prefix cache (runtime/prefix_cache.py), read at scrape |
| `vllm:prefix_cache_hits_total` | counter | prompt tokens whose KV rows came from the prefix cache |
| `vllm:encoder_cache_hits_total` | counter | images / videos whose vision features came from the encoder cache (runtime/encoder_cache.py; this server's name) |
| `vllm:encoder_cache_misses_total` | counter | images / videos that went through the vision encoder |
| `vllm:prefix_cache_evictions_total`, `vllm:encoder_cache_evictions_total` | counter | entries dropped to stay within each cache's budget (least recently used first; this server's names) |
| `vllm:prefix_cache_bytes`, `vllm:encoder_cache_bytes` | gauge | host memory each cache holds now (its budget: `--prefix-cache-mb` / `--encoder-cache-mb`) |
| `vllm:request_failure_total` | counter | requests that got an error or were cancelled, label `reason` (this server's; vLLM has no such counter): `invalid_request` (4xx), `too_large` (413), `busy` (503), `timeout` (408), `client_gone`, `server_error` (500) |

Each server has its own `CollectorRegistry` (several servers may share a process: the tests). A new metric is
one line in `ServerMetrics.__init__`.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .latency_buckets import E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS

PREFIX = "vllm:"
FAILURE_REASONS = {400: "invalid_request", 404: "invalid_request", 408: "timeout", 413: "too_large",
                   415: "invalid_request", 421: "invalid_request", 503: "busy"}


def failure_reason(status: int) -> str:
    """The `reason` label of a request answered with HTTP `status`."""
    return FAILURE_REASONS.get(status, "server_error" if status >= 500 else "invalid_request")


class ServerMetrics:
    """The registry and every metric of one server; `load` () -> (running, waiting, slots in use, slots) is read
    at each scrape (the worker's `load`, runtime/serve/engine_worker.py / serving.py)."""

    def __init__(self, model_name: str, load, cache_stats=None):
        """`cache_stats` () -> dict: the engine's cache counters (runtime/scheduler.py Engine.cache_stats), read at
        each scrape; None (the static worker): the cache counters stay 0."""
        self.registry = registry = CollectorRegistry()
        labels = {"model_name": model_name}

        def gauge(name: str, doc: str, read) -> None:
            Gauge(PREFIX + name, doc, list(labels), registry=registry).labels(**labels).set_function(read)

        def counter(name: str, doc: str, extra: tuple = ()):
            c = Counter(PREFIX + name, doc, [*labels, *extra], registry=registry)
            return c.labels(**labels) if not extra else _Bound(c, labels)

        def histogram(name: str, doc: str, buckets: tuple):
            return Histogram(PREFIX + name, doc, list(labels), buckets=buckets, registry=registry).labels(**labels)

        gauge("num_requests_running", "Requests in a batch slot (prefill or decode).", lambda: load()[0])
        gauge("num_requests_waiting", "Requests waiting for a batch slot.", lambda: load()[1])
        gauge("kv_cache_usage_perc", "Fraction of KV-cache slots in use (1 = all).", lambda: _fraction(load()))
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens of finished requests.")
        self.success = counter("request_success", "Finished requests by finish reason.", ("finished_reason",))
        self.failure = counter("request_failure", "Failed or cancelled requests by reason.", ("reason",))
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token, seconds.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between generated tokens, seconds.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token, seconds.", E2E_BUCKETS)
        registry.register(_CacheCounters(labels, cache_stats or dict))

    def finished(self, arrived: float, token_times: list, prompt_tokens: int, completion_tokens: int,
                 reason: str) -> None:
        """A request that ended with `reason` (stop / length); times from time.monotonic()."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.success.labels(finished_reason=reason).inc()
        if token_times:
            self.ttft.observe(token_times[0] - arrived)
            for before, after in zip(token_times, token_times[1:]):
                self.itl.observe(after - before)
            self.e2e.observe(token_times[-1] - arrived)

    def failed(self, reason: str) -> None:
        self.failure.labels(reason=reason).inc()

    def exposition(self) -> tuple[bytes, str]:
        """(the text format body, its Content-Type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Bound:
    """A labelled counter with the server's own labels filled in: `.labels(reason=...)`."""

    def __init__(self, counter: Counter, labels: dict):
        self.counter, self.fixed = counter, labels

    def labels(self, **extra):
        return self.counter.labels(**self.fixed, **extra)


def _fraction(load: tuple) -> float:
    return load[2] / load[3] if load[3] else 0.0


class _CacheCounters:
    """The engine's cache counters (and bytes held, as gauges) read from `cache_stats()` at each scrape."""

    NAMES = (("prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
             ("prefix_cache_hits", "Prompt tokens whose KV rows came from the prefix cache."),
             ("prefix_cache_evictions", "Prefix-cache entries dropped to stay within its budget."),
             ("encoder_cache_hits", "Media items whose vision features came from the encoder cache."),
             ("encoder_cache_misses", "Media items that went through the vision encoder."),
             ("encoder_cache_evictions", "Encoder-cache entries dropped to stay within its budget."))
    GAUGES = (("prefix_cache_bytes", "Host memory the prefix cache holds, bytes."),
              ("encoder_cache_bytes", "Host memory the encoder cache holds, bytes."))

    def __init__(self, labels: dict, read):
        self.labels, self.read = labels, read

    def collect(self):
        stats = self.read()
        for names, kind in ((self.NAMES, CounterMetricFamily), (self.GAUGES, GaugeMetricFamily)):
            for name, doc in names:
                family = kind(PREFIX + name, doc, labels=list(self.labels))
                family.add_metric(list(self.labels.values()), stats.get(name, 0))
                yield family
