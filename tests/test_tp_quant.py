"""Tensor parallelism composed with the quantized weight formats (export/tp.py RankWeights, `slice_blocks`,
`check_formats`; model/weight_formats.py): each rank holds exactly its slice of what the 1-rank export stores.

Checkpoints (tiny, fp32 graphs): a dense Qwen3-VL shaped like the 32B (8 q heads / 4 KV heads, MLP 64) exported
with `--weights int4` (attention, MLP and lm_head INT4, block 16: every per-rank K at TP 2 and 4 is a whole number
of blocks), and a Qwen3-VL-MoE shaped like the 235B-A22B (8 q heads / 4 KV heads: TP 8 replicates them; experts'
intermediate 128) in Qwen's FP8 format with 64x64 blocks, so TP 4 and 8 cut blocks in the middle (the 235B at TP 8
cuts its 128-blocks at 1536/8 = 192): k/v rows at 32 of 64, experts' down rows at 32 and 16, dense MLP rows at 16.

References, independent of the exporter: the rank slices are taken with the split written out here (heads,
vocabulary and intermediate ranges, HF's GQA layout), the dequantized values are numpy's q * s from the stored
initializers, the per-rank bytes come from the checkpoint's safetensors header shapes and the formats'
definitions, and HF `generate` runs on weights dequantized by tests/test_moe_quant.py's numpy RTN (`ref_int4`).
Comparisons of dequantized weights are bit-exact (`assert_array_equal`): the slice must be the same numbers, not
close ones. Tokens are compared exactly, as tests/test_tp.py does (the all-reduce only reorders fp32 sums).
"""
from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

import hf_processor as H
import test_generate
from hf_reference import hf_model
from test_generate import hf_generate, media  # noqa: F401 (fixture)
from test_moe_quant import ref_int4
from test_tp import LIMITS, _header, build_rank_engines_with_collectives, cases
from qwen_vl_trt.export.demo_checkpoint import QWEN3_VL_MOE_TINY, QWEN3_VL_TINY, make_checkpoint
from qwen_vl_trt.model.weight_formats import WeightFormats

BLOCK = 16  # INT4 block: divides every per-rank K of both models at the TP sizes tested
FP8_CKPT_BLOCK = 64
N_Q = 8  # tokens compared per request (rank steps are slow on 2 cores)
LOGPROB_ATOL = 1e-4  # fp32, the all-reduce reorders sums: TP 2 vs TP 1 measured 1e-6 (dense 32B-shaped, text); the
# same model's dense vs INT4 weights differ by 0.2, so a rank holding other weights than its slice is caught
CASES = ("image",)  # an image request: vision + text positions; tests/test_tp.py runs every modality on dense ranks
TEXT = {"num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 64}
FORMATS = {"int4": WeightFormats.parse("int4", BLOCK),
           "fp8": WeightFormats.parse("fp8", BLOCK),
           "fp8_attention_int4_experts": WeightFormats.parse("attention=fp8,experts=int4", BLOCK)}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from test_fp8_checkpoints import _fp8_checkpoint

    dense = make_checkpoint(tmp_path_factory.mktemp("dense32b"), "qwen3_vl", seed=7,
                            config_overrides={"text_config": {**QWEN3_VL_TINY["text_config"], **TEXT}})
    moe = make_checkpoint(tmp_path_factory.mktemp("moe235b"), "qwen3_vl_moe", seed=8, config_overrides={
        "text_config": {**QWEN3_VL_MOE_TINY["text_config"], **TEXT, "moe_intermediate_size": 128}})
    root = tmp_path_factory.mktemp("fp8")
    return {"dense": dense, "moe_fp8": _fp8_checkpoint(moe, root / "ckpt", block=FP8_CKPT_BLOCK),
            # the same FP8 checkpoint with its experts as HF's Fp8Dequantize makes them (HF cannot read FP8 fused
            # experts): the HF reference's starting point
            "moe_fp8_hf": _fp8_checkpoint(moe, root / "hf", block=FP8_CKPT_BLOCK, experts_dequantized_by_hf=True)}


_decoders: dict = {}


@pytest.fixture(scope="module")
def decoders(ckpts, tmp_path_factory):
    """decoders(ckpt, formats, tp) -> the directory of an fp32 decoder-only export (made once)."""
    from qwen_vl_trt.export.cli import export_graphs

    def make(ckpt, fmt, tp):
        if (ckpt, fmt, tp) not in _decoders:
            out = tmp_path_factory.mktemp(f"{ckpt}_{fmt}_tp{tp}")
            export_graphs(ckpts[ckpt], out, "fp32", graphs=("decoder",), formats=FORMATS[fmt], tp=tp)
            _decoders[ckpt, fmt, tp] = out
        return _decoders[ckpt, fmt, tp]

    return make


# ---- what a graph stores, dequantized with numpy ----------------------------------------------------------------
def _array(t: onnx.TensorProto) -> np.ndarray:
    if t.data_type == TensorProto.FLOAT8E4M3FN:
        return np.frombuffer(t.raw_data, ml_dtypes.float8_e4m3fn).reshape(tuple(t.dims)).astype(np.float32)
    return numpy_helper.to_array(t).astype(np.float32)


def _dequantize(q: np.ndarray, s: np.ndarray, axis: int, block: int | None) -> np.ndarray:
    if block is None:  # per-axis (INT8 lm_head: one scale per output column)
        return q * np.expand_dims(s, tuple(i for i in range(q.ndim) if i != axis))
    return q * np.take(np.repeat(s, block, axis=axis), np.arange(q.shape[axis]), axis=axis)


def quantized_weights(path) -> dict:
    """{quantized initializer name: (float32 q * s, block along K)} of a decoder graph: every DequantizeLinear of an
    initializer and every MoEExperts node's stacked experts (axis 1, blocks from its attributes)."""
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            pairs = [(n.input[0], n.input[1], attrs.get("axis", 1), attrs.get("block_size"))]
        elif n.op_type == "MoEExperts":
            pairs = [(n.input[3], n.input[4], 1, attrs["gate_up_block_size"]),
                     (n.input[5], n.input[6], 1, attrs["down_block_size"])]
        else:
            continue
        for q, s, axis, block in pairs:
            out[q] = (_dequantize(_array(inits[q]), _array(inits[s]), axis, block), block)
    return out


def rank_slice(name: str, w: np.ndarray, cfg: dict, tp: int, r: int) -> np.ndarray:
    """Rank r's part of the 1-rank transposed weight `w` ([K, N], experts [E, K, N]) written out from the split:
    column-parallel layers keep output columns, row-parallel ones input rows."""
    d, hq, hkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    if ".experts.gate_up_proj" in name:
        i = w.shape[2] // 2
        c = i // tp
        return np.concatenate([w[:, :, r * c:(r + 1) * c], w[:, :, i + r * c:i + (r + 1) * c]], axis=2)
    if ".experts.down_proj" in name:
        c = w.shape[1] // tp
        return w[:, r * c:(r + 1) * c]
    if "q_proj" in name:
        c = hq // tp * d
        return w[:, r * c:(r + 1) * c]
    if "k_proj" in name or "v_proj" in name:
        if tp > hkv:  # replicated: the KV head of the rank's q heads' group
            h = r * hq // tp // (hq // hkv)
            return w[:, h * d:(h + 1) * d]
        c = hkv // tp * d
        return w[:, r * c:(r + 1) * c]
    if "o_proj" in name or "down_proj" in name:
        c = w.shape[0] // tp
        return w[r * c:(r + 1) * c]
    if "gate_proj" in name or "up_proj" in name:
        c = w.shape[1] // tp
        return w[:, r * c:(r + 1) * c]
    if "lm_head" in name:
        c = -(-w.shape[1] // tp)
        return w[:, r * c:(r + 1) * c]
    raise AssertionError(f"no split known for {name}")


@pytest.mark.parametrize("ckpt,fmt,tp", [("dense", "int4", 4), ("moe_fp8", "fp8", 4),
                                         ("moe_fp8", "fp8", 8), ("moe_fp8", "fp8_attention_int4_experts", 2)])
def test_rank_weights_dequantize_to_the_slice_of_the_one_rank_weights(decoders, ckpts, ckpt, fmt, tp):
    """Every quantized initializer of every rank, dequantized, equals bit for bit the rank's slice of the same
    initializer of the 1-rank export; FP8 blocks cut mid-block are stored at the finer block that divides the cut
    (64 -> 32 / 16 here), with the checkpoint's e4m3 bytes."""
    cfg = json.loads((ckpts[ckpt] / "config.json").read_text())["text_config"]
    one = quantized_weights(decoders(ckpt, fmt, 1) / "decoder.onnx")
    assert len(one) >= 20
    finer = set()
    for r in range(tp):
        ranked = quantized_weights(decoders(ckpt, fmt, tp) / f"decoder.rank{r}.onnx")
        assert ranked.keys() == one.keys()
        for name, (w, block) in ranked.items():
            np.testing.assert_array_equal(w, rank_slice(name, one[name][0], cfg, tp, r), err_msg=name)
            if block and block < one[name][1]:
                finer.add((name.split(".layers.")[-1].split(".", 1)[-1], block))
    if fmt == "fp8" and tp == 4:  # K cut inside 64-blocks: experts' down 128/4 = 32, MLP down 64/4 = 16 (the N cuts,
        # k/v at 32 of 64 rows, leave the block along K as it is: the scale is stored per output column)
        assert {("mlp.experts.down_proj.fp8", 32), ("mlp.down_proj.weight_t.fp8", 16)} <= finer
    if fmt == "fp8" and tp == 8:
        assert ("mlp.experts.down_proj.fp8", 16) in finer


def test_fp8_rank_bytes_are_the_checkpoints_bytes(decoders, ckpts):
    """The e4m3 bytes of a rank are the checkpoint's, sliced (no re-quantization): experts' down of layer 0 at TP 4."""
    from safetensors.torch import load_file

    key = "model.language_model.layers.0.mlp.experts.down_proj"
    stored = load_file(ckpts["moe_fp8"] / "model.safetensors")[key]  # [E, I, C] e4m3 (release layout)
    assert stored.dtype == torch.float8_e4m3fn
    for r in range(4):
        m = onnx.load(str(decoders("moe_fp8", "fp8", 4) / f"decoder.rank{r}.onnx"))
        (t,) = [t for t in m.graph.initializer if t.name == f"{key}.fp8"]
        assert t.raw_data == stored[:, r * 32:(r + 1) * 32].contiguous().view(torch.uint8).numpy().tobytes()


# ---- bytes per rank --------------------------------------------------------------------------------------------
def _rank_bytes(ckpt, formats: WeightFormats, tp: int, fp8_block: int | None) -> int:
    """One rank's decoder weight bytes in an fp32 export, from the checkpoint's header shapes: per tensor the rank's
    [K_r, N_r] (split by tp; k/v by min(tp, Hkv)), then INT4 = K_r*N_r/2 + (K_r/B)*N_r fp32 scales, FP8 (kept from
    the checkpoint) = K_r*N_r + ceil(K_r/b)*N_r fp32 scales with b = gcd(checkpoint block, K_r) when K is split,
    dense = 4 bytes per element; norms, router and the scale tensors the checkpoint holds are not weights."""
    cfg = json.loads((ckpt / "config.json").read_text())["text_config"]
    hkv = cfg["num_key_value_heads"]
    total = 0
    for key, info in _header(ckpt / "model.safetensors").items():
        if not (key.startswith("model.language_model.") or key.startswith("lm_head.")) or \
                key.endswith(("embed_tokens.weight", "_scale_inv")):
            continue
        shape = list(info["shape"])
        leaf = key.replace(".weight", "").rsplit(".", 1)[-1]
        experts = ".experts." in key
        if experts:  # release layout [E, K, N]
            e, k, n = shape
            k, n = (k, n // tp) if leaf == "gate_up_proj" else (k // tp, n)
            group = "experts"
        elif leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
            e, (n, k) = 1, shape  # HF [out, in]
            if leaf in ("o_proj", "down_proj"):
                k //= tp
            elif leaf == "lm_head":
                n = -(-n // tp)  # rank 0's vocabulary rows
            else:
                n //= min(tp, hkv) if leaf in ("k_proj", "v_proj") else tp
            group = {"lm_head": "lm_head", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}.get(leaf,
                                                                                                       "attention")
        else:
            total += math.prod(shape) * 4
            continue
        fmt = getattr(formats, group)
        if fmt == "int4":
            total += e * (k * n // 2 + k // formats.int4_block * n * 4)
        elif fmt == "fp8" and info["dtype"] == "F8_E4M3":
            split_k = leaf in ("o_proj", "down_proj") and tp > 1
            b = math.gcd(fp8_block, k) if split_k else fp8_block
            total += e * (k * n + -(-k // b) * n * 4)
        else:
            total += e * k * n * 4
    return total


@pytest.mark.parametrize("ckpt,fmt,tp,block", [("dense", "int4", 4, None),
                                               ("moe_fp8", "fp8_attention_int4_experts", 2, FP8_CKPT_BLOCK),
                                               ("moe_fp8", "fp8", 4, FP8_CKPT_BLOCK)])
def test_rank0_weight_bytes_equal_the_formula(decoders, ckpts, ckpt, fmt, tp, block):
    from qwen_vl_trt.export.weight_report import weight_bytes

    want = _rank_bytes(ckpts[ckpt], FORMATS[fmt], tp, block)
    assert weight_bytes(decoders(ckpt, fmt, tp) / "decoder.rank0.onnx", FORMATS[fmt])["total"] == want
    assert weight_bytes(decoders(ckpt, fmt, 1) / "decoder.onnx", FORMATS[fmt])["total"] == \
        _rank_bytes(ckpts[ckpt], FORMATS[fmt], 1, block)


# ---- refusals ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights,block,tp,line", [
    ("int4", 32, 4, "error: --tp 4 with mlp=int4: mlp down_proj (row-parallel) has K = 64 input features, 16 per "
                    "rank, not a multiple of the INT4 block 32, so a rank cannot hold the 1-rank blocks; "
                    "--int4-block-size 16 would work"),
    ("fp8", 128, 2, "error: --tp 2 with mlp=fp8: mlp down_proj (row-parallel) has K = 64 input features, 32 per "
                    "rank, not a multiple of the FP8 block 64 quantized from this dense checkpoint, so a rank cannot "
                    "hold the 1-rank blocks; export a Qwen FP8 checkpoint (its blocks are sliced exactly) or use a "
                    "smaller --tp")])
def test_misaligned_row_parallel_blocks_are_one_error_line(ckpts, tmp_path, capsys, weights, block, tp, line):
    from qwen_vl_trt.export.export_all import main

    assert main([str(ckpts["dense"]), str(tmp_path / "out"), "--dtype", "fp32", "--no-engines", "--tp", str(tp),
                 "--weights", weights, "--int4-block-size", str(block)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == line
    assert not (tmp_path / "out" / "manifest.json").exists() and not list((tmp_path / "out").glob("*.onnx"))


# ---- tokens: TP N == TP 1 == HF on the dequantized weights -------------------------------------------------------
def _hf_int4(hf, module_names, block):
    """In place: each Linear `module_names` of `hf` set to numpy RTN INT4 (ref_int4) of its weight, blocks along K."""
    mods = dict(hf.named_modules())
    with torch.no_grad():
        for name in module_names:
            w = mods[name].weight  # [N, K]
            deq = ref_int4(w.detach().float().numpy().T[None], block)[2][0]  # [K, N]
            mods[name].weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(deq.T)))


def _hf_reference(ckpts, which):
    if which == "dense":
        hf = hf_model(ckpts["dense"])
        names = [n for n, m in hf.named_modules() if n.startswith("model.language_model.layers.") and
                 n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
        _hf_int4(hf, names + ["lm_head"], BLOCK)
        return hf, H.qwen3_processor(ckpts["dense"])
    hf = hf_model(ckpts["moe_fp8_hf"])  # FP8 attention dequantized by HF at load, experts by HF's Fp8Dequantize
    for layer in hf.model.language_model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue
        with torch.no_grad():
            for name in ("gate_up_proj", "down_proj"):
                p = getattr(experts, name)  # HF in memory [E, N, K]
                deq = ref_int4(p.detach().float().transpose(1, 2).numpy(), BLOCK)[2]  # [E, K, N]
                p.copy_(torch.from_numpy(deq).transpose(1, 2))
    return hf, H.qwen3_processor(ckpts["moe_fp8_hf"])


def _ours(model, media):  # noqa: F811
    from qwen_vl_trt.runtime.generate import generate
    from qwen_vl_trt.runtime.pipeline import Preprocessor
    from qwen_vl_trt.runtime.request import Request
    from qwen_vl_trt.runtime.sampling import Sampler, SamplingConfig

    pre = Preprocessor(model.manifest)
    out = {}
    for name in CASES:
        prompt, imgs, video = cases(media)[name]
        req = pre.prepare(Request(prompt, imgs, video))
        sampler, logprobs = Sampler(SamplingConfig(temperature=0, logprobs=0)), []
        res = generate(model, [req], sampler, N_Q, ignore_eos=True,  # the sampler's log-softmax of each chosen token
                       on_token=lambda b, t: logprobs.append(sampler.last_logprobs[b].logprob))[0]
        assert len(logprobs) == len(res.token_ids) == N_Q
        out[name] = (res.token_ids, logprobs)
    return out


@pytest.mark.parametrize("which,fmt,tps", [("dense", "int4", (2,)), ("moe_fp8", "fp8_attention_int4_experts", (2,))],
                         ids=["dense32b_int4", "moe235b_fp8_attention_int4_experts"])
def test_tp_ranks_with_quantized_weights_match_one_rank_and_hf(ckpts, media, tmp_path, monkeypatch, which, fmt,
                                                               tps):  # noqa: F811
    """An image request: greedy tokens of the TP ranks (MPI processes on ONNX Runtime) == the same format
    exported at TP 1 == HF `generate` with the same weights dequantized (numpy RTN INT4; FP8 as HF reads it), and
    the chosen tokens' log-probabilities of TP N == TP 1 within LOGPROB_ATOL (the tiny random models' greedy tokens
    are the same with dense weights, so the log-probabilities are what tells the ranks' weights apart)."""
    from qwen_vl_trt.export.export_all import export_all
    from qwen_vl_trt.model.contracts import Limits
    from qwen_vl_trt.runtime.generate import load_model

    got = {}
    for tp in (1, *tps):
        export_all(ckpts[which], tmp_path / f"tp{tp}", "fp32", Limits(**LIMITS), formats=FORMATS[fmt], tp=tp)
        model = load_model(tmp_path / f"tp{tp}", "onnxruntime")
        try:
            assert model.manifest.tp == tp and model.manifest.weight_formats() == FORMATS[fmt]
            got[tp] = _ours(model, media)
        finally:
            if tp > 1:
                model.sessions["decoder"].close()
    monkeypatch.setattr(test_generate, "N_NEW", N_Q)  # hf_generate's length
    hf, processor = _hf_reference(ckpts, which)
    want = {name: hf_generate(hf, processor, cases(media)[name][0], list(cases(media)[name][1])) for name in CASES}
    for tp in got:
        assert {name: tokens for name, (tokens, _) in got[tp].items()} == want, tp
        for name in CASES:  # the chosen tokens' log-probabilities
            np.testing.assert_allclose(got[tp][name][1], got[1][name][1], rtol=0, atol=LOGPROB_ATOL, err_msg=name)
        assert len(got[tp][CASES[0]][1]) == N_Q


# ---- TensorRT-RTX: quantized rank graphs build ahead of time -----------------------------------------------------
def test_tensorrt_rtx_builds_quantized_rank_graphs_with_dist_collective_layers(ckpts, tmp_path):
    """bf16 rank graphs of the 235B-shaped FP8 checkpoint at TP 2 with FP8 attention (the checkpoint's bytes) and
    INT4 experts (MoEExperts, its reference body inlined: no plugin library) parse into DIST_COLLECTIVE layers (2 per
    layer + 1, counted before the build) and build for SM89 (TensorRT-RTX, no GPU here: the engines are not run)."""
    from qwen_vl_trt.export.cli import export_graphs

    export_graphs(ckpts["moe_fp8"], tmp_path, "bf16", graphs=("decoder",), formats=FORMATS["fp8_attention_int4_experts"],
                  tp=2)
    for rank in range(2):
        m = onnx.load(str(tmp_path / f"decoder.rank{rank}.onnx"), load_external_data=False)
        types = {t.data_type for t in m.graph.initializer}
        assert {TensorProto.FLOAT8E4M3FN, TensorProto.INT4} <= types
    build_rank_engines_with_collectives(tmp_path, ckpts["moe_fp8"],
                                        2 * QWEN3_VL_MOE_TINY["text_config"]["num_hidden_layers"] + 1,
                                        ("--max-batch", "1", "--max-seq", "64", "--max-cache-len", "128"))


def test_tp_budget_equals_the_bytes_of_exported_rank_graphs(ckpts, tmp_path):
    """bench/tp_budget.py (the per-GPU table of docs/large-models.md) applied to the tiny dense checkpoint's config ==
    the bytes of rank 0's bf16 graph exported with the same mix and the INT4 block the table names (TP 2 and 4)."""
    import sys
    from pathlib import Path

    from qwen_vl_trt.export.cli import export_graphs
    from qwen_vl_trt.export.weight_report import weight_bytes

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from tp_budget import config_budgets

    cfg = json.loads((ckpts["dense"] / "config.json").read_text())
    for row in config_budgets(cfg, "tiny", ("dense", "int4"), tps=(2, 4)):
        for mix, (total, block) in row["decoder"].items():
            formats = WeightFormats.parse(mix, block or 128)
            out = tmp_path / f"{mix}_tp{row['tp']}"
            export_graphs(ckpts["dense"], out, "bf16", graphs=("decoder",), formats=formats, tp=row["tp"])
            assert weight_bytes(out / "decoder.rank0.onnx", formats)["total"] == total, (mix, row["tp"], block)
