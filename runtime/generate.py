"""The generation loop, in gpt-fast's shape: `prefill()`, `decode_one_token()`, `generate()`.

vision.onnx (all media of the batch, prompt order) -> embed.onnx (pads replaced by vision rows) ->
decoder.onnx prefill of the right-padded batch -> one decoder step per token through the explicit KV cache.

Batching: prompts of different lengths are right-padded to the longest; each sequence keeps its own
`past_lengths[b]` (the decoder writes its new rows there), `logits_index[b] = len_b - 1` at prefill, and its
own rope delta. Decode positions are `past_lengths[b] + rope_delta[b]` on all three MRoPE axes (HF).
A finished sequence keeps stepping with the pad token; those tokens are not part of its result.

How the decoder's buffers move is the business of the backend's decode IO (runtime/backends/decode_io.py): with I/O binding (the default) every
decode-step input and output is bound once, the KV cache stays on the EP's device, the decode step is a CUDA
graph replay on the CUDA EP, and greedy tokens are chosen on the device, so per token only the token ids cross
to the host. `prefill()` and `decode_one_token()` return the chosen tokens, as gpt-fast's do.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from qwen_vl_trt.model.errors import PromptTooLong, UserError

from .backends.decode_io import decode_io
from .backends.kv_cache import numpy_dtype
from .pipeline import PreparedRequest, vision_feeds
from .positions import decode_position_ids
from .sampling import Sampler

CACHE_ALIGN = 16  # cache_len is rounded up to this (the engines' minimum cache_len is 16)
_VISION_OUT = ("vision_features", "deepstack_features")
_EMBED_OUT = ("inputs_embeds", "deepstack_embeds")
GRAPH_MIN_CACHE = 256  # with CUDA graphs cache_len is a power of two >= this: few shapes, few captured graphs


@dataclass
class Model:
    """The three sessions of one artifact directory (runtime/backends/) and what the loop needs to know."""

    sessions: dict
    manifest: object
    backend: str = "onnxruntime"
    static: dict = field(default_factory=dict)  # (batch, cache_len) -> the bound decode IO kept for reuse

    @property
    def spec(self):
        return self.manifest.spec


@dataclass
class Result:
    token_ids: list = field(default_factory=list)  # generated ids (incl. the EOS that stopped it)
    prompt_tokens: int = 0
    timings: dict = field(default_factory=dict)
    logprobs: list = field(default_factory=list)  # sampling.TokenLogprobs per token, when the sampler computes them


def encode_vision(model: Model, requests: list[PreparedRequest],
                  on_device: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Vision features of every media item of the batch, in prompt order: ([M, C], [Ld, M, C] or None).
    Items are grouped into vision calls within the artifacts' max_patches / max_frames. One call's outputs stay
    on the session's device with `on_device`; else (and with several calls) they are host arrays."""
    spec, lim = model.spec, model.manifest.limits
    media = [m for r in requests for m in r.media]
    groups, cur = [], []
    for m in media:
        patches = sum(int(np.prod(x.grid_thw)) for x in cur) + int(np.prod(m.grid_thw))
        frames = sum(x.grid_thw[0] for x in cur) + m.grid_thw[0]
        if cur and (patches > lim.max_patches or frames > lim.max_frames):
            groups.append(cur)
            cur = []
        cur.append(m)
    groups += [cur] if cur else []
    feats, deep = [np.zeros((0, spec.text.hidden_size), numpy_dtype(model.manifest.dtype))], []
    for group in groups:
        grids = np.asarray([m.grid_thw for m in group], np.int64)
        pixels = group[0].pixel_values if len(group) == 1 else np.concatenate([m.pixel_values for m in group])
        # one vision call (the usual case): its outputs stay on the device and go to embed.onnx from there
        one_call = len(groups) == 1 and on_device
        out = model.sessions["vision"].run(vision_feeds(spec, pixels, grids),
                                           device_outputs=_VISION_OUT if one_call else ())
        if one_call:
            return out["vision_features"], out.get("deepstack_features")
        feats.append(out["vision_features"])  # [M_g, C]
        if spec.num_deepstack:
            deep.append(out["deepstack_features"])  # [Ld, M_g, C]
    if not spec.num_deepstack:
        return np.concatenate(feats), None
    deep.insert(0, np.zeros((spec.num_deepstack, 0, spec.text.hidden_size), feats[0].dtype))
    return np.concatenate(feats), np.concatenate(deep, axis=1)


def embed(model: Model, input_ids: np.ndarray, features, deepstack, on_device: bool = False) -> dict:
    """input_ids int64 [B, S] -> {"inputs_embeds": [B, S, C], "deepstack_embeds": [Ld, B, S, C]}; numpy, or left
    on the session's device with `on_device` (where it has one) for the decoder to read from there."""
    feeds = {"input_ids": input_ids, "vision_features": features}
    if deepstack is not None:
        feeds["deepstack_features"] = deepstack
    return model.sessions["embed"].run(feeds, device_outputs=_EMBED_OUT if on_device else ())


def prefill(model: Model, io, requests: list[PreparedRequest], features, deepstack, pad_id: int,
            sampler: Sampler) -> np.ndarray:
    """All prompts, right-padded into one decoder call -> the first token of each sequence, int64 [B]."""
    lengths = np.array([r.num_tokens for r in requests], np.int64)
    batch, seq = len(requests), int(lengths.max())
    input_ids = np.full((batch, seq), pad_id, np.int64)  # [B, S]
    position_ids = np.zeros((3, batch, seq), np.int64)  # [3, B, S]
    for b, r in enumerate(requests):
        input_ids[b, :r.num_tokens] = r.input_ids
        position_ids[:, b, :r.num_tokens] = r.position_ids
    embeds = embed(model, input_ids, features, deepstack, on_device=True)
    return io.prefill(embeds, position_ids, lengths, sampler)


def decode_one_token(io, tokens: np.ndarray, rope_deltas: np.ndarray, sampler: Sampler) -> np.ndarray:
    """tokens int64 [B] -> the next token of each sequence int64 [B]; writes one row per sequence into the cache."""
    position_ids = decode_position_ids(io.cache.past_lengths, rope_deltas)  # [3, B, 1]
    return io.decode(tokens, position_ids, sampler)


def cache_len_for(model: Model, requests: list[PreparedRequest], max_new_tokens: int) -> int:
    """KV-cache rows for this batch (checked against the artifact limits): prompt + new tokens, rounded up."""
    lim = model.manifest.limits
    if len(requests) > lim.max_batch:
        raise UserError(f"{len(requests)} prompts in one batch, artifacts allow at most {lim.max_batch}: "
                        "re-export with a larger --max-batch")
    longest = max(r.num_tokens for r in requests)
    if longest + max_new_tokens > lim.max_cache_len:
        raise PromptTooLong(f"prompt has {longest} tokens and --max-new-tokens is {max_new_tokens}: together they "
                            f"exceed the {lim.max_cache_len}-token cache of the artifacts; lower --max-new-tokens "
                            "or re-export with a larger --max-cache-len")
    need = longest + max_new_tokens
    if model.sessions["decoder"].graph_capture:
        need = max(GRAPH_MIN_CACHE, 1 << (need - 1).bit_length())
    return min(-(-need // CACHE_ALIGN) * CACHE_ALIGN, lim.max_cache_len)


def generate(model: Model, requests: list[PreparedRequest], sampler: Sampler, max_new_tokens: int, *,
             eos_token_ids=(), ignore_eos: bool = False, on_token=None) -> list[Result]:
    """Generate up to `max_new_tokens` per prompt (exactly that many with `ignore_eos`).
    `on_token(b, token_id)` is called as each token of sequence b is chosen."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: must be >= 1")
    pad_id = model.manifest.pad_token_id
    io = decode_io(model, len(requests), cache_len_for(model, requests, max_new_tokens))
    sampler.start([r.input_ids for r in requests], model.spec.text.vocab_size)
    t0 = time.perf_counter()
    features, deepstack = encode_vision(model, requests)
    t_vision = time.perf_counter()
    sampled = prefill(model, io, requests, features, deepstack, pad_id, sampler)
    deltas = np.array([r.rope_delta for r in requests], np.int64)
    results = [Result(prompt_tokens=r.num_tokens) for r in requests]
    done = np.zeros(len(requests), bool)
    eos = np.asarray(eos_token_ids if not ignore_eos else (), np.int64)
    t_first = None
    for step in range(max_new_tokens):
        tokens = np.where(done, pad_id, sampled)  # [B]
        t_first = t_first or time.perf_counter()
        for b in np.flatnonzero(~done):
            results[b].token_ids.append(int(tokens[b]))
            if on_token is not None:
                on_token(int(b), int(tokens[b]))
        done |= np.isin(tokens, eos)  # the stop rule
        if done.all() or step == max_new_tokens - 1:
            break
        sampled = decode_one_token(io, tokens, deltas, sampler)
    t_end = time.perf_counter()
    for r, res in zip(requests, results):
        res.timings = _timings(r, res, t0, t_vision, t_first, t_end, model.backend)
    return results


def _timings(request, result, t0, t_vision, t_first, t_end, backend) -> dict:
    decoded = max(len(result.token_ids) - 1, 0)  # tokens after the first one
    decode_s = t_end - t_first
    return {"backend": backend, "preprocess_ms": round(request.timings.get("preprocess_ms", 0.0), 2),
            "vision_ms": round(1e3 * (t_vision - t0), 2), "prefill_ms": round(1e3 * (t_first - t_vision), 2),
            "ttft_ms": round(1e3 * (t_first - t0), 2), "decode_ms": round(1e3 * decode_s, 2),
            "decode_tokens": decoded, "decode_tok_per_s": round(decoded / decode_s, 2) if decode_s > 0 else None}


def load_model(directory, backend: str = "auto", *, io_binding: bool = True, threads: int = 0,
               cuda_graph: bool = True, ort_fused: bool = True, int4_activations: str | None = None,
               ort_cache=None, ort_prepack: bool = True, int4_kernel: str = "auto", dense_kernel: str = "auto",
               started=None) -> Model:
    """Read and verify ARTIFACTS/manifest.json, then open the three sessions of `backend` (auto picks
    TensorRT when the engines exist and a TensorRT runtime and a GPU can run them, else ONNX Runtime).
    `io_binding` False: ONNX Runtime with plain numpy feeds (runtime/backends/decode_io.py HostIO); `cuda_graph` False:
    no CUDA graph capture of the decode step; `ort_fused` False: ONNX Runtime runs decoder.onnx instead of
    decoder.ort.onnx (export/ort_fused.py); `int4_activations` fp32 | int8: overrides manifest.json's for ONNX
    Runtime's INT4 MatMulNBits (runtime/backends/ort.py `int4_accuracy`);
    `ort_cache`, `ort_prepack`, `int4_kernel`, `dense_kernel`, `started`: runtime/backends/loader.py open_sessions."""
    from qwen_vl_trt.model.manifest import load_manifest

    from .backends.loader import open_sessions

    manifest = load_manifest(directory)
    used, sessions = open_sessions(manifest, backend, io_binding=io_binding, threads=threads, cuda_graph=cuda_graph,
                                   ort_fused=ort_fused, int4_activations=int4_activations, ort_cache=ort_cache,
                                   ort_prepack=ort_prepack, int4_kernel=int4_kernel, dense_kernel=dense_kernel,
                                   started=started)
    return Model(sessions, manifest, used)
