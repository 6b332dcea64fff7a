"""Tensor parallelism (export/tp.py, model/tp.py, runtime/backends/tp.py): rank graphs run as separate ranks on
ONNX Runtime (CPU, MPI all-reduces between processes) give HF's tokens.

Checkpoints: tiny Qwen3-VL shaped like the 32B (dense, 8 q heads / 4 KV heads: TP 2 and 4 split the KV heads as
the 32B's 64/8 are) and like the 235B-A22B (MoE, 8 q heads / 4 KV heads: TP 8 replicates each KV head on two
ranks, as the 235B's 64/4 at TP 8), intermediate sizes divisible by 8. References: HF `generate` greedy with EOS
off on HF's processor inputs (tests/test_generate.py `hf_generate`), token ids compared exactly (as there: the tiny
fp32 model's top logits are far apart, and the all-reduce only reorders fp32 sums, ~1e-7 relative; the ranks
generate N_TP tokens, compared with HF's first N_TP); the 1-rank
graph against today's decoder.onnx byte for byte; per-rank weight bytes against the checkpoint's tensor shapes
read from the safetensors header (not from our export).
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import hf_processor as H
from hf_reference import hf_model
from test_generate import N_NEW, hf_generate, media  # noqa: F401 (fixture)
from qwen_vl_trt.export.demo_checkpoint import QWEN3_VL_MOE_TINY, QWEN3_VL_TINY, make_checkpoint

SHAPES = {  # name -> (family, text_config): 8 q heads, 4 KV heads, widths divisible by 8
    "dense_32b": ("qwen3_vl", {**QWEN3_VL_TINY["text_config"], "num_attention_heads": 8, "num_key_value_heads": 4,
                               "intermediate_size": 40}),
    "moe_235b": ("qwen3_vl_moe", {**QWEN3_VL_MOE_TINY["text_config"], "num_attention_heads": 8,
                                  "num_key_value_heads": 4, "intermediate_size": 40}),
}
LIMITS = dict(max_batch=2, max_seq=512, max_cache_len=1024)
N_TP = 12  # tokens generated on the ranks, compared with HF's first N_TP greedy tokens (rank steps are slow on 2 cores)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return {name: make_checkpoint(tmp_path_factory.mktemp(name), family, seed=5,
                                  config_overrides={"text_config": text})
            for name, (family, text) in SHAPES.items()}


_exports: dict = {}


@pytest.fixture(scope="module")
def export(ckpts, tmp_path_factory):
    """export(shape, tp) -> an fp32 artifact directory (export_all, no engines), made once per module."""
    from qwen_vl_trt.export.export_all import export_all
    from qwen_vl_trt.model.contracts import Limits

    def make(shape: str, tp: int) -> Path:
        if (shape, tp) not in _exports:
            out = tmp_path_factory.mktemp(f"{shape}_tp{tp}")
            export_all(ckpts[shape], out, "fp32", Limits(**LIMITS), tp=tp)
            _exports[shape, tp] = out
        return _exports[shape, tp]

    return make


def cases(media):  # noqa: F811
    imgs, frames_dir = media["images"], str(media["frames_dir"])
    return {"image": ("Describe this image.", (str(imgs[0]),), None),
            "two_images": ("Compare them.", (str(imgs[0]), str(imgs[1])), None),
            "video": ("What happens?", (), frames_dir),
            "text": ("Write a haiku about GPUs.", (), None)}


_hf_cache: dict = {}


def hf_tokens(ckpt, media, names):  # noqa: F811
    """name -> HF's N_NEW greedy tokens for that case alone (HF model and results cached per checkpoint)."""
    key = str(ckpt)
    if key not in _hf_cache:
        _hf_cache[key] = {"model": hf_model(ckpt), "processor": H.qwen3_processor(ckpt), "tokens": {}}
    entry = _hf_cache[key]
    for name in names:
        if name not in entry["tokens"]:
            prompt, imgs, video = cases(media)[name]
            entry["tokens"][name] = hf_generate(entry["model"], entry["processor"], prompt, list(imgs),
                                                frames=media["frames"] if video else None)
    return {name: entry["tokens"][name] for name in names}


def ours(model, media, names):  # noqa: F811
    """name -> our N_TP greedy tokens (EOS ignored), each request alone through generate (trt-run's loop)."""
    from qwen_vl_trt.runtime.generate import generate
    from qwen_vl_trt.runtime.pipeline import Preprocessor
    from qwen_vl_trt.runtime.request import Request
    from qwen_vl_trt.runtime.sampling import Sampler, SamplingConfig

    pre = Preprocessor(model.manifest)
    out = {}
    for name in names:
        prompt, imgs, video = cases(media)[name]
        req = pre.prepare(Request(prompt, imgs, video))
        out[name] = generate(model, [req], Sampler(SamplingConfig(temperature=0)), N_TP, ignore_eos=True)[0].token_ids
    return out


# ---- graphs ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", list(SHAPES))
def test_one_rank_graph_is_todays_graph_byte_for_byte(ckpts, shape, tmp_path):
    from qwen_vl_trt.export.decoder import export_decoder
    from qwen_vl_trt.export.tp import TensorParallel
    from qwen_vl_trt.export.weights import CheckpointWeights
    from qwen_vl_trt.model.spec import ModelSpec

    spec, w = ModelSpec.from_checkpoint(ckpts[shape]), CheckpointWeights(ckpts[shape])
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = export_decoder(spec, w, tmp_path / "a", "float32")
    b = export_decoder(spec, w, tmp_path / "b", "float32", tp=TensorParallel(0, 1))
    assert a.name == b.name == "decoder.onnx"
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a/decoder.onnx.data").read_bytes() == (tmp_path / "b/decoder.onnx.data").read_bytes()


def test_rank_graphs_carry_dist_collective_all_reduces(export):
    """Per layer one all-reduce after o_proj and one after the MLP / MoE block, one for the logits; attributes as
    TensorRT's parser reads them, and the Identity function body (the 1-rank reference)."""
    d = export("moe_235b", 2)
    for r in range(2):
        m = onnx.load(str(d / f"decoder.rank{r}.onnx"), load_external_data=False)
        nodes = [n for n in m.graph.node if n.op_type == "DistCollective"]
        assert all(n.domain == "trt" for n in nodes)
        assert len(nodes) == 2 * SHAPES["moe_235b"][1]["num_hidden_layers"] + 1
        for n in nodes:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert attrs == {"collective_operation": b"all_reduce", "reduce_op": b"sum", "root": -1, "nb_rank": 2}
        (fn,) = [f for f in m.functions if f.name == "DistCollective"]
        assert fn.domain == "trt" and [x.op_type for x in fn.node] == ["Identity"]
        cache = [i for i in m.graph.input if i.name == "past_key.0"][0]
        assert [d.dim_value or d.dim_param for d in cache.type.tensor_type.shape.dim] == ["batch", 2, "cache_len", 32]
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["tp"] == 2 and [r["onnx"] for r in manifest["graphs"]["decoder"]["ranks"]] == \
        ["decoder.rank0.onnx", "decoder.rank1.onnx"]
    assert not (d / "decoder.onnx").exists()


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _expected_rank_bytes(ckpt: Path, tp: int) -> int:
    """Decoder weight bytes of one rank from the checkpoint's tensor shapes (fp32): the split tensors / tp, the
    k/v projections / min(tp, Hkv) (replicated beyond Hkv), everything else of the text model whole."""
    cfg = json.loads((ckpt / "config.json").read_text())["text_config"]
    total = 0
    for key, info in _header(ckpt / "model.safetensors").items():
        if not (key.startswith("model.language_model.") or key.startswith("lm_head.")):
            continue
        if key.endswith("embed_tokens.weight"):
            continue  # embed.onnx's (untied checkpoints: lm_head.weight is separate)
        n = int(np.prod(info["shape"])) * 4
        if any(p in key for p in ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "experts.", "lm_head")):
            total += n // tp
        elif any(p in key for p in ("k_proj", "v_proj")):
            total += n // min(tp, cfg["num_key_value_heads"])
        else:
            total += n
    return total


@pytest.mark.parametrize("shape,tp", [("dense_32b", 2), ("dense_32b", 4), ("moe_235b", 4), ("moe_235b", 8)])
def test_per_rank_weight_bytes_are_one_nth_of_the_split_parts(export, ckpts, shape, tp):
    d = export(shape, tp)
    want = _expected_rank_bytes(ckpts[shape], tp)
    for r in range(tp):
        m = onnx.load(str(d / f"decoder.rank{r}.onnx"), load_external_data=False)
        stored = sum(int({e.key: e.value for e in t.external_data}["length"]) for t in m.graph.initializer
                     if t.data_location == onnx.TensorProto.EXTERNAL)
        assert stored == want, (r, stored, want)


# ---- runs vs HF ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def open_model(export):
    """open_model(shape, tp) -> a loaded Model on the TP artifacts (rank processes started; idle ranks sleep), one
    per (shape, tp); all closed at the end."""
    from qwen_vl_trt.runtime.generate import load_model

    opened = {}

    def load(shape, tp):
        if (shape, tp) not in opened or opened[shape, tp].sessions["decoder"].closed:
            opened[shape, tp] = load_model(export(shape, tp), "onnxruntime")
        return opened[shape, tp]

    yield load
    for model in opened.values():
        model.sessions["decoder"].close()


@pytest.mark.parametrize("shape,tp", [("dense_32b", 2), ("dense_32b", 4), ("moe_235b", 2), ("moe_235b", 4)])
def test_tp_ranks_match_hf(open_model, ckpts, media, shape, tp):  # noqa: F811
    """Image, two images, video and text through the TP ranks == HF greedy."""
    model = open_model(shape, tp)
    assert type(model.sessions["decoder"]).__name__ == "TpDecoderSession" and model.manifest.tp == tp
    names = list(cases(media))
    assert ours(model, media, names) == {k: v[:N_TP] for k, v in hf_tokens(ckpts[shape], media, names).items()}


def test_tp8_replicated_kv_heads_match_hf(open_model, ckpts, media):  # noqa: F811
    """235B-shaped at TP 8: 4 KV heads on 8 ranks, each held by two (rank r holds head r*4//8)."""
    model = open_model("moe_235b", 8)
    assert model.sessions["decoder"].kv == [(0, 1), (0, 1), (1, 2), (1, 2), (2, 3), (2, 3), (3, 4), (3, 4)]
    want = hf_tokens(ckpts["moe_235b"], media, ["image", "text"])
    assert ours(model, media, ["image", "text"]) == {k: v[:N_TP] for k, v in want.items()}
    model.sessions["decoder"].close()


def test_trt_run_on_tp_artifacts_matches_hf(export, ckpts, media):  # noqa: F811
    """`trt-run --model-dir <tp2 artifacts>` as a user runs it (a child process that spawns its ranks)."""
    img = media["images"][0]
    r = subprocess.run([sys.executable, "-m", "qwen_vl_trt.runtime.serve.cli", "--model-dir",
                        str(export("dense_32b", 2)), "--image", str(img), "--json", "--temperature", "0",
                        "--ignore-eos", "--max-new-tokens", str(N_TP)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["token_ids"] == hf_tokens(ckpts["dense_32b"], media, ["image"])["image"][:N_TP]


def test_in_flight_batching_with_mixed_arrivals_matches_hf(open_model, ckpts, media):  # noqa: F811
    """The scheduler on the TP2 ranks: four requests arriving at different steps, prompts written in chunks (the
    numpy HostIO path continues a cache with S > 1), two ending early; each == HF's tokens for it alone."""
    from test_scheduler import drive

    from qwen_vl_trt.runtime.pipeline import Preprocessor
    from qwen_vl_trt.runtime.request import Request
    from qwen_vl_trt.runtime.sampling import SamplingConfig
    from qwen_vl_trt.runtime.scheduler import Engine, SeqRequest

    model = open_model("moe_235b", 2)
    names = ["video", "text", "image", "two_images"]
    limits = dict(zip(names, [N_TP, 5, N_TP, 7]))
    pre = Preprocessor(model.manifest)
    reqs = {n: SeqRequest(pre.prepare(Request(*cases(media)[n])), limits[n], SamplingConfig(temperature=0),
                          ignore_eos=True) for n in names}
    engine = Engine(model, prefill_budget=48)
    drive(engine, list(zip([0, 0, 3, 9], (reqs[n] for n in names))))
    want = hf_tokens(ckpts["moe_235b"], media, names)
    for n in names:
        assert reqs[n].token_ids == want[n][:limits[n]], n
        assert reqs[n].finish_reason == "length"
    assert engine.chunked


def test_server_on_tp_artifacts_matches_hf(export, ckpts, media):  # noqa: F811
    """The OpenAI server (in-flight batching worker) on TP2 artifacts: one image request == HF."""
    from test_server import hf_chat, image_chat, post, serving

    from qwen_vl_trt.runtime.serve.server import make_server, parser

    d = export("dense_32b", 2)
    srv = make_server(parser().parse_args(["--model-dir", str(d), "--port", "0", "--backend", "onnxruntime",
                                           "--served-model-name", "tiny-tp"]))
    messages = image_chat(media["images"][0])
    entry = _hf_cache.get(str(ckpts["dense_32b"])) or {}
    hf, processor = entry.get("model") or hf_model(ckpts["dense_32b"]), H.qwen3_processor(ckpts["dense_32b"])
    try:
        with serving(srv):
            status, body = post(srv, {"model": "tiny-tp", "messages": messages, "max_tokens": N_TP,
                                      "temperature": 0, "ignore_eos": True})
    finally:
        srv.model.sessions["decoder"].close()
    assert status == 200, body
    _, want = hf_chat(hf, processor, messages, [media["images"][0]])
    assert body["choices"][0]["message"]["content"] == processor.tokenizer.decode(want[:N_TP], skip_special_tokens=True)


def test_tensorrt_rtx_builds_each_rank_graph_with_dist_collective_layers(ckpts, tmp_path):
    """CI's TensorRT check: bf16 rank graphs of a TP 2 export parse into DIST_COLLECTIVE layers (2 per layer + 1,
    counted on the parsed network before the build) and build ahead of time (TensorRT-RTX, no GPU here: the engines
    are not run)."""
    from qwen_vl_trt.export.cli import export_graphs

    export_graphs(ckpts["dense_32b"], tmp_path, "bf16", graphs=("decoder",), tp=2)
    layers = SHAPES["dense_32b"][1]["num_hidden_layers"]
    build_rank_engines_with_collectives(tmp_path, ckpts["dense_32b"], 2 * layers + 1,
                                        ("--max-batch", "2", "--max-seq", "256", "--max-cache-len", "512"))


def build_rank_engines_with_collectives(out, ckpt, collectives: int, limits: tuple, tp: int = 2) -> None:
    """TensorRT-RTX (build_engines, SM89, bf16) builds out/decoder.rank{r}.engine for every rank; each parsed
    network held `collectives` DIST_COLLECTIVE layers (build_engines logs the count before the build)."""
    import re

    from qwen_vl_trt.model.trt_compat import rtx_env

    (out / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    graphs = ",".join(f"decoder.rank{r}" for r in range(tp))
    r = subprocess.run([sys.executable, "-m", "qwen_vl_trt.export.build_engines", str(out), "--dtype", "bfloat16",
                        *limits, "--compute-capabilities", "8.9", "--graphs", graphs],
                       capture_output=True, text=True, env=rtx_env(), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in range(tp):
        assert re.search(rf"decoder\.rank{rank}\.onnx: {collectives} DIST_COLLECTIVE layers parsed", r.stderr), \
            r.stderr[-2000:]
        assert (out / f"decoder.rank{rank}.engine").read_bytes()[:4] in (b"vtrt", b"ftrt")


# ---- refusals ------------------------------------------------------------------------------------------------------
def test_a_split_that_does_not_divide_is_one_error_line(qwen3_vl_ckpt, tmp_path, capsys):
    """The stock tiny Qwen3-VL has 4 query heads and an MLP of 37: --tp 8 cannot split them (its 2 KV heads could be
    replicated)."""
    from qwen_vl_trt.export.export_all import main

    assert main([str(qwen3_vl_ckpt), str(tmp_path / "out"), "--dtype", "fp32", "--no-engines", "--tp", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: --tp 8: qwen3_vl cannot be split evenly over 8 ranks: 4 attention heads, "
                       "intermediate_size 37 not divisible by 8")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_manifests_old_and_inconsistent(export, tmp_path, monkeypatch):
    from qwen_vl_trt.model.errors import ArtifactError
    from qwen_vl_trt.model.manifest import load_manifest
    from qwen_vl_trt.runtime.backends import loader
    from qwen_vl_trt.runtime.generate import load_model

    one = export("dense_32b", 1)
    raw = json.loads((one / "manifest.json").read_text())
    assert raw["tp"] == 1 and "ranks" not in raw["graphs"]["decoder"]
    del raw["tp"]  # a manifest written before tensor parallelism
    (one / "manifest.json").write_text(json.dumps(raw))
    assert load_manifest(one).tp == 1 and load_manifest(one).rank_paths() == []

    two = export("dense_32b", 2)
    monkeypatch.setattr(loader, "tensorrt_available", lambda: (True, ""))  # as on a GPU machine with TensorRT
    with pytest.raises(ArtifactError, match="has no TensorRT engines"):  # rank graphs exported without engines
        load_model(two, "tensorrt")
    monkeypatch.undo()
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in two.iterdir():
        (bad / f.name).symlink_to(f)
    raw = json.loads((two / "manifest.json").read_text())
    raw["tp"] = 4
    (bad / "manifest.json").unlink()
    (bad / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="tp 4 does not match its 2 decoder rank graphs"):
        load_manifest(bad)


def test_tp_generation_imports_no_torch(export):
    """trt-run on TP artifacts with torch and transformers refused at import (tests/test_runtime_no_torch.py's
    blocker): the rank sessions' custom-op library is loaded without onnxruntime-extensions' __init__, which would
    import transformers."""
    from test_runtime_no_torch import BLOCKER

    r = subprocess.run([sys.executable, "-c", BLOCKER, "--model-dir", str(export("dense_32b", 2)), "--prompt", "Hi",
                        "--json", "--temperature", "0", "--ignore-eos", "--max-new-tokens", "3"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stderr.strip().splitlines()[-1])
    assert report["rc"] == 0 and report["attempts"] == []
    assert "qwen_vl_trt.runtime.backends.tp" in report["modules"]
    assert len(json.loads(r.stdout)["token_ids"]) == 3


def test_qwen2_5_vl_with_qkv_bias_at_tp2_matches_hf(media, tmp_path):  # noqa: F811
    """Qwen2.5-VL's q/k/v biases are cut with their heads: one and two images at TP 2 (2 q heads and 1 KV head per
    rank) == HF greedy. (Text-only is left out: on this checkpoint our 1-rank runtime, every ONNX Runtime flavour,
    already leaves HF's tokens at the second token, so it would not test the split.)"""
    from test_generate import hf_generate as hf_greedy

    from qwen_vl_trt.export.export_all import export_all
    from qwen_vl_trt.model.contracts import Limits
    from qwen_vl_trt.runtime.generate import load_model

    ckpt = make_checkpoint(tmp_path / "ckpt", "qwen2_5_vl", seed=6, config_overrides={"intermediate_size": 40})
    export_all(ckpt, tmp_path / "tp2", "fp32", Limits(**LIMITS), tp=2)
    model = load_model(tmp_path / "tp2", "onnxruntime")
    try:
        got = ours(model, media, ["image", "two_images"])
    finally:
        model.sessions["decoder"].close()
    hf, processor = hf_model(ckpt), H.qwen2_5_processor(ckpt)
    for name in ("image", "two_images"):
        prompt, imgs, _ = cases(media)[name]
        assert got[name] == hf_greedy(hf, processor, prompt, list(imgs))[:N_TP], name


# ---- TensorRT side: NCCL without torch (runtime/backends/nccl.py); engines with collectives need GPUs ------------
def test_nccl_from_the_wheel_loads_and_reports_its_pinned_version():
    from qwen_vl_trt.runtime.backends.nccl import Nccl

    pinned = next(line.split("==")[1] for line in (Path(__file__).parents[1] / "scripts/constraints.txt").read_text()
                  .splitlines() if line.startswith("nvidia-nccl-cu13=="))
    assert Nccl().version() == pinned


def test_nccl_communicators_without_a_gpu_are_one_error_line():
    from qwen_vl_trt.model.errors import BackendUnavailable
    from qwen_vl_trt.runtime.backends.nccl import Nccl

    with pytest.raises(BackendUnavailable, match=r"^ncclCommInitAll over devices \[0\]: unhandled cuda error") as e:
        Nccl().comm_init_all([0])  # this machine has no GPU (the GPU machines would return a communicator)
    assert "\n" not in str(e.value)


def test_set_communicator_is_called_on_every_rank_at_once():
    """A fake context whose set_communicator waits for all ranks (as TensorRT's collective call does): called one
    after another it would never return."""
    import threading

    from qwen_vl_trt.model.errors import BackendUnavailable
    from qwen_vl_trt.runtime.backends.nccl import set_communicators

    class Context:
        barrier = threading.Barrier(4, timeout=10)

        def __init__(self):
            self.comm = None

        def set_communicator(self, comm):
            self.barrier.wait()
            self.comm = comm
            return True

    contexts = [Context() for _ in range(4)]
    set_communicators(contexts, [101, 102, 103, 104])
    from trt_fakes import capsule_pointer  # the binding takes the ncclComm_t in a PyCapsule

    assert [capsule_pointer(c.comm) for c in contexts] == [101, 102, 103, 104]

    class Refusing(Context):
        def set_communicator(self, comm):
            return False

    with pytest.raises(BackendUnavailable, match="setCommunicator failed on rank 0"):
        set_communicators([Refusing()], [1])


def test_reexport_with_fewer_ranks_leaves_no_stale_rank_graphs(export, ckpts, tmp_path):
    import shutil

    from qwen_vl_trt.export.export_all import export_all
    from qwen_vl_trt.model.contracts import Limits
    from qwen_vl_trt.model.manifest import load_manifest

    out = tmp_path / "art"
    shutil.copytree(export("dense_32b", 4), out)
    export_all(ckpts["dense_32b"], out, "fp32", Limits(**LIMITS), tp=2)
    assert sorted(p.name for p in out.glob("decoder.rank*")) == [
        "decoder.rank0.onnx", "decoder.rank0.onnx.data", "decoder.rank1.onnx", "decoder.rank1.onnx.data"]
    assert load_manifest(out).tp == 2
