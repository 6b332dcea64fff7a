"""The figures of runtime/serve/metrics.py as Triton custom metrics (Python backend `pb_utils.MetricFamily`,
python_backend README "Custom Metrics": COUNTER / GAUGE, and HISTOGRAM where the backend has it), shown on
Triton's own metrics endpoint (port 8002 by default) beside its `nv_inference_*` metrics.

Names are vLLM's with `qwen_vl_` in place of `vllm:` (a Triton metric name has no prefix of its own and other
models share the endpoint), each with the labels `model` and `version` as Triton's own per-model metrics have:
`qwen_vl_num_requests_running`, `qwen_vl_num_requests_waiting`, `qwen_vl_kv_cache_usage_perc` (gauges, set when a
request is admitted or ends), `qwen_vl_prompt_tokens_total`, `qwen_vl_generation_tokens_total`,
`qwen_vl_request_success_total{finished_reason}`, `qwen_vl_request_failure_total{reason}` (counters; reasons
`invalid_request`, `cancelled`, `server_error`, `unavailable`), and the histograms
`qwen_vl_time_to_first_token_seconds`, `qwen_vl_inter_token_latency_seconds`, `qwen_vl_e2e_request_latency_seconds`
(arrival = `execute` receiving the request).

The in-flight engine's reuse caches (runtime/prefix_cache.py, runtime/encoder_cache.py; the counters of
`Engine.cache_stats`, as the HTTP server's /metrics has them, runtime/serve/metrics.py): counters
`qwen_vl_prefix_cache_queries_total` (prompt tokens looked up), `qwen_vl_prefix_cache_hits_total` (prompt tokens
whose KV rows were reused), `qwen_vl_prefix_cache_evictions_total`, `qwen_vl_encoder_cache_hits_total`,
`qwen_vl_encoder_cache_misses_total` (media items), `qwen_vl_encoder_cache_evictions_total`, and gauges
`qwen_vl_prefix_cache_bytes`, `qwen_vl_encoder_cache_bytes` (host memory held). A backend metric is pushed, not
read at scrape, so they are brought up to the engine's counters whenever the load gauges are (a request admitted or
ended): a counter is incremented by what its engine counter grew since the last update.
"""
from __future__ import annotations

import threading

from .latency_buckets import E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS

PREFIX = "qwen_vl_"


CACHE_COUNTERS = (("prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
                  ("prefix_cache_hits", "Prompt tokens whose KV rows came from the prefix cache."),
                  ("prefix_cache_evictions", "Prefix-cache entries dropped to stay within its budget."),
                  ("encoder_cache_hits", "Media items whose vision features came from the encoder cache."),
                  ("encoder_cache_misses", "Media items that went through the vision encoder."),
                  ("encoder_cache_evictions", "Encoder-cache entries dropped to stay within its budget."))
CACHE_GAUGES = (("prefix_cache_bytes", "Host memory the prefix cache holds, bytes."),
                ("encoder_cache_bytes", "Host memory the encoder cache holds, bytes."))


class TritonMetrics:
    def __init__(self, pb_utils, labels: dict, load, cache_stats=dict):
        """`labels`: {"model": name, "version": version}; `load` () -> (running, waiting, slots in use, slots);
        `cache_stats` () -> the engine's cache counters (runtime/scheduler.py Engine.cache_stats)."""
        self.pb, self.labels, self.load, self.cache_stats = pb_utils, dict(labels), load, cache_stats
        family = pb_utils.MetricFamily
        self.families, self.by_label = [], {}

        def make(name: str, doc: str, kind):
            f = family(name=PREFIX + name, description=doc, kind=kind)
            self.families.append(f)
            return f

        def one(name: str, doc: str, kind, **extra):
            return make(name, doc, kind).Metric(labels=self.labels, **extra)

        self.running = one("num_requests_running", "Requests in a batch slot.", family.GAUGE)
        self.waiting = one("num_requests_waiting", "Requests waiting for a batch slot.", family.GAUGE)
        self.kv_usage = one("kv_cache_usage_perc", "Fraction of KV-cache slots in use (1 = all).", family.GAUGE)
        self.prompt_tokens = one("prompt_tokens_total", "Prompt tokens of finished requests.", family.COUNTER)
        self.generation_tokens = one("generation_tokens_total", "Generated tokens of finished requests.",
                                     family.COUNTER)
        self.success = make("request_success_total", "Finished requests by finish reason.", family.COUNTER)
        self.failure = make("request_failure_total", "Failed or cancelled requests by reason.", family.COUNTER)
        self.cache_counters = {name: one(name + "_total", doc, family.COUNTER) for name, doc in CACHE_COUNTERS}
        self.cache_gauges = {name: one(name, doc, family.GAUGE) for name, doc in CACHE_GAUGES}
        self.cache_seen = dict.fromkeys(self.cache_counters, 0)  # engine counters already pushed
        self.cache_lock = threading.Lock()  # updates come from `execute` and from the engine's thread
        histogram = getattr(family, "HISTOGRAM", None)  # Triton 24.xx Python backends before it had none
        self.histograms = None
        if histogram is not None:
            self.histograms = tuple(one(name, doc, histogram, buckets=list(buckets)) for name, doc, buckets in (
                ("time_to_first_token_seconds", "Time to first token, seconds.", TTFT_BUCKETS),
                ("inter_token_latency_seconds", "Time between generated tokens, seconds.", ITL_BUCKETS),
                ("e2e_request_latency_seconds", "Arrival to last token, seconds.", E2E_BUCKETS)))

    def _labelled(self, family, key: str, value: str):
        if (key, value) not in self.by_label:
            self.by_label[(key, value)] = family.Metric(labels={**self.labels, key: value})
        return self.by_label[(key, value)]

    def update_load(self) -> None:
        running, waiting, used, slots = self.load()
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(used / slots if slots else 0.0)
        self.update_caches()

    def update_caches(self) -> None:
        """Bring the cache metrics up to the engine's counters (see the module docstring)."""
        stats = self.cache_stats()
        with self.cache_lock:
            for name, metric in self.cache_counters.items():
                now = stats.get(name, 0)
                if now > self.cache_seen[name]:
                    metric.increment(now - self.cache_seen[name])
                    self.cache_seen[name] = now
            for name, metric in self.cache_gauges.items():
                metric.set(stats.get(name, 0))

    def finished(self, arrived: float, token_times: list, prompt_tokens: int, reason: str) -> None:
        """A request that ended (EOS or max tokens: `reason` "stop" / "length"); times from time.monotonic()."""
        self.prompt_tokens.increment(prompt_tokens)
        self.generation_tokens.increment(len(token_times))
        self._labelled(self.success, "finished_reason", reason).increment(1)
        if self.histograms is not None and token_times:
            ttft, itl, e2e = self.histograms
            ttft.observe(token_times[0] - arrived)
            for before, after in zip(token_times, token_times[1:]):
                itl.observe(after - before)
            e2e.observe(token_times[-1] - arrived)

    def failed(self, reason: str) -> None:
        self._labelled(self.failure, "reason", reason).increment(1)

    def close(self) -> None:
        """Drop the metrics, then their families (the backend wants a family deleted after its metrics)."""
        self.running = self.waiting = self.kv_usage = self.prompt_tokens = self.generation_tokens = None
        self.histograms, self.by_label, self.cache_counters, self.cache_gauges = None, {}, {}, {}
        self.success = self.failure = None
        self.families.clear()
