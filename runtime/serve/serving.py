"""One model, many HTTP requests: jobs, stop strings and the batching worker behind runtime/serve/server.py.

Handler threads prepare their request (media, chat template, limits: runtime/pipeline.py) and `submit` a `Job`.
One worker thread owns the model: it takes every job waiting, groups those whose batch keys match
(`Request.batch_key`, runtime/request.py, as runtime/serve/triton_model.py does; a seeded sampled request runs
alone, so its seed alone fixes its text), packs each group into batches within the artifacts' max_batch and KV cache, and runs one `generate` per batch. Tokens flow
back to each job's queue as events, so a handler can stream them:

    ("delta", text, index, logprobs)                      new text (stop strings held back until they cannot match)
    ("done", finish_reason, completion_tokens, index, logprobs)  "stop" (EOS, a stop token or string) or "length"
    ("error", status, message)                            400 for a UserError of the batch, 500 for anything else

`index` is the job's choice of its request (`n` > 1: one job per choice, all on one queue); `logprobs` the
sampling.TokenLogprobs of the tokens since the last event (None unless the request asked for logprobs).

A job ends at EOS, at a stop string or at its own max_tokens; a batch's `generate` is cut short once every job
in it has ended or its client has gone.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

from qwen_vl_trt.model.errors import UserError

from ..generate import generate
from ..prompt import IncrementalDecoder
from ..request import Request
from ..sampling import Sampler


class StopFilter:
    """Text so far -> the part that is safe to emit: never text that a stop string could still start in."""

    def __init__(self, stops: tuple, include: bool = False):
        self.stops, self.include, self.text, self.sent = stops, include, "", 0
        self.hold = max((len(s) for s in stops), default=1) - 1

    def feed(self, piece: str, armed: bool = True) -> tuple[str, bool]:
        """Append `piece` -> (text to emit now, whether a stop string was found: the text ends before it, or after
        it with `include`). Not `armed` (before min_tokens, as vLLM): no match is looked for in this piece."""
        start = max(0, len(self.text) - self.hold)  # a new match must use a character of `piece`
        self.text += piece
        found = [(self.text.find(s, start), -len(s)) for s in self.stops] if armed else []
        hits = sorted(hit for hit in found if hit[0] >= 0)  # the first match; the longest stop string there
        if hits:
            end = hits[0][0] - (hits[0][1] if self.include else 0)
        else:
            end = max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], end
        return out, bool(hits)

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


@dataclass
class Job:
    prepared: object  # PreparedRequest of `request`
    max_new: int  # the request's max_new_tokens, resolved (OpenAIServer.max_new_tokens)
    request: Request  # runtime/request.py: sampling, stop strings, ignore_eos
    events: queue.Queue = field(default_factory=queue.Queue)  # shared by the n jobs of one request
    cancelled: threading.Event = field(default_factory=threading.Event)  # set by the handler: client gone
    index: int = 0  # the choice of its request
    constraint: object | None = None  # runtime/structured.py TokenConstraint of `request.grammar`
    n_tokens: int = 0
    finished: bool = False
    token_times: list = field(default_factory=list)  # time.monotonic() of each generated token (the metrics)

    @property
    def sampling(self):
        """runtime/request.py Sampling of this choice (seed + index)."""
        return self.request.choice_sampling(self.index)

    def batch_key(self) -> tuple:
        return self.request.batch_key(id(self))

    def start(self, tokenizer, eos_ids) -> None:
        self.decoder = IncrementalDecoder(tokenizer, self.request.skip_special_tokens)
        self.filter = StopFilter(self.request.stop, self.request.include_stop_str_in_output)
        self.eos, self.stop_ids = set(eos_ids), set(self.request.sampling.stop_token_ids)
        self.logprobs = [] if self.request.sampling.logprobs is not None else None

    def note_logprobs(self, entry) -> None:
        """The sampling.TokenLogprobs of the token `push` gets next (sent with the text it makes)."""
        if self.logprobs is not None and entry is not None:
            self.logprobs.append(entry)

    def push(self, token: int) -> None:
        """One generated token: emit its text; end the job at a stop string, EOS, a stop token or max_tokens. The
        EOS / stop token's own text is not part of the output unless include_stop_str_in_output (vLLM); stop
        strings are looked for from min_tokens on (vLLM)."""
        self.n_tokens += 1
        self.token_times.append(time.monotonic())
        at_eos = (token in self.eos and not self.request.ignore_eos) or token in self.stop_ids
        piece = "" if at_eos and not self.request.include_stop_str_in_output else self.decoder.push(token)
        armed = self.n_tokens >= (self.request.sampling.min_tokens or 0)
        text, stopped = self.filter.feed(piece, armed)
        if not stopped and (at_eos or self.n_tokens >= self.max_new):
            more, stopped = self.filter.feed(self.decoder.flush(), armed)
            text += more + ("" if stopped else self.filter.flush())
        if text:
            self.events.put(("delta", text, self.index, self._take_logprobs()))
        if stopped or at_eos or self.n_tokens >= self.max_new:
            self.finish("stop" if stopped or at_eos else "length")

    def _take_logprobs(self):
        if self.logprobs is None:
            return None
        out, self.logprobs = self.logprobs, []
        return out

    def finish(self, reason: str) -> None:
        if not self.finished:
            self.finished = True
            self.events.put(("done", reason, self.n_tokens, self.index, self._take_logprobs()))

    def fail(self, status: int, message: str) -> None:
        if not self.finished:
            self.finished = True
            self.events.put(("error", status, message))

    @property
    def over(self) -> bool:
        return self.finished or self.cancelled.is_set()


class _BatchOver(Exception):
    """Raised from `on_token` to end `generate` once no job of the batch wants more tokens."""


class Scheduler:
    """The worker thread that owns the model (see the module docstring)."""

    def __init__(self, model, tokenizer, max_batch: int):
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.pending: queue.Queue = queue.Queue()
        self.running = 0  # jobs of the batch being generated
        self.thread = threading.Thread(target=self._loop, name="qwen-vl-generate", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.pending.put(job)

    def load(self) -> tuple[int, int, int, int]:
        """(jobs generating, jobs waiting, batch slots in use, slots): the server's metrics."""
        running = self.running
        return running, self.pending.qsize(), running, self.max_batch

    def close(self) -> None:
        self.pending.put(None)
        self.thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            jobs = [self.pending.get()]
            while not self.pending.empty():  # everything that arrived meanwhile is batched together
                jobs.append(self.pending.get())
            if None in jobs:
                for job in jobs:
                    if job is not None:
                        job.fail(503, "the server is shutting down")
                return
            try:
                for batch in self.batches([j for j in jobs if not j.cancelled.is_set()]):
                    self.run(batch)
            except Exception as e:  # a bug outside generate: fail what is left, keep the worker alive
                traceback.print_exc(file=sys.stderr)
                for job in jobs:
                    job.fail(500, f"internal error: {type(e).__name__}: {e}")

    def batches(self, jobs: list) -> list[list]:
        """Jobs of one batch key, in arrival order, packed within max_batch and the KV cache."""
        groups: dict = {}
        for job in jobs:
            groups.setdefault(job.batch_key(), []).append(job)
        cache, out = self.model.manifest.limits.max_cache_len, []
        for group in groups.values():
            cur = []
            for job in group:
                trial = cur + [job]
                fits = max(j.prepared.num_tokens for j in trial) + max(j.max_new for j in trial) <= cache
                if cur and (len(trial) > self.max_batch or not fits):
                    out.append(cur)
                    trial = [job]
                cur = trial
            out.append(cur)
        return out

    def run(self, batch: list) -> None:
        manifest = self.model.manifest
        cfg = batch[0].sampling.config(manifest.generation_config)  # one batch key: one sampling
        sampler = Sampler(cfg, manifest.eos_token_ids, batch[0].constraint)  # a constrained job runs alone

        def on_token(b: int, token: int) -> None:
            if not batch[b].over:
                if sampler.last_logprobs is not None:
                    batch[b].note_logprobs(sampler.last_logprobs[b])
                batch[b].push(token)
            if all(j.over for j in batch):
                raise _BatchOver

        self.running = len(batch)
        try:
            for job in batch:
                job.start(self.tokenizer, manifest.eos_token_ids)
            generate(self.model, [j.prepared for j in batch], sampler, max(j.max_new for j in batch),
                     eos_token_ids=manifest.eos_token_ids, ignore_eos=batch[0].request.ignore_eos, on_token=on_token)
        except _BatchOver:
            pass
        except UserError as e:
            for job in batch:
                job.fail(400, str(e))
        except Exception as e:  # a bug: report it, fail this batch only, keep serving
            traceback.print_exc(file=sys.stderr)
            for job in batch:
                job.fail(500, f"internal error: {type(e).__name__}: {e}")
        self.running = 0
        for job in batch:  # generate stops every sequence at its EOS or the batch's max: nothing is left open
            job.fail(500, "internal error: generation ended without finishing this request")
