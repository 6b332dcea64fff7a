"""The C++ runtime's `worker` backend, Python side: the three graphs on ONNX Runtime behind a pipe (torch-free).

`qwen-vl-generate --backend worker` (runtime/cpp/) spawns `python -m qwen_vl_trt.runtime.graph_worker ARTIFACTS`
and talks to it over the child's stdin/stdout in frames: an 8-byte little-endian length, then a safetensors
blob (header JSON + raw tensor bytes) whose `__metadata__` carries the command. One request, one reply:

| request `__metadata__` | request tensors | reply tensors |
|---|---|---|
| (none: the worker speaks first) | | `{"status": "ready", "backend": "onnxruntime", "dtype": ...}` |
| `{"op": "cache", "batch": B, "cache_len": K}` | | a zeroed KV cache [B, Hkv, K, D] per layer is now resident here |
| `{"op": "run", "graph": "vision"}` (or "embed") | the graph's inputs | all its outputs |
| `{"op": "run", "graph": "decoder"}` | every input but `past_*` | `logits` float32 [B, V]; `present_*` stay here as the next `past_*` |

A failure is a reply `{"status": "error", "error": "<one line>"}` and the worker keeps serving (or exits, when
it could not start). It exits when its stdin closes (the parent closed the pipe or died), so it never outlives
the C++ process. Sessions: runtime/backends/ort.py (numpy feeds, CPU EP); cache: runtime/backends/kv_cache.py.
"""
from __future__ import annotations

import json
import struct
import sys

import numpy as np

from qwen_vl_trt.model.errors import UserError
from .backends.kv_cache import KVCache, numpy_dtype

_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
              "I32": "int32", "BOOL": "bool", "U8": "uint8"}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def encode(tensors: dict, metadata: dict | None = None) -> bytes:
    """name -> numpy array (+ str -> str metadata) -> safetensors bytes."""
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    for name, value in tensors.items():
        arr = np.ascontiguousarray(value)
        dtype = "bfloat16" if arr.dtype == numpy_dtype("bfloat16") else arr.dtype.name
        raw = arr.tobytes()
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def decode(blob: bytes) -> tuple[dict, dict]:
    """safetensors bytes -> (name -> numpy array, metadata)."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", {}) or {}
    data = memoryview(blob)[8 + n:]
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dt = numpy_dtype(_ST_DTYPES[info["dtype"]])
        out[name] = np.frombuffer(data[begin:end], dt).reshape(info["shape"])
    return out, meta


def read_frame(stream) -> bytes | None:
    """One frame, or None at end of input."""
    head = stream.read(8)
    if len(head) < 8:
        return None
    (n,) = struct.unpack("<Q", head)
    body = stream.read(n)
    return body if len(body) == n else None


def write_frame(stream, blob: bytes) -> None:
    stream.write(struct.pack("<Q", len(blob)) + blob)
    stream.flush()


class Worker:
    """The three ONNX Runtime sessions of one artifact directory and the decoder's resident KV cache."""

    def __init__(self, directory: str, ort_graphs: str = "fused", threads: int = 0):
        from qwen_vl_trt.model.manifest import load_manifest
        from .backends.loader import open_sessions

        self.manifest = load_manifest(directory)
        _, self.sessions = open_sessions(self.manifest, "onnxruntime", io_binding=False, threads=threads,
                                         cuda_graph=False, ort_fused=ort_graphs == "fused")
        self.cache: KVCache | None = None

    def handle(self, tensors: dict, meta: dict) -> dict:
        op = meta.get("op")
        if op == "cache":
            t = self.manifest.spec.text
            self.cache = KVCache(t.num_hidden_layers, int(meta["batch"]), t.num_key_value_heads,
                                 int(meta["cache_len"]), t.head_dim, self.manifest.dtype,
                                 allocate=self.sessions["decoder"].allocate)
            return {}
        if op != "run" or meta.get("graph") not in self.sessions:
            raise UserError(f"graph worker: unknown request {meta!r}")
        graph = meta["graph"]
        if graph != "decoder":
            return self.sessions[graph].run(dict(tensors))
        if self.cache is None:
            raise UserError("graph worker: decoder run before a cache was allocated")
        out = self.sessions["decoder"].run({**tensors, **self.cache.buffers})
        self.cache.update(out, 0)  # past_lengths are the caller's: it sends them with every step
        return {"logits": np.asarray(out["logits"])}


def serve(directory: str, ort_graphs: str, stdin, stdout) -> int:
    try:
        worker = Worker(directory, ort_graphs)
    except Exception as e:  # noqa: BLE001 -- reported to the C++ side as one line, then exit
        write_frame(stdout, encode({}, {"status": "error", "error": _one_line(e)}))
        return 2
    write_frame(stdout, encode({}, {"status": "ready", "backend": "onnxruntime", "dtype": worker.manifest.dtype}))
    while (blob := read_frame(stdin)) is not None:
        try:
            tensors, meta = decode(blob)
            reply = encode(worker.handle(tensors, meta), {"status": "ok"})
        except Exception as e:  # noqa: BLE001 -- one bad request is one error reply
            reply = encode({}, {"status": "error", "error": _one_line(e)})
        try:
            write_frame(stdout, reply)
        except BrokenPipeError:
            return 0
    return 0


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="graph_worker", description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--ort-graphs", choices=("fused", "plugin"), default="fused")
    args = ap.parse_args(argv)
    # frames go to a private copy of stdout; fd 1 becomes stderr, so a stray print cannot corrupt a frame
    import os

    frames_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    return serve(args.model_dir, args.ort_graphs, sys.stdin.buffer, frames_out)


if __name__ == "__main__":
    sys.exit(main())
