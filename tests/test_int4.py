"""INT4 weight-only projections (`--weights attention=int4,mlp=int4`; export/int4.py). `--weights int4` also
quantizes lm_head: tests/test_quantized_lm_head.py.

Reference: HF's model with each quantized projection's weight replaced by its round-to-nearest INT4 value,
computed here from the scheme's definition on HF's [out, in] weight (blocks of B input features per output
row, scale = absmax / 7). With those weights HF and our graphs compute the same function, so the fp32
tolerance applies; the unquantized HF model is far from both, so the test fails if nothing was quantized.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from hf_reference import (assert_prefill_and_decode_match_hf, graphs_prefill, hf_model, mm_token_type_ids,
                          prompt_with_pads)
from qwen_vl_trt.export.cli import export_graphs
from qwen_vl_trt.export.int4 import QUANTIZED, to_matmul_nbits
from qwen_vl_trt.model.spec import ModelSpec
from qwen_vl_trt.model.weight_formats import WeightFormats
from qwen_vl_trt.model.trt_compat import plugin_library_path, rtx_env
from qwen_vl_trt.runtime.backends.ort import exact_int4_matmul
from tolerances import FP32_ATOL

BLOCK = 16  # the tiny models' input widths 64 and 128 are whole blocks; down_proj's 37 is not: it stays dense
PROJECTIONS = WeightFormats(attention="int4", mlp="int4", int4_block=BLOCK)
ROOT = Path(__file__).resolve().parents[1]
CASES = {"qwen3_vl": ([[1, 14, 10]], 1536), "qwen2_5_vl": ([[1, 8, 8]], 1176), "qwen3_vl_moe": ([[1, 14, 10]], 1536)}


def rtn_int4(weight: torch.Tensor, block: int) -> torch.Tensor:
    """Round-to-nearest symmetric INT4 value of an HF Linear weight [out, in], blocks along `in`."""
    w = weight.detach().float()
    out = torch.empty_like(w)
    for start in range(0, w.shape[1], block):
        chunk = w[:, start:start + block]
        scale = chunk.abs().amax(dim=1, keepdim=True) / 7
        scale[scale == 0] = 1
        out[:, start:start + block] = torch.clamp(torch.round(chunk / scale), -8, 7) * scale
    return out


def hf_with_int4_projections(ckpt):
    hf = hf_model(ckpt)
    n = 0
    with torch.no_grad():
        for name, module in hf.model.language_model.named_modules():
            if (isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in QUANTIZED
                    and module.in_features % BLOCK == 0):
                module.weight.copy_(rtn_int4(module.weight, BLOCK))
                n += 1
    assert n >= 4 * 3  # every layer has at least its attention projections quantized
    return hf


@pytest.fixture(scope="module")
def int4_graphs(tmp_path_factory):
    made = {}

    def get(family, ckpt):
        if family not in made:
            out = made[family] = tmp_path_factory.mktemp(f"{family}_int4")
            export_graphs(ckpt, out, "fp32", formats=PROJECTIONS)
            # the MatMulNBits form the export writes for bf16 decoders, here on fp32 so the CPU can run it
            model = onnx.load(str(out / "decoder.ort.onnx"), load_external_data=False)
            assert to_matmul_nbits(model, out, out / "decoder.nbits.ort.onnx.data") > 0
            onnx.save_model(model, str(out / "decoder.nbits.ort.onnx"))
        return made[family]
    return get


@pytest.mark.parametrize("decoder", ["decoder.onnx", "decoder.ort.onnx", "decoder.nbits.ort.onnx"])
@pytest.mark.parametrize("family", list(CASES))
def test_int4_decoder_matches_hf_with_int4_weights(family, decoder, int4_graphs, request):
    ckpt = request.getfixturevalue(f"{family}_ckpt")
    graphs, spec = int4_graphs(family, ckpt), ModelSpec.from_checkpoint(ckpt)
    grid_list, patch_dim = CASES[family]
    grid = torch.tensor(grid_list)
    torch.manual_seed(1)
    pixels = torch.randn(int(grid.prod()), patch_dim)
    ids = prompt_with_pads(spec, [int(grid.prod()) // 4])
    hf = hf_with_int4_projections(ckpt)
    worst = assert_prefill_and_decode_match_hf(hf, graphs, spec, ids, grid, pixels, steps=8, atol=FP32_ATOL,
                                               decoder=decoder)
    assert worst <= FP32_ATOL
    # the dense model is far away: the graphs really hold the INT4 values
    dense = request.getfixturevalue(f"hf_{family}")
    ours, _ = graphs_prefill(graphs, spec, dense, ids, grid, pixels, decoder=decoder)
    with torch.no_grad():
        tt = mm_token_type_ids(ids, spec.image_token_id, spec.video_token_id)
        ref = dense(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=tt).logits[0, -1].numpy()
    assert np.abs(ours["logits"][0] - ref).max() > 100 * FP32_ATOL


def test_int4_graph_structure_and_onnx_runtime_fusion(qwen3_vl_ckpt, int4_graphs, tmp_path):
    """Every projection is DequantizeLinear(INT4, block 16) -> MatMul, nothing else is; in decoder.ort.onnx q/k/v
    and gate/up are one product each (export/int4.py fuse_int4_products, weights in decoder.ort.onnx.data), and
    ONNX Runtime turns each pair into one MatMulNBits at accuracy level 1; the decoder's metadata names the
    format."""
    graphs = int4_graphs("qwen3_vl", qwen3_vl_ckpt)
    model = onnx.load(str(graphs / "decoder.onnx"), load_external_data=False)
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    layers = ModelSpec.from_checkpoint(qwen3_vl_ckpt).text.num_hidden_layers
    assert len(dq) == layers * 6  # q/k/v/o, gate, up; not down_proj (K = 37)
    int4 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4}
    assert {n.input[0] for n in dq} == int4
    assert all({a.name: a.i for a in n.attribute} == {"axis": 0, "block_size": BLOCK} for n in dq)
    meta = {p.key: p.value for p in model.metadata_props}
    assert set(meta) == {"qwen_vl.weights"}
    assert WeightFormats.from_json(json.loads(meta["qwen_vl.weights"])) == PROJECTIONS
    vision = onnx.load(str(graphs / "vision.onnx"), load_external_data=False)
    assert not any(n.op_type == "DequantizeLinear" for n in vision.graph.node)

    opts = ort.SessionOptions()
    exact_int4_matmul(opts)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(graphs / "decoder.ort.onnx"), opts, providers=["CPUExecutionProvider"])
    fused = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    nbits = [n for n in fused.graph.node if n.op_type == "MatMulNBits"]
    t = ModelSpec.from_checkpoint(qwen3_vl_ckpt).text
    widths = sorted({a.name: a.i for a in n.attribute}["N"] for n in nbits)
    qkv = (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
    assert widths == sorted([qkv, t.hidden_size, 2 * t.intermediate_size] * layers)  # q|k|v, o, gate|up
    assert not any(n.op_type == "DequantizeLinear" for n in fused.graph.node)
    assert all({a.name: a.i for a in n.attribute}["accuracy_level"] == 1 for n in nbits)


def test_int4_decoder_is_smaller(qwen3_vl_ckpt, qwen3_vl_fp32_graphs, int4_graphs):
    int4 = int4_graphs("qwen3_vl", qwen3_vl_ckpt)
    dense_bytes = (qwen3_vl_fp32_graphs / "decoder.onnx.data").stat().st_size
    int4_bytes = (int4 / "decoder.onnx.data").stat().st_size
    assert int4_bytes < dense_bytes  # the tiny model is dominated by lm_head; at 2B the projections are ~80 %


def _build_decoder_engine(ckpt, out: Path, block, *flags) -> int:
    export_graphs(ckpt, out, "bf16", graphs=("decoder",), formats=PROJECTIONS if block else WeightFormats())
    (out / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    r = subprocess.run([sys.executable, "-m", "qwen_vl_trt.export.build_engines", str(out), "--dtype", "bfloat16",
                        "--graphs", "decoder", "--max-batch", "2", "--max-seq", "64", "--max-cache-len", "128", *flags],
                       capture_output=True, text=True, env=rtx_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return (out / "decoder.engine").stat().st_size


def test_int4_bf16_engines_build_with_tensorrt(qwen3_vl_ckpt, tmp_path):
    """TensorRT(-RTX) reads DequantizeLinear(INT4 blocks) -> MatMul as weight-only quantization: the bf16 int4
    decoder builds ahead of time with the plugin library for sm_86/89/120, and (one target, no plugins, so that
    nothing else differs) its engine is smaller than the dense one by about the projections' bf16 -> int4 bytes,
    i.e. TensorRT keeps those weights as INT4 instead of folding them back to bf16."""
    r = subprocess.run(["bash", str(ROOT / "plugins" / "build.sh")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    _build_decoder_engine(qwen3_vl_ckpt, tmp_path / "deploy", BLOCK, "--compute-capabilities", "8.6", "8.9", "12.0",
                          "--plugins", str(plugin_library_path()))
    dense = _build_decoder_engine(qwen3_vl_ckpt, tmp_path / "dense", None, "--compute-capabilities", "8.9")
    int4 = _build_decoder_engine(qwen3_vl_ckpt, tmp_path / "int4", BLOCK, "--compute-capabilities", "8.9")
    t = ModelSpec.from_checkpoint(qwen3_vl_ckpt).text
    attention = t.hidden_size * 2 * (t.num_attention_heads + t.num_key_value_heads) * t.head_dim  # q, o, k, v
    mlp = 2 * t.hidden_size * t.intermediate_size  # gate, up (down_proj's K = 37 stays dense)
    saved = t.num_hidden_layers * (attention + mlp) * 1.5  # 2 bytes -> 0.5 byte per weight; scales ignored
    assert dense - int4 >= 0.8 * saved, (dense, int4, saved)


def test_runtime_generates_with_int4_artifacts_like_hf(qwen3_vl_ckpt, tmp_path):
    """`export_all`-style INT4 artifacts through the runtime (load_model, generate): greedy tokens == HF generate
    with the same INT4 weights, and the runtime's sessions ask ONNX Runtime for fp32 accumulation."""
    from qwen_vl_trt.export.export_all import export_all
    from qwen_vl_trt.runtime.generate import generate, load_model
    from qwen_vl_trt.runtime.pipeline import Preprocessor
    from qwen_vl_trt.runtime.request import Request
    from qwen_vl_trt.runtime.sampling import Sampler, SamplingConfig

    art = export_all(qwen3_vl_ckpt, tmp_path / "art", "fp32", formats=PROJECTIONS).parent
    model = load_model(art, "onnxruntime")
    opts = model.sessions["decoder"].sess.get_session_options()
    assert opts.get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "1"
    assert model.manifest.graphs["decoder"]["weights"] == PROJECTIONS.to_json()
    req = Preprocessor(model.manifest).prepare(Request("Say something about int4."))
    ours = generate(model, [req], Sampler(SamplingConfig(temperature=0)), 16, ignore_eos=True)[0].token_ids
    hf = hf_with_int4_projections(qwen3_vl_ckpt)
    with torch.no_grad():
        ids = torch.tensor([req.input_ids])
        ref = hf.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    assert ours == ref[0, ids.shape[1]:].tolist()


def test_int4_accuracy_level_values():
    """int4_accuracy writes ONNX Runtime's session entry; a level outside 0-4 is one UserError."""
    from qwen_vl_trt.model.errors import UserError
    from qwen_vl_trt.runtime.backends.ort import int4_accuracy

    opts = ort.SessionOptions()
    int4_accuracy(opts, 4)
    assert opts.get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "4"
    with pytest.raises(UserError, match="accuracy level 7: use 0-4"):
        int4_accuracy(ort.SessionOptions(), 7)


def test_bf16_int4_decoder_ort_graph_uses_matmul_nbits(qwen3_vl_ckpt, tmp_path):
    """bf16: ONNX Runtime would not fuse DequantizeLinear + MatMul (its fusion takes float/float16 scales), so
    decoder.ort.onnx holds MatMulNBits nodes with bf16 scales, their weights in decoder.ort.onnx.data; the
    packing itself is checked on fp32 against HF above (decoder.nbits.ort.onnx). The CPU EP has no bf16 kernel
    for it: not run here."""
    from qwen_vl_trt.export.export_all import export_all
    from qwen_vl_trt.model.errors import ArtifactError
    from qwen_vl_trt.model.manifest import load_manifest

    export_all(qwen3_vl_ckpt, tmp_path, "bf16", formats=PROJECTIONS)
    model = onnx.load(str(tmp_path / "decoder.ort.onnx"), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    layers = ModelSpec.from_checkpoint(qwen3_vl_ckpt).text.num_hidden_layers
    # q|k|v, o, gate|up per layer (export/int4.py fuse_int4_products; down_proj's K = 37 stays dense)
    assert len(nbits) == layers * 3 and not any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    inits = {t.name: t for t in model.graph.initializer}
    assert all(inits[n.input[2]].data_type == onnx.TensorProto.BFLOAT16 for n in nbits)
    assert all(inits[n.input[1]].data_type == onnx.TensorProto.UINT8 for n in nbits)
    assert {e.value for n in nbits for t in (inits[n.input[1]], inits[n.input[2]]) for e in t.external_data
            if e.key == "location"} == {"decoder.ort.onnx.data"}
    assert not any(t.data_type == onnx.TensorProto.INT4 for t in model.graph.initializer)
    # manifest.json lists the extra weight file, and a copy of the artifacts without it is refused
    assert load_manifest(tmp_path).graphs["decoder"]["onnx_ort_data"] == "decoder.ort.onnx.data"
    (tmp_path / "decoder.ort.onnx.data").unlink()
    with pytest.raises(ArtifactError, match="decoder.ort.onnx.data is missing"):
        load_manifest(tmp_path)
