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
| `vllm:request_failure_total` | counter | requests that got an error or were cancelled, label `reason` (this server's; vLLM has no such counter): `invalid_request` (4xx), `too_large` (413), `busy` (503), `timeout` (408), `client_gone`, `server_error` (500) |

Each server has its own `CollectorRegistry` (several servers may share a process: the tests). A new metric is
one line in `ServerMetrics.__init__`.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "vllm:"
# histogram buckets, seconds: from a GPU's milliseconds to the CPU demo's minutes
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
FAILURE_REASONS = {400: "invalid_request", 404: "invalid_request", 408: "timeout", 413: "too_large",
                   415: "invalid_request", 421: "invalid_request", 503: "busy"}


def failure_reason(status: int) -> str:
    """The `reason` label of a request answered with HTTP `status`."""
    return FAILURE_REASONS.get(status, "server_error" if status >= 500 else "invalid_request")


class ServerMetrics:
    """The registry and every metric of one server; `load` () -> (running, waiting, slots in use, slots) is read
    at each scrape (the worker's `load`, runtime/serve/engine_worker.py / serving.py)."""

    def __init__(self, model_name: str, load):
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
