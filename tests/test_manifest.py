"""manifest.json: what export/artifacts.py writes, and each artifact mismatch the runtime refuses (exact text).

Refusals covered: missing directory / manifest, not a manifest, another format version, a missing or
modified copied file, a missing graph, a manifest of another model, contracts that differ from the
runtime's, and a graph whose I/O differs from its contract (an fp16 embed.onnx dropped into fp32 artifacts).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qwen_vl_trt.export.export_all import export_all
from qwen_vl_trt.model.contracts import Limits
from qwen_vl_trt.export.cli import export_graphs
from qwen_vl_trt.model.errors import ArtifactError
from qwen_vl_trt.runtime.backends.kv_cache import KVCache
from qwen_vl_trt.model.manifest import FORMAT, load_manifest
from qwen_vl_trt.model.weight_formats import WeightFormats
from qwen_vl_trt.runtime.backends.loader import open_sessions

LIMITS = Limits(max_patches=4096, max_frames=16, max_batch=2, max_seq=256, max_cache_len=512)
REEXPORT = "re-run export_all.sh for this checkpoint"


@pytest.fixture(scope="module")
def artifacts(qwen3_vl_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("manifest_artifacts")
    export_all(qwen3_vl_ckpt, out, "fp32", LIMITS)
    return out


def clone(src: Path, dst: Path) -> Path:
    """A copy whose graph files are symlinks (cheap) and whose small files are real copies (mutable)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix in (".onnx", ".data"):
            (dst / f.name).symlink_to(f)
        elif f.is_file():
            shutil.copyfile(f, dst / f.name)
    return dst


def edit_manifest(d: Path, fn) -> None:
    raw = json.loads((d / "manifest.json").read_text())
    fn(raw)
    (d / "manifest.json").write_text(json.dumps(raw))


def test_manifest_content(artifacts, qwen3_vl_ckpt):
    raw = json.loads((artifacts / "manifest.json").read_text())
    assert raw["format"] == FORMAT and raw["format_version"] == 1
    assert raw["model_type"] == "qwen3_vl" and raw["dtype"] == "float32"
    assert raw["limits"] == {"max_patches": 4096, "max_frames": 16, "max_batch": 2, "max_seq": 256,
                             "max_cache_len": 512}
    assert raw["graphs"]["decoder"] == {"onnx": "decoder.onnx", "onnx_data": "decoder.onnx.data", "engine": None,
                                        "onnx_ort": "decoder.ort.onnx", "weights": WeightFormats().to_json()}
    assert raw["graphs"]["vision"] == {"onnx": "vision.onnx", "onnx_data": "vision.onnx.data", "engine": None,
                                       "onnx_ort": "vision.ort.onnx", "weights": "dense"}
    assert raw["graphs"]["embed"] == {"onnx": "embed.onnx", "onnx_data": "embed.onnx.data", "engine": None,
                                      "weights": WeightFormats().to_json()}
    weights = (qwen3_vl_ckpt / "model.safetensors").read_bytes()
    assert raw["checkpoint"]["sha256"] == {"model.safetensors": hashlib.sha256(weights).hexdigest()}
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                 "video_preprocessor_config.json", "generation_config.json", "config.json"):
        assert raw["files"][name] == hashlib.sha256((artifacts / name).read_bytes()).hexdigest()
    assert ["past_key.3", "float32", ["batch", 2, "cache_len", 32]] in raw["contracts"]["decoder"]["inputs"]
    assert "onnx" in raw["tools"] and "transformers" in raw["tools"]
    m = load_manifest(artifacts)
    assert m.eos_token_ids == (151645, 151643) and m.pad_token_id == 151643
    assert m.engine_paths() == {} and m.limits.max_seq == 256
    assert m.weight_formats() == WeightFormats()


def test_sessions_load_and_no_engines_means_onnxruntime(artifacts):
    backend, sessions = open_sessions(load_manifest(artifacts), "auto")
    assert backend == "onnxruntime" and set(sessions) == {"vision", "embed", "decoder"}


def _refused(d: Path, message: str, sessions: bool = False) -> None:
    with pytest.raises(ArtifactError) as e:
        m = load_manifest(d)
        if sessions:
            open_sessions(m, "onnxruntime")
    assert str(e.value) == message
    assert "\n" not in str(e.value)


def test_missing_directory_and_manifest(tmp_path):
    _refused(tmp_path / "nope", f"artifacts directory not found: {tmp_path / 'nope'}; run export_all.sh CHECKPOINT "
                                f"{tmp_path / 'nope'} first")
    _refused(tmp_path, f"{tmp_path / 'manifest.json'} not found: {tmp_path} holds no exported artifacts; run "
                       f"export_all.sh CHECKPOINT {tmp_path}")
    (tmp_path / "manifest.json").write_text("{nope")
    _refused(tmp_path, f"{tmp_path / 'manifest.json'} is not valid JSON (Expecting property name enclosed in double "
                       f"quotes: line 1 column 2 (char 1)); {REEXPORT}")
    (tmp_path / "manifest.json").write_text('{"format": "something-else"}')
    _refused(tmp_path, f"{tmp_path / 'manifest.json'} is not a qwen-vl-trt manifest; {REEXPORT}")


def test_other_format_version(artifacts, tmp_path):
    d = clone(artifacts, tmp_path / "a")
    edit_manifest(d, lambda raw: raw.update(format_version=2))
    _refused(d, f"{d / 'manifest.json'} has format version 2, this runtime reads version 1; {REEXPORT}")


def test_missing_and_modified_files(artifacts, tmp_path):
    d = clone(artifacts, tmp_path / "a")
    (d / "tokenizer.json").unlink()
    _refused(d, f"{d / 'tokenizer.json'} is missing; {REEXPORT}")
    d = clone(artifacts, tmp_path / "b")
    (d / "decoder.onnx.data").unlink()
    _refused(d, f"{d / 'decoder.onnx.data'} is missing; {REEXPORT}")
    d = clone(artifacts, tmp_path / "b2")
    (d / "decoder.ort.onnx").unlink()
    _refused(d, f"{d / 'decoder.ort.onnx'} is missing; {REEXPORT}")
    d = clone(artifacts, tmp_path / "c")
    (d / "generation_config.json").write_text('{"eos_token_id": 1}')
    _refused(d, f"{d / 'generation_config.json'} was changed after the export (sha256 differs from manifest.json); "
                f"{REEXPORT}")


def test_manifest_of_another_model(artifacts, tmp_path):
    d = clone(artifacts, tmp_path / "a")
    edit_manifest(d, lambda raw: raw["model_spec"]["text"].update(num_hidden_layers=28))
    _refused(d, f"{d}/manifest.json describes another model than {d}/config.json ('qwen3_vl'); {REEXPORT}")


def test_contract_drift(artifacts, tmp_path):
    d = clone(artifacts, tmp_path / "a")
    edit_manifest(d, lambda raw: raw["contracts"]["embed"]["inputs"].pop())
    _refused(d, f"{d}/manifest.json: the embed graph contract differs from this runtime's (model/contracts.py "
                f"changed since the export); {REEXPORT}")


def test_graph_io_differs_from_contract(artifacts, qwen3_vl_ckpt, tmp_path):
    """An fp16 embed.onnx among fp32 artifacts: the session check names the tensors."""
    d = clone(artifacts, tmp_path / "a")
    export_graphs(qwen3_vl_ckpt, tmp_path / "fp16", "fp16", graphs=("embed",))
    for f in ("embed.onnx", "embed.onnx.data"):
        (d / f).unlink()
        shutil.copyfile(tmp_path / "fp16" / f, d / f)
    _refused(d, f"{d / 'embed.onnx'} does not match the manifest contract of the embed graph: input vision_features "
                "is float16 rank 2, contract says float32 rank 2; input deepstack_features is float16 rank 3, "
                "contract says float32 rank 3; output inputs_embeds is float16 rank 3, contract says float32 rank 3 "
                "(+1 more); re-run export_all.sh for these artifacts", sessions=True)


def test_kv_cache_update_swaps_without_copy():
    cache = KVCache(num_layers=2, batch=2, num_kv_heads=2, cache_len=16, head_dim=4, dtype="bfloat16")
    assert cache.buffers["past_key.1"].shape == (2, 2, 16, 4) and str(cache.buffers["past_key.1"].dtype) == "bfloat16"
    present = {f"present_{kind}.{i}": np.ones((2, 2, 16, 4), np.float32) for kind in ("key", "value") for i in range(2)}
    cache.update(present, np.array([5, 3]))
    assert cache.buffers["past_value.0"] is present["present_value.0"]
    assert cache.past_lengths.tolist() == [5, 3]
    cache.update(present, 1)
    assert cache.feeds()["past_lengths"].tolist() == [6, 4] and cache.fits(10) and not cache.fits(11)


def test_auto_backend_falls_back_to_onnxruntime_when_engines_cannot_run(artifacts, qwen3_vl_ckpt, tmp_path,
                                                                        monkeypatch):
    """Engines listed in the manifest, but no TensorRT runtime/GPU to run them: auto -> ORT, tensorrt -> error."""
    from qwen_vl_trt.export.artifacts import write_manifest
    from qwen_vl_trt.runtime.backends import loader as session
    from qwen_vl_trt.model.errors import BackendUnavailable

    d = clone(artifacts, tmp_path / "a")
    for name in ("vision", "embed", "decoder"):
        (d / f"{name}.engine").write_bytes(b"not run in this test")
    write_manifest(qwen3_vl_ckpt, d, "fp32", LIMITS, engines=True)
    m = load_manifest(d)
    assert set(m.engine_paths()) == {"vision", "embed", "decoder"}
    monkeypatch.setattr(session, "tensorrt_available", lambda: (False, "no CUDA GPU is visible"))
    assert session.open_sessions(m, "auto")[0] == "onnxruntime"
    with pytest.raises(BackendUnavailable) as e:
        session.open_sessions(m, "tensorrt")
    assert str(e.value) == "--backend tensorrt: no CUDA GPU is visible; use --backend onnxruntime"
    (d / "embed.engine").unlink()
    _refused(d, f"{d / 'embed.engine'} is missing; {REEXPORT}")
