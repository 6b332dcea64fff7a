"""In-flight batching: requests join and leave the running batch at every decode step (Orca / vLLM style).

`Engine(model, max_batch)` owns the model's sessions and ONE decode IO of `max_batch` KV-cache slots x the
artifacts' `max_cache_len` rows (runtime/backends/decode_io.py, the object `generate` uses). `submit(SeqRequest)` is
thread-safe; `step()` runs one scheduling step on the calling thread:

1. retire slots whose request was cancelled (client gone): the slot is free for this very step;
2. admit waiting requests into free slots: vision + embed of the whole prompt (host arrays), then prompt chunks
   written into the slot's cache rows (runtime/backends/slots.py), at most `prefill_budget` prompt tokens per step, so a
   long prompt delays the running decodes by one bounded chunk per step; a request's first token comes from its
   last chunk's logits;
3. ONE batched decode step over every slot that has a token to feed, each with its own past length and MRoPE
   position (`past_lengths[b] + rope_delta[b]`, runtime/positions.py); slots without one (free, or mid-prompt)
   feed the pad token at their current length: that row is garbage the sequence overwrites before it reads it
   (export/decoder.py: rows beyond past_lengths are never attended);
4. retire finished slots (EOS or one of the request's `stop_token_ids`, max_new_tokens, `on_token` says stop,
   e.g. a stop string).

Reuse across requests (on by default, every decoder flavour; `prefix_cache_mb` / `encoder_cache_mb` 0 turn each
off): at admission the vision rows of media seen before come from the encoder cache (runtime/encoder_cache.py) and
only new items go through vision.onnx; the prompt's longest cached prefix (runtime/prefix_cache.py: keys are token
ids, media content digests and MRoPE positions; never a part of an image) is looked up and copied into the slot just
before its first prompt call (runtime/backends/slots.py `write_rows`; so the prompts of requests admitted with it
and written before it count), and the prompt is written from there, `inputs_embeds`, `deepstack_embeds` and
`position_ids` all sliced at the same offsets. A slot's rows go into the prefix cache when its prompt is written and
again when it ends (prompt + generated rows: the next turn of a chat starts with them).
`cache_stats()` gives the counters (a plain dict the server's metrics read).

Per-request sampling: every slot has its own `Sampler` (runtime/sampling.py) over its own logits row, with its
own seeded `numpy.random.Generator`, repetition-penalty and min_tokens state, and its own token constraint (a
structured output's grammar, runtime/structured.py: a mask on its row before the choice, advanced by the token
chosen), so a request's tokens do not depend on what else is in the batch: a seeded request gives the text it gives
alone, an unconstrained one is untouched by a constrained neighbour. Those choices are made on the host; a step
whose slots are all plain greedy (no repetition penalty, min_tokens, logprobs or constraint) uses the IO's device
greedy where it has one, as `generate` does, so only token ids leave the device.

The request type is the scheduler's own small input (`SeqRequest`); the front-ends (runtime/serve/serving.py,
runtime/serve/triton_model.py, `trt-run`) build it from their typed requests (runtime/request.py).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from qwen_vl_trt.model.errors import PromptTooLong, UserError

from .backends.decode_io import decode_io
from .backends.slots import chunks_allowed, continuation, prefill_slot, read_rows, write_rows
from .encoder_cache import EncoderCache, encode_media
from .generate import embed
from .pipeline import PreparedRequest
from .positions import decode_position_ids
from .prefix_cache import PrefixCache, generated_keys, prompt_keys
from .sampling import Sampler, SamplingConfig

DEFAULT_PREFILL_BUDGET = 256  # prompt tokens written per scheduling step (one chunk of a long prompt)
DEFAULT_PREFIX_CACHE_MB = 1024  # host memory for reusable KV rows (Qwen3-VL-2B bf16: 112 KiB a token)
DEFAULT_ENCODER_CACHE_MB = 256  # host memory for vision rows (a 448x448 image on Qwen3-VL-2B: 3 MiB with DeepStack)


@dataclass(eq=False)
class SeqRequest:
    """One sequence for the engine (the front-ends' requests are wrapped in it; a typed request type can replace
    it). Callbacks run on the engine's thread. The engine stops at EOS, `max_new_tokens` and `cancelled`; stop
    strings are text, so the front-end that detokenizes checks them (runtime/serve/serving.py `Job.push`) and says so
    through `on_token`.
    `on_token(token_id) -> bool`: True when the request wants no more tokens (a stop string matched);
    `on_end(reason)`: "stop" (EOS / on_token), "length" (max_new_tokens) or "cancelled";
    `on_error(status, message)`: 400 for a request the artifacts cannot take, 500 for a failure of ours."""

    prepared: PreparedRequest
    max_new_tokens: int
    sampling: SamplingConfig
    ignore_eos: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    on_token: Callable[[int], bool] | None = None
    on_end: Callable[[str], None] | None = None
    on_error: Callable[[int, str], None] | None = None
    constraint: object | None = None  # runtime/structured.py TokenConstraint: the tokens allowed at each step
    token_ids: list = field(default_factory=list)  # generated ids (incl. the EOS that stopped it)
    logprobs: list = field(default_factory=list)  # sampling.TokenLogprobs per generated id (sampling.logprobs set)
    finish_reason: str | None = None
    timings: dict = field(default_factory=dict)  # time.perf_counter() at submitted / admitted / vision_done /
    # first_token / end

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class _Slot:
    """A request in a slot: the rows of its prompt still to write, its sampler and the token to feed next."""

    request: SeqRequest
    sampler: Sampler
    feeds: dict  # whole-prompt host arrays: inputs_embeds [1, L, C], deepstack_embeds [Ld, 1, L, C]
    admitted: int = 0  # admission order: prompts are written oldest first
    written: int = 0  # rows of this sequence in the cache (prompt rows, then one per decode step)
    next_token: int | None = None  # sampled, not yet fed: the slot joins the next decode step
    keys: np.ndarray | None = None  # prefix-cache keys of the prompt [S, KEY_COLS] (None: no prefix cache)
    cuts: np.ndarray | None = None  # bool [S + 1]: where a reused prefix may end (runtime/prefix_cache.py)


class Engine:
    """The scheduler (see the module docstring). Not thread-safe except `submit`/`cancel`; one thread steps it."""

    def __init__(self, model, max_batch: int | None = None, prefill_budget: int = DEFAULT_PREFILL_BUDGET,
                 prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB, encoder_cache_mb: float = DEFAULT_ENCODER_CACHE_MB):
        lim = model.manifest.limits
        self.model, self.max_batch = model, max_batch or lim.max_batch
        if not 1 <= self.max_batch <= lim.max_batch:
            raise UserError(f"max batch {self.max_batch}: must be in [1, {lim.max_batch}] (the artifacts' limit)")
        self.cache_len, self.prefill_budget = lim.max_cache_len, max(1, prefill_budget)
        self.io = decode_io(model, self.max_batch, self.cache_len)
        self.io.greedy = None  # set per decode step (see _decode)
        self.chunked = chunks_allowed(self.io)
        self.continuation = continuation(self.io)  # "chunks" or "one_call" (runtime/backends/slots.py)
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * (1 << 20))) if prefix_cache_mb > 0 else None
        self.encoder_cache = EncoderCache(int(encoder_cache_mb * (1 << 20))) if encoder_cache_mb > 0 else None
        self.pad, self.eos = model.manifest.pad_token_id, frozenset(model.manifest.eos_token_ids)
        self.vocab = model.spec.text.vocab_size
        self.slots: list[_Slot | None] = [None] * self.max_batch
        self.waiting: queue.Queue = queue.Queue()
        self.steps = 0  # decode steps run (tests, the benchmark)
        self.admitted = 0

    # ---- requests in ------------------------------------------------------------------------------------
    def submit(self, request: SeqRequest) -> SeqRequest:
        request.timings["submitted"] = time.perf_counter()
        self.waiting.put(request)
        return request

    def cache_stats(self) -> dict:
        """Counters of the prefix cache (tokens queried / reused) and the encoder cache (media items); zeros for a
        cache that is off."""
        prefix = self.prefix_cache or PrefixCache(0)
        encoder = self.encoder_cache or EncoderCache(0)
        return {**prefix.stats(), **encoder.stats()}

    @property
    def busy(self) -> bool:
        return any(s is not None for s in self.slots) or not self.waiting.empty()

    def run_until_idle(self) -> None:
        while self.busy:
            self.step()

    def abort(self, status: int, message: str) -> None:
        """Fail every request in a slot or waiting (a step raised, or shutdown); every slot is free after."""
        requests = [s.request for s in self.slots if s is not None]
        while not self.waiting.empty():
            requests.append(self.waiting.get())
        self.slots = [None] * self.max_batch
        for request in requests:
            _fail(request, status, message)

    # ---- one scheduling step ----------------------------------------------------------------------------
    def step(self) -> None:
        for b, slot in enumerate(self.slots):
            if slot is not None and slot.request.cancelled.is_set():
                self._retire(b, "cancelled")
        self._admit()
        self._prefill()
        self._decode()

    def _admit(self) -> None:
        for b in range(self.max_batch):
            while self.slots[b] is None and not self.waiting.empty():
                request = self.waiting.get()
                if request.cancelled.is_set():
                    _end(request, "cancelled")
                    continue
                try:
                    self.slots[b] = self._start(request)
                except UserError as e:
                    _fail(request, 400, str(e))

    def _start(self, request: SeqRequest) -> _Slot:
        """Check the request against the cache, run its vision + embed (the whole prompt, host arrays)."""
        prep = request.prepared
        if request.max_new_tokens < 1:
            raise UserError(f"max_new_tokens {request.max_new_tokens}: must be >= 1")
        if prep.num_tokens + request.max_new_tokens > self.cache_len:
            raise PromptTooLong(f"prompt has {prep.num_tokens} tokens and max_new_tokens is "
                                f"{request.max_new_tokens}: together they exceed the {self.cache_len}-token cache "
                                "of the artifacts")
        request.timings["admitted"] = time.perf_counter()
        features, deepstack = encode_media(self.model, prep.media, self.encoder_cache)
        feeds = embed(self.model, prep.input_ids[None], features, deepstack)  # numpy [1, L, C] (+ [Ld, 1, L, C])
        request.timings["vision_done"] = time.perf_counter()
        sampler = Sampler(request.sampling, self.eos, request.constraint)
        sampler.start([prep.input_ids], self.vocab)
        self.admitted += 1
        slot = _Slot(request, sampler, feeds, self.admitted)
        if self.prefix_cache is not None:
            spec = self.model.spec
            slot.keys, slot.cuts = prompt_keys(prep, spec.image_token_id, spec.video_token_id,
                                               spec.vision.spatial_merge_size)
        return slot

    def _prefill(self) -> None:
        """Write prompt chunks of admitted slots, oldest first, within the step's budget of prompt tokens."""
        budget = self.prefill_budget
        prompting = [b for b, s in enumerate(self.slots) if s is not None and s.next_token is None]
        for b in sorted(prompting, key=lambda b: self.slots[b].admitted):
            if budget <= 0:
                break
            slot = self.slots[b]
            prep = slot.request.prepared
            if slot.cuts is not None:  # looked up just before the first call: prompts written since count too
                slot.written, rows = self.prefix_cache.lookup(slot.keys, slot.cuts)
                slot.cuts = None
                if rows is not None:
                    write_rows(self.io, b, rows)
            # all the rest in one call where the decoder cannot continue a cache in chunks (after a reused prefix:
            # ping-pong sets, runtime/backends/slots.py `continuation`)
            n = min(prep.num_tokens - slot.written, budget) if self.chunked else prep.num_tokens - slot.written
            start, end = slot.written, slot.written + n
            # one offset for all three: DeepStack rows stay aligned with inputs_embeds (docs/graphs.md)
            feeds = {k: np.ascontiguousarray(v[..., start:end, :]) for k, v in slot.feeds.items()}
            feeds["position_ids"] = np.ascontiguousarray(prep.position_ids[:, None, start:end])  # [3, 1, n]
            logits = prefill_slot(self.io, b, feeds, start, last=end == prep.num_tokens)
            slot.written, budget = end, budget - n
            if logits is not None:  # the prompt's last chunk: its first token
                slot.feeds = {}
                slot.request.timings["first_token"] = time.perf_counter()
                self._remember(b, slot.keys)
                self._emit(b, int(slot.sampler.sample(logits[None])[0]))

    def _remember(self, b: int, keys: np.ndarray | None) -> None:
        """Put rows [0, len(keys)) of slot b into the prefix cache (unless it holds them already)."""
        if keys is not None and len(keys) and not self.prefix_cache.holds(keys):
            self.prefix_cache.insert(keys, read_rows(self.io, b, len(keys)))

    def _decode(self) -> None:
        """One decoder step over all slots with a token to feed; each gets its next token."""
        feeding = [s is not None and s.next_token is not None for s in self.slots]
        if not any(feeding):
            return
        tokens = np.array([s.next_token if f else self.pad for s, f in zip(self.slots, feeding)], np.int64)  # [B]
        past = np.array([s.written if s is not None else 0 for s in self.slots], np.int64)  # [B]
        deltas = np.array([s.request.prepared.rope_delta if f else 0 for s, f in zip(self.slots, feeding)], np.int64)
        self.io.cache.past_lengths[:] = past
        samplers = [self.slots[b].sampler for b in np.flatnonzero(feeding)]
        plain_greedy = all(s.device_greedy_ok and s.cfg.repetition_penalty == 1.0 for s in samplers)
        self.io.greedy = _device_greedy(self.io) if plain_greedy else None  # stateless: no slot sampler to update
        chosen = self.io.decode(tokens, decode_position_ids(past, deltas), _SlotSamplers(self.slots, feeding))
        self.steps += 1
        for b in np.flatnonzero(feeding):
            self.slots[b].written += 1
            self._emit(int(b), int(chosen[b]))

    # ---- tokens out -------------------------------------------------------------------------------------
    def _emit(self, b: int, token: int) -> None:
        slot = self.slots[b]
        request = slot.request
        request.token_ids.append(token)
        if slot.sampler.last_logprobs is not None:
            request.logprobs.append(slot.sampler.last_logprobs[0])
        stop = bool(request.on_token(token)) if request.on_token is not None else False
        if stop or (token in self.eos and not request.ignore_eos) or token in request.sampling.stop_token_ids:
            self._retire(b, "stop")
        elif len(request.token_ids) >= request.max_new_tokens:
            self._retire(b, "length")
        else:
            slot.next_token = token

    def _retire(self, b: int, reason: str) -> None:
        slot = self.slots[b]
        request, prep = slot.request, slot.request.prepared
        if slot.keys is not None and request.token_ids and slot.written > prep.num_tokens:
            fed = request.token_ids[:slot.written - prep.num_tokens]  # the generated tokens with a row
            self._remember(b, np.concatenate([slot.keys, generated_keys(fed, prep.num_tokens, prep.rope_delta)]))
        self.slots[b] = None
        _end(request, reason)


class _SlotSamplers:
    """The `sampler` a decode IO calls (`sample(logits [B, V]) -> int64 [B]`): each feeding slot's own Sampler on
    its own row; other rows get -1 (not used). `cfg.greedy` is False so the IO hands the logits to the host."""

    cfg = SamplingConfig(temperature=1.0)

    def __init__(self, slots: list, feeding: list):
        self.slots, self.feeding = slots, feeding

    def sample(self, logits: np.ndarray) -> np.ndarray:
        out = np.full(len(self.slots), -1, np.int64)
        for b, feed in enumerate(self.feeding):
            if feed:
                out[b] = self.slots[b].sampler.sample(logits[b:b + 1])[0]
        return out


def _device_greedy(io):
    """The IO's greedy sampler on the device (penalty 1: no per-sequence state; runtime/backends/device_sampling.py), used
    when every slot of a step is plain greedy so that only token ids leave the device; None where there is none
    (numpy I/O, ONNX Runtime's CPU EP, no onnxruntime-gpu beside TensorRT): then logits go to the host."""
    greedy = io.greedy_on_device(Sampler(SamplingConfig(temperature=0)))
    if greedy is not None:
        greedy.start(None)
    return greedy


def _end(request: SeqRequest, reason: str) -> None:
    request.finish_reason = reason
    request.timings["end"] = time.perf_counter()
    if request.on_end is not None:
        request.on_end(reason)


def _fail(request: SeqRequest, status: int, message: str) -> None:
    request.finish_reason = "error"
    request.timings["end"] = time.perf_counter()
    if request.on_error is not None:
        request.on_error(status, message)


def generate_inflight(model, requests: list[PreparedRequest], sampling: SamplingConfig, max_new_tokens: int, *,
                      ignore_eos: bool = False, on_token=None, max_batch: int | None = None,
                      constraints: list | None = None) -> list:
    """`generate` (runtime/generate.py) for many prompts through the engine: up to max_batch at a time, each
    taking a free slot as soon as one ends. `on_token(i, token_id)` as tokens of prompt i are chosen; a seeded
    `sampling` seeds every prompt alike; `constraints`: one runtime/structured.py TokenConstraint per prompt.
    -> generate.Result per prompt, in order."""
    from .generate import Result, cache_len_for

    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: must be >= 1")
    for prep in requests:  # each must fit a slot: the same check and message as generate's
        cache_len_for(model, [prep], max_new_tokens)
    engine = Engine(model, max_batch)
    seqs = []
    for i, prep in enumerate(requests):
        emit = (lambda tok, i=i: on_token(i, tok)) if on_token is not None else None
        constraint = constraints[i] if constraints is not None else None
        seqs.append(engine.submit(SeqRequest(prep, max_new_tokens, sampling, ignore_eos, on_token=emit,
                                             constraint=constraint)))
    engine.run_until_idle()
    return [Result(s.token_ids, s.prepared.num_tokens, _timings(s, model.backend), s.logprobs) for s in seqs]


def _timings(seq: SeqRequest, backend: str) -> dict:
    """generate.Result timings of one sequence (ms): vision = its vision + embed, prefill = from then to its first
    token (its prompt chunks, and the steps it waited for them), ttft from submission."""
    t, decoded = seq.timings, max(len(seq.token_ids) - 1, 0)
    decode_s = t["end"] - t["first_token"]
    ms = lambda a, b: round(1e3 * (t[b] - t[a]), 2)  # noqa: E731
    return {"backend": backend, "preprocess_ms": round(seq.prepared.timings.get("preprocess_ms", 0.0), 2),
            "vision_ms": ms("admitted", "vision_done"), "prefill_ms": ms("vision_done", "first_token"),
            "ttft_ms": ms("submitted", "first_token"), "decode_ms": round(1e3 * decode_s, 2),
            "decode_tokens": decoded, "decode_tok_per_s": round(decoded / decode_s, 2) if decode_s > 0 else None}
