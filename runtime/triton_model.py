"""Triton Inference Server Python-backend model: the same pipeline as `trt-run`, one request per prompt.

The model repository that loads this file is written by `runtime/triton_repo.py`
(`qwen-vl-triton-repo ARTIFACTS REPO`); its `1/model.py` only re-exports `TritonPythonModel` from here, so
the Triton container needs this package installed (`pip install qwen-vl-trt`), nothing else.

Request tensors (batch dim first, `max_batch_size` = the artifacts' max_batch; optional ones may be omitted):

| name | type | dims | meaning |
|---|---|---|---|
| `prompt` | TYPE_STRING | [1] | user text |
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
holds the whole text and all token ids. Bad input: that request gets a TritonError with the same one-line
message `trt-run` prints; the others in the batch go on.

Requests join one running batch at the next decode step, whatever their sampling settings, and leave it when they
end (in-flight batching, runtime/scheduler.py); each has its own sampler (a seed gives the text it gives alone).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .cli import DEFAULT_MAX_NEW_TOKENS
from .errors import UserError

try:  # present inside the Triton Python backend only; tests install a stand-in module of the same name
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - imported outside Triton (docs, linters)
    pb_utils = None


@dataclass(frozen=True)
class ParsedRequest:
    prompt: str
    images: tuple  # encoded image bytes
    system: str | None
    max_new_tokens: int | None
    sampling: tuple  # (temperature, top_p, top_k, seed): None = generation_config.json default
    ignore_eos: bool


def _scalar(request, name: str, kind):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise UserError(f"input {name!r} must hold one value, got {values.size}")
    v = values[0]
    return v.decode("utf-8") if kind is str and isinstance(v, bytes) else kind(v)


def parse_request(request) -> ParsedRequest:
    prompt = _scalar(request, "prompt", str)
    images = pb_utils.get_input_tensor_by_name(request, "images")
    images = tuple(bytes(b) for b in images.as_numpy().reshape(-1)) if images is not None else ()
    if not prompt:
        if not images:
            raise UserError("nothing to do: send a `prompt` or `images`")
        prompt = "Describe this image."
    max_new = _scalar(request, "max_new_tokens", int)
    if max_new is not None and max_new < 1:
        raise UserError(f"max_new_tokens {max_new}: must be >= 1")
    temperature, top_p = _scalar(request, "temperature", float), _scalar(request, "top_p", float)
    if temperature is not None and temperature < 0:
        raise UserError(f"temperature {temperature}: must be >= 0 (0 = greedy)")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"top_p {top_p}: must be in (0, 1]")
    sampling = (temperature, top_p, _scalar(request, "top_k", int), _scalar(request, "seed", int))
    return ParsedRequest(prompt, images, _scalar(request, "system", str), max_new, sampling,
                         bool(_scalar(request, "ignore_eos", bool)))


class TritonPythonModel:
    """Requests go into one in-flight engine (runtime/scheduler.py) stepped by its own thread
    (runtime/engine_worker.py): decoupled, `execute` returns at once and each request's tokens are sent as they
    are chosen, by the engine's thread; otherwise `execute` waits for its requests and returns their responses."""

    def initialize(self, args: dict) -> None:
        from .engine_worker import EngineWorker
        from .generate import load_model
        from .pipeline import Preprocessor

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.model = load_model(params["artifacts_dir"], params.get("backend", "auto"))
        self.pre = Preprocessor(self.model.manifest)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.max_batch = max(1, int(self.model.manifest.limits.max_batch))
        self.worker = EngineWorker(self.model, self.pre.tokenizer, self.max_batch)

    def execute(self, requests):
        senders = [r.get_response_sender() for r in requests] if self.decoupled else None
        responses: list = [None] * len(requests)
        ended = []
        for i, request in enumerate(requests):
            try:
                parsed = parse_request(request)
                prepared = self._prepare(parsed)
            except UserError as e:
                self._finish(i, senders, responses, error=str(e))
                continue
            seq, done = self._sequence(i, request, parsed, prepared, senders, responses)
            ended.append(done)
            self.worker.submit_request(seq)
        if self.decoupled:
            return None
        for event in ended:
            event.wait()
        return responses

    def finalize(self) -> None:
        self.worker.close()
        self.model = None

    # ---- helpers ---------------------------------------------------------------------------------------
    def _prepare(self, parsed: ParsedRequest):
        from .pipeline import Request

        return self.pre.prepare(Request(parsed.prompt, parsed.images, None, parsed.system))

    def _sequence(self, i: int, request, parsed: ParsedRequest, prepared, senders, responses):
        """-> (the engine's request for Triton request i, an Event set once its final response is out). Its
        callbacks run on the engine's thread and send (decoupled) or store the responses."""
        import threading

        from .prompt import IncrementalDecoder
        from .sampling import SamplingConfig
        from .scheduler import SeqRequest

        gen = self.model.manifest.generation_config
        temperature, top_p, top_k, seed = parsed.sampling
        cfg = SamplingConfig.from_generation_config(gen, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        max_new = parsed.max_new_tokens or int(gen.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        decoder, seq, done = IncrementalDecoder(self.pre.tokenizer), None, threading.Event()

        def on_token(token: int) -> bool:
            if senders is not None:
                senders[i].send(_response(decoder.push(token), [token]))
            if getattr(request, "is_cancelled", None) is not None and request.is_cancelled():
                seq.cancelled.set()  # the client went away (python_backend: request.is_cancelled())
            return False

        def on_end(reason: str) -> None:
            if senders is not None:
                self._finish(i, senders, responses, text=decoder.flush(), token_ids=[])
            else:
                self._finish(i, senders, responses, text=self.pre.tokenizer.decode(seq.token_ids),
                             token_ids=seq.token_ids)
            done.set()

        def on_error(status: int, message: str) -> None:
            self._finish(i, senders, responses, error=message)
            done.set()

        seq = SeqRequest(prepared, max_new, cfg, parsed.ignore_eos, on_token=on_token, on_end=on_end,
                         on_error=on_error)
        return seq, done

    @staticmethod
    def _finish(i: int, senders, responses, text: str = "", token_ids=(), error: str | None = None) -> None:
        response = (pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(error))
                    if error is not None else _response(text, token_ids))
        if senders is None:
            responses[i] = response
        else:
            senders[i].send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _response(text: str, token_ids):
    """One response of one request: tensors carry the request's batch dim of 1 (`max_batch_size` > 0)."""
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("text", np.array([[text.encode("utf-8")]], dtype=np.object_)),  # [1, 1]
        pb_utils.Tensor("token_ids", np.asarray([list(token_ids)], dtype=np.int64).reshape(1, -1)),  # [1, n]
    ])
