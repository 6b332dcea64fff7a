"""The one interface every backend implements (as runtime/cpp/backend.h does for the C++ runtime).

    Session        one graph (vision | embed | decoder) of one artifact directory on one backend:
                   ort.OrtSession (ONNX Runtime) or trt.TrtSession (TensorRT)
      run(feeds, device_outputs=())   host numpy (or device values from this backend) -> outputs: numpy, except the
                                      `resident` names and `device_outputs`, which stay on the device
      allocate(shape, dtype)          a zeroed buffer of the kind `run` accepts (numpy, OrtValue, device buffer)
      decode_io(model, B, K)          (decoder) the DecodeIO that owns this generation's KV cache and step buffers
      device, provider, resident, graph_capture, graph_capture_error   plain attributes, set at load
    DecodeIO       one generation's decoder steps (runtime/backends/decode_io.py HostIO, ort_io.OrtBoundIO,
                   trt_io.TrtBoundIO)
      reset()                                          empty cache, same buffers
      prefill(embeds, position_ids, lengths, sampler)  -> first tokens int64 [B] (host)
      decode(tokens, position_ids, sampler)            -> next tokens int64 [B] (host)
      greedy_on_device(sampler)                        a DeviceGreedy over this IO's logits, or None (host)
      cache                                            the KVCache (its past_lengths int64 [B])

Shapes and dtypes of every tensor: docs/graphs.md. At load every session checks the graph / engine it opened
against the manifest's contract (`check_io`): a mismatch is an ArtifactError, never a warning.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from qwen_vl_trt.model.errors import ArtifactError

from .kv_cache import KVCache


class DecodeIO(Protocol):
    cache: KVCache

    def reset(self) -> None: ...

    def prefill(self, embeds: dict, position_ids: np.ndarray, lengths: np.ndarray, sampler) -> np.ndarray: ...

    def decode(self, tokens: np.ndarray, position_ids: np.ndarray, sampler) -> np.ndarray: ...

    def greedy_on_device(self, sampler): ...


class Session(Protocol):
    device: str  # "cpu" | "cuda": where `allocate` buffers and `resident` outputs live
    provider: str  # what runs the graph: ONNX Runtime's execution provider (e.g. "CUDAExecutionProvider") or "TensorRT"
    resident: frozenset  # output names that stay on the device (the decoder's present_* caches)
    graph_capture: bool  # the decode step replays a CUDA graph: generate.py rounds cache_len to few shapes
    graph_capture_error: str | None  # why capture was refused, when it was asked for

    def run(self, feeds: dict, device_outputs=()) -> dict: ...

    def allocate(self, shape: tuple, dtype: str): ...

    def decode_io(self, model, batch: int, cache_len: int) -> DecodeIO: ...


def check_io(contract, inputs: dict, outputs: dict, where: str) -> None:
    """`inputs`/`outputs`: name -> (dtype name, rank) as found in the graph/engine; raise on any difference."""
    problems = []
    for kind, specs, found in (("input", contract.inputs, inputs), ("output", contract.outputs, outputs)):
        expected = {t.name: (t.dtype, len(t.dims)) for t in specs}
        problems += [f"{kind} {n} missing" for n in expected if n not in found]
        problems += [f"unexpected {kind} {n}" for n in found if n not in expected]
        problems += [f"{kind} {n} is {found[n][0]} rank {found[n][1]}, contract says {e[0]} rank {e[1]}"
                     for n, e in expected.items() if n in found and tuple(found[n]) != e]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ArtifactError(f"{where} does not match the manifest contract of the {contract.name} graph: "
                            f"{'; '.join(problems[:3])}{more}; re-run export_all.sh for these artifacts")
