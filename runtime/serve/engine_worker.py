"""The in-flight batching worker: one thread steps the engine (runtime/scheduler.py) and feeds it requests as
they arrive, so a request starts at the next step instead of waiting for the running batch to end.

`submit_request(SeqRequest)` from any thread (the Triton model, runtime/serve/triton_model.py); `submit(job)` takes
the HTTP server's jobs (runtime/serve/serving.py `Job`, its typed request: runtime/request.py), the same interface as serving.Scheduler (the run-to-completion
worker, kept for `--batching static` and the benchmark); `close()`. Job events are unchanged ("delta" / "done" /
"error"): each token goes through `Job.push`, which detokenizes, holds back stop strings and ends the job at EOS,
a stop string or its max_tokens; a job whose client has gone (`job.cancelled`) gives its slot up at the next step.
"""
from __future__ import annotations

import queue
import sys
import threading
import traceback

from ..scheduler import DEFAULT_PREFILL_BUDGET, Engine, SeqRequest


class EngineWorker:
    def __init__(self, model, tokenizer, max_batch: int, prefill_budget: int = DEFAULT_PREFILL_BUDGET, **caches):
        """`caches`: the Engine's prefix_cache_mb / encoder_cache_mb (runtime/serve/cache_flags.py)."""
        self.model, self.tokenizer = model, tokenizer
        self.engine = Engine(model, max_batch, prefill_budget, **caches)
        self.pending: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="qwen-vl-engine", daemon=True)
        self.thread.start()

    def submit(self, job) -> None:
        """A server Job (runtime/serve/serving.py)."""
        self.pending.put(self._request(job))

    def load(self) -> tuple[int, int, int, int]:
        """(requests in a slot, requests waiting for one, slots in use, slots): the server's metrics, read from
        another thread (a scrape may see a step half done; each number is a whole one)."""
        used = sum(s is not None for s in self.engine.slots)
        return used, self.pending.qsize() + self.engine.waiting.qsize(), used, self.engine.max_batch

    def submit_request(self, request: SeqRequest) -> None:
        self.pending.put(request)

    def cache_stats(self) -> dict:
        """The engine's prefix / encoder cache counters (runtime/scheduler.py Engine.cache_stats), for metrics."""
        return self.engine.cache_stats()

    def close(self) -> None:
        self.pending.put(None)
        self.thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            requests = [] if self.engine.busy else [self.pending.get()]  # idle: wait for work
            while not self.pending.empty():
                requests.append(self.pending.get())
            if None in requests:
                self._shut_down(requests)
                return
            for request in requests:
                self.engine.submit(request)
            try:
                self.engine.step()
            except Exception as e:  # a bug: fail what is in flight, keep serving
                traceback.print_exc(file=sys.stderr)
                self.engine.abort(500, f"internal error: {type(e).__name__}: {e}")

    def _request(self, job) -> SeqRequest:
        manifest = self.model.manifest
        cfg = job.sampling.config(manifest.generation_config)
        job.start(self.tokenizer, manifest.eos_token_ids)

        def on_token(token: int) -> bool:
            if seq.logprobs:
                job.note_logprobs(seq.logprobs[-1])
            job.push(token)
            return job.finished

        def on_end(reason: str) -> None:
            if reason != "cancelled":
                job.finish(reason)

        seq = SeqRequest(job.prepared, job.max_new, cfg, job.request.ignore_eos, job.cancelled, on_token, on_end,
                         job.fail, job.constraint)
        return seq

    def _shut_down(self, requests: list) -> None:
        for request in requests:
            if request is not None:
                self.engine.submit(request)
        self.engine.abort(503, "the server is shutting down")
