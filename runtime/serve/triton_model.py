"""Triton Inference Server Python-backend model: the same pipeline as `trt-run`, one request per prompt.

The model repository that loads this file is written by `runtime/serve/triton_repo.py`
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

Requests that Triton hands over together and share a batch key (`Request.batch_key`, runtime/request.py: the same
sampling and ignore_eos; a seeded sampled request runs alone) and max_new_tokens run as one batch of `generate`
(sequences of different lengths share the decoder steps, runtime/generate.py).
"""
from __future__ import annotations

import json
import numpy as np

from qwen_vl_trt.model.errors import UserError

from ..request import Request, Sampling, prompt_or_default

try:  # present inside the Triton Python backend only; tests install a stand-in module of the same name
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - imported outside Triton (docs, linters)
    pb_utils = None


def _scalar(request, name: str, kind):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise UserError(f"input {name!r} must hold one value, got {values.size}")
    v = values[0]
    return v.decode("utf-8") if kind is str and isinstance(v, bytes) else kind(v)


def parse_request(request) -> Request:
    """One Triton request -> the typed request (runtime/request.py checks every value)."""
    images = pb_utils.get_input_tensor_by_name(request, "images")
    images = tuple(bytes(b) for b in images.as_numpy().reshape(-1)) if images is not None else ()
    prompt = prompt_or_default(_scalar(request, "prompt", str), bool(images), "send a `prompt` or `images`")
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
        groups: dict = {}
        for i, request in enumerate(requests):
            try:
                parsed = parse_request(request)
                prepared = self.pre.prepare(parsed)
            except UserError as e:
                self._finish(i, senders, responses, error=str(e))
                continue
            key = (parsed.batch_key(i), parsed.max_new_tokens)  # one batch: one sampler, one token budget
            groups.setdefault(key, []).append((i, parsed, prepared))
        for members in groups.values():
            for start in range(0, len(members), self.max_batch):
                self._run(members[start:start + self.max_batch], senders, responses)
        return None if self.decoupled else responses

    def finalize(self) -> None:
        self.model = None

    # ---- helpers ---------------------------------------------------------------------------------------
    def _run(self, members, senders, responses) -> None:
        """members: (index, Request, PreparedRequest) of one batch key."""
        from ..generate import generate
        from ..prompt import IncrementalDecoder
        from ..sampling import Sampler

        gen, first = self.model.manifest.generation_config, members[0][1]
        cfg, max_new = first.sampling.config(gen), first.new_tokens(gen)
        on_token = None
        if senders is not None:
            decoders = [IncrementalDecoder(self.pre.tokenizer) for _ in members]

            def on_token(b: int, token: int) -> None:
                senders[members[b][0]].send(_response(decoders[b].push(token), [token]))

        try:
            results = generate(self.model, [p for _, _, p in members], Sampler(cfg), max_new,
                               eos_token_ids=self.model.manifest.eos_token_ids, ignore_eos=first.ignore_eos,
                               on_token=on_token)
        except UserError as e:
            for i, _, _ in members:
                self._finish(i, senders, responses, error=str(e))
            return
        for b, ((i, _, _), result) in enumerate(zip(members, results)):
            if senders is not None:
                self._finish(i, senders, responses, text=decoders[b].flush(), token_ids=[])
            else:
                self._finish(i, senders, responses, text=self.pre.tokenizer.decode(result.token_ids),
                             token_ids=result.token_ids)

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
