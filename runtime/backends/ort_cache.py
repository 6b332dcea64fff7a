"""ONNX Runtime's optimized model of a graph, cached so that a later start skips graph optimization.

`cached_model(cache_dir, graph_path, providers, config)` -> (path ONNX Runtime should load, path it should save the
optimized model to or None). The entry is a folder `<cache_dir>/<graph file>-<key>/` holding `model.onnx` and its
external initializers `model.onnx.data` (ONNX Runtime writes both when `optimized_model_filepath` is set, with
`session.optimized_model_external_initializers_file_name`: a multi-GB graph cannot be one protobuf).

The key is a sha256 over everything that decides what ONNX Runtime's optimizer writes:
- the graph's files: `<stem>.*` beside it (decoder.ort.onnx reads decoder.onnx.data: every file of the stem),
  each by name, size and mtime (a re-export rewrites them);
- ONNX Runtime's version, the providers in order, the session config entries set on the session (e.g. the
  MatMulNBits accuracy level, which the DequantizeLinear + MatMul -> MatMulNBits fusion bakes in).
- `qwen_vl.int4_kernel`: an INT4 decoder whose MatMulNBits nodes runtime/backends/ort_int4_kernel.py renamed to our
  qwen_vl::MatMulInt4 has its own entry (ort.OrtSession writes it with a session that only optimizes, then renames).
The intra-op thread count is not part of it: neither the optimized graph nor prepack_order.py's reordered graph
depends on it (no prepacked blob is cached, see below).
The optimized model is saved at ORT_ENABLE_EXTENDED (hardware-independent: ONNX Runtime's layout
transformations at ORT_ENABLE_ALL may depend on the CPU) and loaded at the default level, which then applies only
what EXTENDED left.

`cached_graph` keeps, in an entry of the same key (plus what makes it), a graph protobuf without weights that a session
loads from memory on the weights of the artifact folder: runtime/backends/prepack_order.py's reordered decoder and
runtime/backends/ort_f32_kernel.py's decoder with renamed products (87 KB, not a copy of the weights).

A stale entry is never reused (another key); it is not deleted either (a cache folder the user owns).

The default cache (`default_dir`, used by runtime/backends/loader.py on the CPU provider when no folder is given):
`<artifacts>/.ort-cache/` when the artifact folder is writable, else `$XDG_CACHE_HOME/qwen-vl-trt/ort/<digest of
the artifact folder's path>/` (`~/.cache` without XDG_CACHE_HOME). It holds only the graphs whose load-time
optimization rewrites their weights (the INT4 decoder's DequantizeLinear + MatMul -> MatMulNBits fusion: about
1 s of a start-up on the benchmark's checkpoint, docs/benchmarks.md); its disk cost is one copy of that graph's
weights per key (0.38 GB for the INT4 decoder of the 0.92 B benchmark checkpoint, per MatMulNBits accuracy level).

What it cannot hold: ONNX Runtime's prepacked weights. `session.save_external_prepacked_constant_initializers`
writes them beside the optimized model, but a session that loads them still runs every kernel's PrePack (to compute
the key it looks the saved blob up with) before it switches to the mapped copy: no faster, and a higher peak RSS
(docs/benchmarks.md "Saved prepacked weights").
Writing goes to a temporary folder renamed into place when ONNX Runtime has finished, so a crash mid-write
leaves no entry that looks complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

MODEL = "model.onnx"
GRAPH = "graph.pb"


def default_dir(artifacts: Path, environ=os.environ) -> Path:
    """Where the default cache of an artifact folder lives: inside it when writable, else the user's cache dir."""
    artifacts = Path(artifacts).resolve()
    if os.access(artifacts, os.W_OK):
        return artifacts / ".ort-cache"
    base = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(str(artifacts).encode()).hexdigest()[:16]
    return base / "qwen-vl-trt" / "ort" / digest


def graph_files(graph_path: Path) -> list[Path]:
    """The files a graph is made of: every `<stem>.*` beside it (graph, fused flavour, external data)."""
    stem = graph_path.name.split(".", 1)[0]
    return sorted(p for p in graph_path.parent.glob(f"{stem}.*") if p.is_file())


def cache_key(graph_path: Path, providers, config: dict, ort_version: str) -> str:
    files = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in graph_files(graph_path)]
    blob = json.dumps({"graph": graph_path.name, "files": files, "onnxruntime": ort_version,
                       "providers": list(providers), "config": sorted(config.items())})
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def entry_dir(cache_dir: Path, graph_path: Path, providers, config: dict, ort_version: str) -> Path:
    return Path(cache_dir) / f"{graph_path.name}-{cache_key(graph_path, providers, config, ort_version)}"


def cached_model(cache_dir: Path, graph_path: Path, providers, config: dict, ort_version: str):
    """-> (model path to load, folder to write the optimized model into, or None when the entry exists)."""
    entry = entry_dir(cache_dir, graph_path, providers, config, ort_version)
    if (entry / MODEL).is_file():
        return entry / MODEL, None
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return graph_path, Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=cache_dir))


def save_options(opts, tmp_dir: Path, ort) -> None:
    """Make the session that loads the original graph write its optimized model into tmp_dir."""
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_dir / MODEL)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", MODEL + ".data")
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")


def commit(tmp_dir: Path, cache_dir: Path, graph_path: Path, providers, config: dict, ort_version: str) -> None:
    """Rename the written entry into place (another process may have won the race: then drop ours)."""
    entry = entry_dir(cache_dir, graph_path, providers, config, ort_version)
    if not (tmp_dir / MODEL).is_file():
        discard(tmp_dir)
        return
    try:
        os.rename(tmp_dir, entry)
    except OSError:
        discard(tmp_dir)


def discard(tmp_dir: Path) -> None:
    shutil.rmtree(tmp_dir, ignore_errors=True)


def cached_graph(cache_dir: Path, graph_path: Path, providers, config: dict, ort_version: str, what: dict,
                 make: Callable[[Path], bytes]) -> tuple[bytes, bool]:
    """(make(graph_path), whether it came from the cache): a graph protobuf without weights, kept in the entry of
    config + `what` (what makes it, part of the key). A cache folder that cannot be written only costs the make."""
    entry = entry_dir(cache_dir, graph_path, providers, {**config, **what}, ort_version)
    try:
        return (entry / GRAPH).read_bytes(), True
    except OSError:
        pass
    blob = make(graph_path)
    try:
        entry.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{GRAPH}-", dir=entry)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other users of the artifact folder
        os.replace(tmp, entry / GRAPH)  # atomic: a reader sees the whole file or none
    except OSError:
        pass
    return blob, False
