"""Make an artifact directory self-describing: copy the checkpoint's tokenizer/processor files and write
manifest.json (format in model/manifest.py). Steps [3/5] and [5/5] of export/export_all.py.

The limits (model/contracts.py `Limits`) are the ones the engines were built with; the runtime enforces them on
every backend so a request that an engine would refuse fails the same way on ONNX Runtime.
"""
from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
from pathlib import Path

from qwen_vl_trt.model.contracts import Limits
from qwen_vl_trt.model.errors import CheckpointError
from qwen_vl_trt.model.manifest import COPIED_FILES, GRAPHS, REQUIRED_FILES, save_manifest, sha256_file
from qwen_vl_trt.model.spec import ModelSpec

from qwen_vl_trt.model.weight_formats import METADATA_KEY, WeightFormats

from .onnx_graph import DTYPE_ALIASES
from .ort_fused import fused_path, nbits_data_path

_TOOLS = ("onnx", "onnxruntime", "torch", "transformers", "numpy", "tokenizers", "tensorrt", "tensorrt_rtx",
          "tensorrt-rtx-cu13")


def copy_checkpoint_files(ckpt: Path, out: Path) -> dict[str, str]:
    """Copy the files the runtime reads (tokenizer, chat template, processor and generation configs,
    config.json) into `out`; returns name -> sha256. A missing required file is a CheckpointError."""
    missing = [f for f in REQUIRED_FILES if not (ckpt / f).is_file()]
    if missing:
        raise CheckpointError(f"{ckpt}: {', '.join(missing)} missing; the runtime needs them (copy them from the "
                              "original Hugging Face repository)")
    out.mkdir(parents=True, exist_ok=True)
    copied = {}
    for name in COPIED_FILES:
        if (ckpt / name).is_file():
            shutil.copyfile(ckpt / name, out / name)
            copied[name] = sha256_file(out / name)
    return copied


def checkpoint_hashes(ckpt: Path) -> dict[str, str]:
    """sha256 of model.safetensors.index.json when sharded, else of each *.safetensors file."""
    index = ckpt / "model.safetensors.index.json"
    files = [index] if index.is_file() else sorted(ckpt.glob("*.safetensors"))
    return {f.name: sha256_file(f) for f in files}


def tool_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in _TOOLS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def write_manifest(ckpt: Path, out: Path, dtype: str, limits: Limits, engines: bool = False,
                   plugins: str | None = None, tp: int = 1) -> Path:
    """Write out/manifest.json (model/manifest.py) for graphs already exported to `out` (and engines when
    `engines`). `tp` > 1: the decoder is the rank graphs decoder.rank{r}.onnx (export/tp.py)."""
    dtype = DTYPE_ALIASES[dtype]
    limits.check()
    spec = ModelSpec.from_checkpoint(ckpt)
    graphs = {}
    for name in GRAPHS:
        if name == "decoder" and tp > 1:
            graphs[name] = _rank_graphs(ckpt, out, tp, engines)
            continue
        onnx_file = out / f"{name}.onnx"
        if not onnx_file.is_file():
            raise CheckpointError(f"{onnx_file} missing: export the graphs first (qwen-vl-export {ckpt} {out})")
        data = out / f"{name}.onnx.data"
        engine = out / f"{name}.engine"
        if engines and not engine.is_file():
            raise CheckpointError(f"{engine} missing: the engine build did not finish")
        graphs[name] = {"onnx": onnx_file.name, "onnx_data": data.name if data.is_file() else None,
                        "engine": engine.name if engines else None}
        graphs[name]["weights"] = graph_weights(onnx_file)
        ort_file = fused_path(onnx_file)
        if ort_file.is_file():  # ONNX Runtime's fused flavour (export/ort_fused.py)
            graphs[name]["onnx_ort"] = ort_file.name
            if nbits_data_path(ort_file).is_file():  # INT4 decoders: fused INT4 weights (bf16: all MatMulNBits weights)
                graphs[name]["onnx_ort_data"] = nbits_data_path(ort_file).name
    return save_manifest(out, spec, dtype, limits, graphs, plugins=plugins, tools=tool_versions(), tp=tp,
                          checkpoint={"name": ckpt.resolve().name, "sha256": checkpoint_hashes(ckpt)})


def _rank_graphs(ckpt: Path, out: Path, tp: int, engines: bool = False) -> dict:
    """The decoder entry of a TP export: "ranks" lists every rank's graph (and engine when `engines`);
    "onnx"/"onnx_data"/"engine" name rank 0's."""
    ranks = []
    for r in range(tp):
        onnx_file, data = out / f"decoder.rank{r}.onnx", out / f"decoder.rank{r}.onnx.data"
        engine = out / f"decoder.rank{r}.engine"
        if not onnx_file.is_file():
            raise CheckpointError(f"{onnx_file} missing: export the graphs first (qwen-vl-export {ckpt} {out} --tp {tp})")
        if engines and not engine.is_file():
            raise CheckpointError(f"{engine} missing: the engine build did not finish")
        ranks.append({"onnx": onnx_file.name, "onnx_data": data.name if data.is_file() else None,
                      "engine": engine.name if engines else None})
    return {**ranks[0], "weights": graph_weights(out / ranks[0]["onnx"]), "ranks": ranks}


def graph_weights(onnx_file: Path):
    """manifest.json's `weights` of a graph: its metadata's WeightFormats JSON (decoder, embed), "dense" for a graph
    without one (vision: always dense)."""
    meta = graph_metadata(onnx_file).get(METADATA_KEY)
    if meta is None:
        return "dense"
    try:
        return WeightFormats.from_json(json.loads(meta)).to_json()
    except ValueError:
        raise CheckpointError(f"{onnx_file}: metadata {METADATA_KEY} is not valid JSON: {meta[:80]!r}") from None


def graph_metadata(onnx_file: Path) -> dict:
    """The ONNX metadata_props of a graph file (its weights stay on disk)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(onnx_file), load_external_data=False).metadata_props}
