"""ARTIFACTS_DIR/manifest.json: what an export produced, written once and verified before anything runs.

Written by `save_manifest` (called by export/artifacts.py). Fields (format version 1):

| key | meaning |
|---|---|
| `format`, `format_version` | "qwen-vl-trt-artifacts", 1 |
| `model_type`, `model_spec` | `ModelSpec.to_json()` of the checkpoint (must equal the spec of the copied config.json) |
| `dtype` | export dtype of the graphs: float32 / float16 / bfloat16 (logits always float32) |
| `graphs` | name -> {"onnx", "onnx_data", "engine" (null without TensorRT), "weights" (decoder, embed: `WeightFormats.to_json()` of the export's `--weights`, model/weight_formats.py: {"attention", "mlp", "experts", "lm_head", "embedding": dense/fp8/int4/int8, "int4_block", "int4_activations": fp32/int8}; vision: "dense"; manifests of older exports: a string, read by `WeightFormats.from_json`)}; vision and decoder also "onnx_ort" (`<graph>.ort.onnx`, ONNX Runtime's fused flavour reading the same `.onnx.data`) when the export wrote it, and an INT4 decoder "onnx_ort_data" (`decoder.ort.onnx.data`: its fused q|k|v and gate|up INT4 weights, export/int4.py `fuse_int4_products`; in bf16 all its MatMulNBits weights) |
| `contracts` | name -> {"inputs"/"outputs": [[name, dtype, dims], ...]}, model/contracts.py resolved to `dtype` |
| `limits` | max_patches, max_frames (per vision call), max_batch, max_seq, max_cache_len |
| `files` | copied tokenizer/processor/config files -> sha256 |
| `checkpoint` | source directory name and sha256 of its safetensors index or files |
| `tools`, `plugins` | versions used; plugin library and op version when engines use plugins |
| `tp` | tensor-parallel ranks of the decoder (absent in older manifests: 1); > 1: `graphs.decoder.ranks` lists each rank's {"onnx", "onnx_data", "engine"} (`decoder.rank{r}.onnx`, export/tp.py; `decoder.rank{r}.engine` when TensorRT built them, else null) and `graphs.decoder.onnx` / `engine` name rank 0's; the decoder contract is the whole model's (the ranks' KV caches hold their own heads: runtime/backends/tp.py on ONNX Runtime, trt_tp.py on TensorRT) |

`load_manifest(dir)` refuses, with one ArtifactError line, a missing or foreign manifest, another format
version, a missing or modified file, a spec from another model, and contracts that differ from this
runtime's (the graphs are then checked against these contracts when the sessions load).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .contracts import CONTRACTS, GraphSpec, Limits, TensorSpec
from .errors import ArtifactError, CheckpointError, UserError
from .spec import ModelSpec
from .weight_formats import WeightFormats

FORMAT = "qwen-vl-trt-artifacts"
FORMAT_VERSION = 1
GRAPHS = ("vision", "embed", "decoder")
LIMIT_KEYS = ("max_patches", "max_frames", "max_batch", "max_seq", "max_cache_len")
# copied from the checkpoint when present; the first three are required
COPIED_FILES = ("config.json", "tokenizer.json", "generation_config.json", "tokenizer_config.json",
                "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                "video_preprocessor_config.json")
REQUIRED_FILES = ("config.json", "tokenizer.json", "generation_config.json", "preprocessor_config.json")
_REEXPORT = "re-run export_all.sh for this checkpoint"


def contract_to_json(contract: GraphSpec) -> dict:
    return {"inputs": [[t.name, t.dtype, list(t.dims)] for t in contract.inputs],
            "outputs": [[t.name, t.dtype, list(t.dims)] for t in contract.outputs]}


def contract_from_json(name: str, data: dict) -> GraphSpec:
    def specs(rows):
        return tuple(TensorSpec(n, dt, tuple(dims)) for n, dt, dims in rows)

    return GraphSpec(name, specs(data["inputs"]), specs(data["outputs"]))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(obj) -> str:
    return json.dumps(json.loads(json.dumps(obj)), sort_keys=True)


@dataclass(frozen=True)
class Manifest:
    directory: Path
    spec: ModelSpec
    dtype: str
    contracts: dict
    limits: Limits
    graphs: dict
    generation_config: dict = field(default_factory=dict)
    plugins: dict | None = None
    tp: int = 1  # tensor-parallel ranks of the decoder

    def rank_paths(self) -> list[Path]:
        """The decoder's rank graphs decoder.rank{r}.onnx, rank order ([] for a 1-rank export)."""
        return [self.directory / r["onnx"] for r in self.graphs["decoder"].get("ranks", [])] if self.tp > 1 else []

    def rank_engine_paths(self) -> list[Path]:
        """The decoder ranks' TensorRT engines decoder.rank{r}.engine, rank order ([] when not built or tp 1)."""
        ranks = self.graphs["decoder"].get("ranks", []) if self.tp > 1 else []
        if not ranks or not all(r.get("engine") for r in ranks):
            return []
        return [self.directory / r["engine"] for r in ranks]

    def graph_paths(self, fused: bool = False) -> dict:
        """name -> ONNX file; with `fused` vision.ort.onnx / decoder.ort.onnx where the export wrote them (ONNX
        Runtime's contrib ops: export/ort_fused.py)."""
        key = lambda name: "onnx_ort" if fused and self.graphs[name].get("onnx_ort") else "onnx"  # noqa: E731
        return {name: self.directory / self.graphs[name][key(name)] for name in GRAPHS}

    def weight_formats(self) -> WeightFormats:
        """The decoder's weight formats (`graphs.decoder.weights`); an unreadable entry is an ArtifactError."""
        try:
            return WeightFormats.from_json(self.graphs["decoder"].get("weights"))
        except (UserError, TypeError) as e:
            raise ArtifactError(f"{self.directory}/manifest.json: graphs.decoder.weights: {e}") from None

    def engine_paths(self) -> dict:
        """name -> engine path when all three engines were built, else {}."""
        files = {name: self.graphs[name].get("engine") for name in GRAPHS}
        if not all(files.values()):
            return {}
        return {name: self.directory / f for name, f in files.items()}

    def plugin_library(self) -> Path | None:
        lib = (self.plugins or {}).get("library")
        return None if not lib else Path(lib)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.generation_config.get("eos_token_id")
        return tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))

    @property
    def pad_token_id(self) -> int:
        pad = self.generation_config.get("pad_token_id")
        return int(pad) if pad is not None else (self.eos_token_ids or (0,))[0]


def save_manifest(out: Path, spec: ModelSpec, dtype: str, limits: Limits, graphs: dict, *, checkpoint: dict,
                  tools: dict, plugins: str | None = None, tp: int = 1) -> Path:
    """Write out/manifest.json for artifacts already in `out`: `graphs` name -> file entries (table above),
    `checkpoint` {"name", "sha256"}; the copied files are hashed here. Returns its path."""
    limits.check()
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model_type": spec.model_type, "model_spec": spec.to_json(), "dtype": dtype,
        "graphs": graphs,
        "contracts": {name: contract_to_json(CONTRACTS[name](spec).resolve(dtype)) for name in GRAPHS},
        "limits": asdict(limits),
        "files": {f: sha256_file(out / f) for f in COPIED_FILES if (out / f).is_file()},
        "checkpoint": checkpoint,
        "tools": tools,
        "plugins": {"library": str(Path(plugins).resolve()), "namespace": "qwen_vl", "version": "1"} if plugins else None,
        "tp": tp,
    }
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def load_manifest(directory: str | Path) -> Manifest:
    d = Path(directory)
    raw = _read(d)
    _check_files(d, raw)
    try:
        spec = ModelSpec.from_checkpoint(d)
    except CheckpointError as e:
        raise ArtifactError(f"{e}; {_REEXPORT}") from None
    if _canonical(spec.to_json()) != _canonical(raw["model_spec"]):
        raise ArtifactError(f"{d}/manifest.json describes another model than {d}/config.json "
                            f"({raw.get('model_type')!r}); {_REEXPORT}")
    dtype = raw["dtype"]
    contracts = {}
    for name in GRAPHS:
        contracts[name] = contract_from_json(name, raw["contracts"][name])
        ours = CONTRACTS[name](spec).resolve(dtype)
        if contract_to_json(contracts[name]) != contract_to_json(ours):
            raise ArtifactError(f"{d}/manifest.json: the {name} graph contract differs from this runtime's "
                                f"(model/contracts.py changed since the export); {_REEXPORT}")
    gen = json.loads((d / "generation_config.json").read_text())
    return Manifest(d, spec, dtype, contracts, Limits(**{k: int(raw["limits"][k]) for k in LIMIT_KEYS}),
                    raw["graphs"], gen, raw.get("plugins"), _tp(raw, path=d / "manifest.json"))


def _tp(raw: dict, path: Path) -> int:
    """The manifest's tp (1 when absent: manifests written before tensor parallelism); > 1 needs one rank graph
    per rank."""
    tp = raw.get("tp", 1)
    ranks = raw["graphs"]["decoder"].get("ranks")
    if not isinstance(tp, int) or tp < 1 or (tp > 1 and (not isinstance(ranks, list) or len(ranks) != tp)):
        raise ArtifactError(f"{path}: tp {tp!r} does not match its {len(ranks or [])} decoder rank graphs; {_REEXPORT}")
    return tp


def _read(d: Path) -> dict:
    path = d / "manifest.json"
    if not d.is_dir():
        raise ArtifactError(f"artifacts directory not found: {d}; run export_all.sh CHECKPOINT {d} first")
    if not path.is_file():
        raise ArtifactError(f"{path} not found: {d} holds no exported artifacts; run export_all.sh CHECKPOINT {d}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); {_REEXPORT}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a qwen-vl-trt manifest; {_REEXPORT}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has format version {raw.get('format_version')!r}, this runtime reads "
                            f"version {FORMAT_VERSION}; {_REEXPORT}")
    missing = [k for k in ("model_spec", "dtype", "graphs", "contracts", "limits", "files") if k not in raw]
    missing += [f"limits.{k}" for k in LIMIT_KEYS if k not in raw.get("limits", {})]
    missing += [f"graphs.{g}" for g in GRAPHS if g not in raw.get("graphs", {}) or g not in raw.get("contracts", {})]
    if missing:
        raise ArtifactError(f"{path} lacks {', '.join(missing)}; {_REEXPORT}")
    return raw


def _check_files(d: Path, raw: dict) -> None:
    needed = [f for g in GRAPHS for f in (raw["graphs"][g].get("onnx"), raw["graphs"][g].get("onnx_data"),
                                          raw["graphs"][g].get("onnx_ort"), raw["graphs"][g].get("onnx_ort_data"),
                                          raw["graphs"][g].get("engine")) if f]
    needed += [f for r in raw["graphs"]["decoder"].get("ranks") or [] if isinstance(r, dict)
               for f in (r.get("onnx"), r.get("onnx_data"), r.get("engine")) if f]
    needed += [f for f in REQUIRED_FILES if f not in raw["files"]] + list(raw["files"])
    for name in needed:
        if not (d / name).is_file():
            raise ArtifactError(f"{d / name} is missing; {_REEXPORT}")
    for name, digest in raw["files"].items():
        if sha256_file(d / name) != digest:
            raise ArtifactError(f"{d / name} was changed after the export (sha256 differs from manifest.json); "
                                f"{_REEXPORT}")
