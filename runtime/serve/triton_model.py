"""Triton Inference Server Python-backend model: the same pipeline as `trt-run`, one request per prompt.

The model repository that loads this file is written by `runtime/serve/triton_repo.py`
(`qwen-vl-triton-repo ARTIFACTS REPO`); its `1/model.py` only re-exports `TritonPythonModel` from here, so
the Triton container needs this package installed (`pip install qwen-vl-trt`), nothing else.

Request tensors (batch dim first, `max_batch_size` = the artifacts' max_batch; optional ones may be omitted):

| name | type | dims | meaning |
|---|---|---|---|
| `prompt` | TYPE_STRING | [1] | user text, UTF-8 (required; may be empty when images are sent) |
| `images` | TYPE_STRING | [-1] | encoded images (PNG/JPEG/WebP bytes), in prompt order (optional) |
| `system` | TYPE_STRING | [1] | system message (optional) |
| `max_new_tokens` | TYPE_INT32 | [1] | default: generation_config.json, else 128 (optional) |
| `temperature` / `top_p` | TYPE_FP32 | [1] | 0 = greedy; defaults from generation_config.json (optional) |
| `top_k` | TYPE_INT32 | [1] | (optional) |
| `seed` | TYPE_INT64 | [1] | (optional) |
| `ignore_eos` | TYPE_BOOL | [1] | generate exactly max_new_tokens (optional) |

Response tensors: `text` TYPE_STRING [1] and `token_ids` TYPE_INT64 [-1]. With the decoupled transaction
policy (the default repository) every token is sent as it is chosen (`text` = the new UTF-8-complete text,
`token_ids` = [token]) and a last, empty response carries the COMPLETE_FINAL flag; otherwise one response
holds the whole text and all token ids.

Errors are per request: a request that cannot run (bad input, prompt + max_new_tokens beyond the artifacts'
limits) gets a TritonError with code INVALID_ARG (gRPC INVALID_ARGUMENT, HTTP 400) and the same one-line
message `trt-run` prints, checked for that request alone in `admit`, so its batch neighbours go on. A request
the client cancels (`request.is_cancelled()`, seen at its next token) gets a CANCELLED final response and its
KV slot is freed at once; a failure of ours gets INTERNAL (UNAVAILABLE while the model shuts down). Triton
itself rejects a tensor of the wrong datatype or shape (INVALID_ARG) before the model sees it; a missing
`prompt` reaches the model (Triton 2.51 lets a request omit a non-optional input when the model has optional
ones) and is refused here.

`execute` = `admit` each request (parse, preprocess, check limits -> `Job`) then hand the jobs to one in-flight
engine (runtime/scheduler.py) stepped by its own thread (runtime/serve/engine_worker.py): requests join the running
batch at the next decode step, whatever their sampling settings (each has its own sampler: a seeded request
gives the text it gives alone), and leave it when they end. Decoupled, `execute` returns at once and the
engine's thread sends each token as it is chosen, so a request sent while another streams joins its batch;
otherwise `execute` waits for its requests and returns their responses.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import numpy as np

from qwen_vl_trt.model.errors import UserError

from ..request import Request, Sampling, prompt_or_default

try:  # present inside the Triton Python backend only; tests install a stand-in module of the same name
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - imported outside Triton (docs, linters)
    pb_utils = None


@dataclass(frozen=True)
class Job:
    """One admitted request, ready to run: its position in `execute`'s list, its Triton request object,
    the preprocessed inputs (pipeline.PreparedRequest) and its resolved generation settings (from the typed
    request, runtime/request.py)."""
    index: int
    request: object
    prepared: object
    sampling: object  # sampling.SamplingConfig
    max_new_tokens: int
    ignore_eos: bool
    arrived: float = 0.0  # time.monotonic() when `execute` got the request (the latency metrics)


def _scalar(request, name: str, kind):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise UserError(f"input {name!r} must hold one value, got {values.size}")
    v = values[0]
    if kind is str and isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"input {name!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return kind(v)


def parse_request(request) -> Request:
    """One Triton request -> the typed request (runtime/request.py checks every value)."""
    prompt = _scalar(request, "prompt", str)
    if prompt is None:  # config.pbtxt says optional: false, but Triton 2.51 lets it through
        raise UserError("missing input 'prompt' (TYPE_STRING [1]): send the user text")
    images = pb_utils.get_input_tensor_by_name(request, "images")
    images = tuple(bytes(b) for b in images.as_numpy().reshape(-1)) if images is not None else ()
    prompt = prompt_or_default(prompt, bool(images), "`prompt` is empty and no `images` were sent")
    sampling = Sampling(temperature=_scalar(request, "temperature", float), top_p=_scalar(request, "top_p", float),
                        top_k=_scalar(request, "top_k", int), seed=_scalar(request, "seed", int))
    return Request(prompt, images, None, _scalar(request, "system", str), _scalar(request, "max_new_tokens", int),
                   sampling, ignore_eos=bool(_scalar(request, "ignore_eos", bool)))


def cache_sizes(params: dict) -> dict:
    """The engine's cache sizes from config.pbtxt's `prefix_cache_mb` / `encoder_cache_mb` parameters (written by
    runtime/serve/triton_repo.py; absent: the defaults, both on; "0": off)."""
    from ..scheduler import DEFAULT_ENCODER_CACHE_MB, DEFAULT_PREFIX_CACHE_MB

    out = {}
    for key, default in (("prefix_cache_mb", DEFAULT_PREFIX_CACHE_MB), ("encoder_cache_mb", DEFAULT_ENCODER_CACHE_MB)):
        try:
            out[key] = float(params.get(key, default))
        except ValueError:
            out[key] = -1.0
        if not out[key] >= 0:
            raise UserError(f"config.pbtxt parameter {key} {params.get(key)!r}: must be a number >= 0 (0 = off)")
    return out


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        from ..generate import load_model
        from ..pipeline import Preprocessor
        from .engine_worker import EngineWorker

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.model = load_model(params["artifacts_dir"], params.get("backend", "auto"))
        self.pre = Preprocessor(self.model.manifest)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.max_batch = max(1, int(self.model.manifest.limits.max_batch))
        self.worker = EngineWorker(self.model, self.pre.tokenizer, self.max_batch, **cache_sizes(params))
        from .triton_metrics import TritonMetrics

        labels = {"model": args.get("model_name", config.get("name", "qwen_vl")),
                  "version": str(args.get("model_version", "1"))}
        self.metrics = TritonMetrics(pb_utils, labels, self.worker.load, self.worker.cache_stats)

    def execute(self, requests):
        senders = [r.get_response_sender() for r in requests] if self.decoupled else None
        responses: list = [None] * len(requests)
        ended = []
        for i, request in enumerate(requests):
            try:
                job = self.admit(i, request)
            except UserError as e:
                self.metrics.failed("invalid_request")
                _finish(i, senders, responses, _error(str(e), pb_utils.TritonError.INVALID_ARG))
                continue
            stream = _Stream(job, senders, responses, self.pre.tokenizer, self.metrics)
            ended.append(stream.done)
            self.worker.submit_request(stream.sequence())
        self.metrics.update_load()
        if self.decoupled:
            return None
        for done in ended:
            done.wait()
        return responses

    def finalize(self) -> None:
        self.worker.close()
        self.metrics.close()
        self.model = None

    def admit(self, index: int, request) -> Job:
        """Parse, preprocess and check one request on its own; a UserError concerns this request only."""
        from ..generate import cache_len_for

        arrived = time.monotonic()
        typed = parse_request(request)
        prepared = self.pre.prepare(typed)
        gen = self.model.manifest.generation_config
        max_new = typed.new_tokens(gen)
        cache_len_for(self.model, [prepared], max_new)  # raises PromptTooLong if prompt + max_new overflow
        return Job(index, request, prepared, typed.sampling.config(gen), max_new, typed.ignore_eos, arrived)


class _Stream:
    """One admitted job in the engine: the callbacks of its scheduler.SeqRequest (`sequence()`), run on the
    engine's thread: one response per token (decoupled), the final response (COMPLETE_FINAL, or stored for a
    non-decoupled `execute`) and `done` set after it. A request the client cancelled (checked before each token)
    stops at once: its slot is free for the next step and it gets a CANCELLED final response. The SeqRequest
    points here and not back, so that no reference cycle keeps a finished Triton request (and the backend's
    shared memory behind its tensors) alive until a garbage collection."""

    def __init__(self, job: Job, senders, responses: list, tokenizer, metrics):
        from ..prompt import IncrementalDecoder

        self.job, self.senders, self.responses, self.tokenizer = job, senders, responses, tokenizer
        self.metrics, self.token_times = metrics, []  # runtime/serve/triton_metrics.py; time of each token
        self.sender = senders[job.index] if senders is not None else None
        self.decoder, self.done, self.cancelled = IncrementalDecoder(tokenizer), threading.Event(), threading.Event()
        self.token_ids: list[int] = []  # tokens chosen and sent (or to return), EOS included

    def sequence(self):
        from ..scheduler import SeqRequest

        job = self.job
        return SeqRequest(job.prepared, job.max_new_tokens, job.sampling, job.ignore_eos, self.cancelled,
                          on_token=self.on_token, on_end=self.on_end, on_error=self.on_error)

    def on_token(self, token: int) -> bool:
        """-> True to stop (the client cancelled)."""
        if self.job.request.is_cancelled():
            self.cancelled.set()
            return True
        self.token_ids.append(token)
        self.token_times.append(time.monotonic())
        if self.sender is not None:
            self.sender.send(_response(self.decoder.push(token), [token]))
        return False

    def on_end(self, reason: str) -> None:
        if self.cancelled.is_set() or reason == "cancelled":
            self.metrics.failed("cancelled")
        else:
            self.metrics.finished(self.job.arrived, self.token_times, self.job.prepared.num_tokens, reason)
        self.metrics.update_load()
        if self.cancelled.is_set():
            pb_utils.Logger.log_info(f"qwen-vl-trt: request cancelled after {len(self.token_ids)} tokens")
            self._final(_error("request cancelled by the client", pb_utils.TritonError.CANCELLED))
        elif self.sender is not None:
            self._final(_response(self.decoder.flush(), []))
        else:
            self._final(_response(self.tokenizer.decode(self.token_ids), self.token_ids))

    def on_error(self, status: int, message: str) -> None:
        """`status` as scheduler.SeqRequest says: 400 the request, 503 shutting down, 500 a failure of ours."""
        codes = {400: pb_utils.TritonError.INVALID_ARG, 503: pb_utils.TritonError.UNAVAILABLE}
        self.metrics.failed({400: "invalid_request", 503: "unavailable"}.get(status, "server_error"))
        self.metrics.update_load()
        if status == 500:
            pb_utils.Logger.log_error(f"qwen-vl-trt: generation failed: {message}")
        self._final(_error(message, codes.get(status, pb_utils.TritonError.INTERNAL)))

    def _final(self, response) -> None:
        try:
            _finish(self.job.index, self.senders, self.responses, response)
        finally:
            self.done.set()


def _finish(i: int, senders, responses, response) -> None:
    """The last response of request i: returned from execute, or sent with COMPLETE_FINAL (decoupled)."""
    if senders is None:
        responses[i] = response
    else:
        senders[i].send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _error(message: str, code):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def _response(text: str, token_ids):
    """One response of one request: tensors carry the request's batch dim of 1 (`max_batch_size` > 0)."""
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("text", np.array([[text.encode("utf-8")]], dtype=np.object_)),  # [1, 1]
        pb_utils.Tensor("token_ids", np.asarray([list(token_ids)], dtype=np.int64).reshape(1, -1)),  # [1, n]
    ])
