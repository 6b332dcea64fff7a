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
message `trt-run` prints, checked for that request alone in `admit`, so its batch neighbours go on. A streaming
request the client cancels gets a CANCELLED final response; when every request of a batch is cancelled the
generation stops. Triton itself rejects a tensor of the wrong datatype or shape (INVALID_ARG) before the model
sees it; a missing `prompt` reaches the model (Triton 2.51 lets a request omit a non-optional input when the
model has optional ones) and is refused here.

`execute` = `admit` each request (parse, preprocess, check limits -> `Job`) then run batches of jobs that
share sampling settings through `generate` (sequences of different lengths share the decoder steps,
runtime/generate.py); an engine that schedules jobs as they arrive can take `Job`s from `admit` unchanged.
"""
from __future__ import annotations

import json
import traceback
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
    the typed request (runtime/request.py), the preprocessed inputs (pipeline.PreparedRequest) and its resolved
    generation settings."""
    index: int
    request: object
    typed: Request
    prepared: object
    sampling: object  # sampling.SamplingConfig
    max_new_tokens: int

    @property
    def ignore_eos(self) -> bool:
        return self.typed.ignore_eos

    @property
    def batch_key(self) -> tuple:
        """Jobs with equal keys can share one `generate` call (`Request.batch_key`: a seeded sampled request runs
        alone) with one token budget."""
        return self.typed.batch_key(self.index), self.max_new_tokens


class _AllCancelled(Exception):
    """Raised from the token callback to stop a generation whose requests were all cancelled."""


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


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        from ..generate import load_model
        from ..pipeline import Preprocessor

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.model = load_model(params["artifacts_dir"], params.get("backend", "auto"))
        self.pre = Preprocessor(self.model.manifest)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.max_batch = max(1, int(self.model.manifest.limits.max_batch))

    def execute(self, requests):
        senders = [r.get_response_sender() for r in requests] if self.decoupled else None
        responses: list = [None] * len(requests)
        jobs = []
        for i, request in enumerate(requests):
            try:
                jobs.append(self.admit(i, request))
            except UserError as e:
                _finish(i, senders, responses, _error(str(e), pb_utils.TritonError.INVALID_ARG))
        for batch in self.batches(jobs):
            self._run(batch, senders, responses)
        return None if self.decoupled else responses

    def finalize(self) -> None:
        self.model = None

    def admit(self, index: int, request) -> Job:
        """Parse, preprocess and check one request on its own; a UserError concerns this request only."""
        from ..generate import cache_len_for

        typed = parse_request(request)
        prepared = self.pre.prepare(typed)
        gen = self.model.manifest.generation_config
        max_new = typed.new_tokens(gen)
        cache_len_for(self.model, [prepared], max_new)  # raises PromptTooLong if prompt + max_new overflow
        return Job(index, request, typed, prepared, typed.sampling.config(gen), max_new)

    def batches(self, jobs: list[Job]):
        """Jobs grouped by `batch_key`, in slices of at most the artifacts' max_batch."""
        groups: dict = {}
        for job in jobs:
            groups.setdefault(job.batch_key, []).append(job)
        for members in groups.values():
            for start in range(0, len(members), self.max_batch):
                yield members[start:start + self.max_batch]

    # ---- running one batch -----------------------------------------------------------------------------
    def _run(self, batch: list[Job], senders, responses) -> None:
        from ..generate import generate
        from ..sampling import Sampler

        streams = _Streams(batch, senders, self.pre.tokenizer) if senders is not None else None
        try:
            results = generate(self.model, [job.prepared for job in batch], Sampler(batch[0].sampling),
                               batch[0].max_new_tokens, eos_token_ids=self.model.manifest.eos_token_ids,
                               ignore_eos=batch[0].ignore_eos, on_token=streams.on_token if streams else None)
        except _AllCancelled:
            return
        except UserError as e:
            self._fail(batch, streams, senders, responses, _error(str(e), pb_utils.TritonError.INVALID_ARG))
            return
        except Exception as e:  # a bug: answer every request of the batch instead of leaving them hanging
            pb_utils.Logger.log_error(f"qwen-vl-trt: generation failed:\n{traceback.format_exc()}")
            self._fail(batch, streams, senders, responses,
                       _error(f"internal error: {type(e).__name__}: {e}", pb_utils.TritonError.INTERNAL))
            return
        for b, (job, result) in enumerate(zip(batch, results)):
            if streams is not None:
                streams.finish(b)
            else:
                text = self.pre.tokenizer.decode(result.token_ids)
                _finish(job.index, None, responses, _response(text, result.token_ids))

    @staticmethod
    def _fail(batch, streams, senders, responses, error_response) -> None:
        for b, job in enumerate(batch):
            if streams is None or not streams.closed[b]:
                _finish(job.index, senders, responses, error_response)


class _Streams:
    """Token streaming of one decoupled batch: one response per token, a CANCELLED final response to a
    request the client cancelled (checked before each token), `_AllCancelled` once every request is."""

    def __init__(self, batch: list[Job], senders, tokenizer):
        from ..prompt import IncrementalDecoder

        self.batch, self.senders = batch, [senders[job.index] for job in batch]
        self.decoders = [IncrementalDecoder(tokenizer) for _ in batch]
        self.closed = [False] * len(batch)
        self.sent = [0] * len(batch)

    def on_token(self, b: int, token: int) -> None:
        if self.closed[b]:
            return
        if self.batch[b].request.is_cancelled():
            pb_utils.Logger.log_info(f"qwen-vl-trt: request cancelled after {self.sent[b]} tokens")
            self.senders[b].send(_error("request cancelled by the client", pb_utils.TritonError.CANCELLED),
                                 flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            self.closed[b] = True
            if all(self.closed):
                raise _AllCancelled
            return
        self.senders[b].send(_response(self.decoders[b].push(token), [token]))
        self.sent[b] += 1

    def finish(self, b: int) -> None:
        if not self.closed[b]:
            self.senders[b].send(_response(self.decoders[b].flush(), []),
                                 flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            self.closed[b] = True


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
