"""TensorRT-RTX ahead-of-time builds of the quantized decoders (`--weights fp8`, `--weights int4` with lm_head), bf16
graphs for sm_89 (FP8 needs Ada or later), no plugin library so that only the weights differ between engines.

Whether TensorRT keeps the quantized bytes (instead of folding DequantizeLinear back into bf16 weights) is read from
the engine sizes: the quantized engine must be smaller than the dense one by at least 80 % of the weights' bf16 ->
quantized bytes (scales and the engines' kernel payloads, which vary by a few hundred KB, take the rest). The test
suite's tiny model has only 127 K projection weights, below that variation, hence a wider checkpoint here.
Nothing is executed (no GPU here).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from qwen_vl_trt.export.cli import export_graphs
from qwen_vl_trt.model.spec import ModelSpec
from qwen_vl_trt.model.trt_compat import rtx_env
from qwen_vl_trt.model.weight_formats import WeightFormats
from test_fp8_checkpoints import _fp8_checkpoint

WIDE_TEXT = {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 16,
             "num_key_value_heads": 4, "vocab_size": 4096}


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory):
    """Qwen3-VL with projections that dominate the decoder (4.5 M of 6.6 M weights), so that engine sizes show
    them above the few hundred KB by which TensorRT-RTX's engines vary with the kernels they carry (the default
    tiny model's 127 K projection weights are below that)."""
    from qwen_vl_trt.export.demo_checkpoint import QWEN3_VL_TINY, make_checkpoint

    text = {**QWEN3_VL_TINY["text_config"], **WIDE_TEXT}
    vision = {**QWEN3_VL_TINY["vision_config"], "out_hidden_size": WIDE_TEXT["hidden_size"],
              "deepstack_visual_indexes": [0, 1]}  # one DeepStack level per text layer at most
    return make_checkpoint(tmp_path_factory.mktemp("wide"), "qwen3_vl", seed=3,
                           config_overrides={"text_config": text, "vision_config": vision})


@pytest.fixture(scope="module")
def wide_dense_engine_bytes(wide_ckpt, tmp_path_factory):
    return _engine_bytes(wide_ckpt, tmp_path_factory.mktemp("dense"), WeightFormats())


def _engine_bytes(ckpt, out: Path, formats) -> int:
    export_graphs(ckpt, out, "bf16", graphs=("decoder",), formats=formats)
    (out / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    r = subprocess.run([sys.executable, "-m", "qwen_vl_trt.export.build_engines", str(out), "--dtype", "bfloat16",
                        "--graphs", "decoder", "--max-batch", "2", "--max-seq", "64", "--max-cache-len", "128",
                        "--compute-capabilities", "8.9"], capture_output=True, text=True, env=rtx_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return (out / "decoder.engine").stat().st_size


def test_fp8_bf16_decoder_builds_with_tensorrt_and_keeps_fp8_bytes(wide_ckpt, wide_dense_engine_bytes, tmp_path):
    """bf16 graphs (TensorRT's path; ONNX Runtime's CPU provider has no bf16 FP8 kernel): the RTN scales are bf16,
    DequantizeLinear feeds MatMul directly, and TensorRT-RTX builds the decoder ahead of time for sm_89 (FP8 needs
    Ada or later) with the FP8 weights kept: the engine is smaller than the dense one by about the projections'
    bf16 -> e4m3 bytes (1 byte per weight; >= 80 %: the engines' kernel payloads differ by a few hundred KB)."""
    dense, fp8 = wide_dense_engine_bytes, _engine_bytes(wide_ckpt, tmp_path / "fp8", WeightFormats.parse("fp8"))
    model = onnx.load(str(tmp_path / "fp8" / "decoder.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    t = ModelSpec.from_checkpoint(wide_ckpt).text
    assert len(dq) == t.num_hidden_layers * 7
    assert all(inits[n.input[1]].data_type == onnx.TensorProto.BFLOAT16 for n in dq)
    assert not any(n.op_type == "Cast" and n.input[0] in {d.output[0] for d in dq} for n in model.graph.node)
    attention = t.hidden_size * 2 * (t.num_attention_heads + t.num_key_value_heads) * t.head_dim
    saved = t.num_hidden_layers * (attention + 3 * t.hidden_size * t.intermediate_size)
    assert dense - fp8 >= 0.8 * saved, (dense, fp8, saved)


def test_fp8_checkpoint_bf16_decoder_with_fp32_scales_builds_with_tensorrt(qwen3_vl_ckpt, tmp_path):
    """An FP8 checkpoint whose scales are fp32 (as the test checkpoints write them) in a bf16 graph: the scales stay
    fp32 (bf16 would round them) and a Cast follows each DequantizeLinear; TensorRT-RTX builds that form too."""
    ckpt = _fp8_checkpoint(qwen3_vl_ckpt, tmp_path / "fp8")
    _engine_bytes(ckpt, tmp_path / "out", WeightFormats.parse("fp8"))
    model = onnx.load(str(tmp_path / "out" / "decoder.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(inits[n.input[1]].data_type == onnx.TensorProto.FLOAT for n in dq)
    casts = {n.input[0] for n in model.graph.node if n.op_type == "Cast"}
    assert all(n.output[0] in casts for n in dq)


def test_int4_everywhere_bf16_decoder_builds_with_tensorrt_and_keeps_int4_bytes(wide_ckpt, wide_dense_engine_bytes,
                                                                                   tmp_path):
    """`--weights int4` (block 128): every projection and lm_head as INT4 (all K here are multiples of 128); the
    engine is smaller than the dense one by >= 80 % of 1.5 bytes per quantized weight."""
    int4 = _engine_bytes(wide_ckpt, tmp_path / "int4", WeightFormats.parse("int4", int4_block=128))
    model = onnx.load(str(tmp_path / "int4" / "decoder.onnx"), load_external_data=False)
    t = ModelSpec.from_checkpoint(wide_ckpt).text
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == t.num_hidden_layers * 7 + 1 and dq[-1].name == "/text/lm_head/DequantizeLinear"
    attention = t.hidden_size * 2 * (t.num_attention_heads + t.num_key_value_heads) * t.head_dim
    weights = t.num_hidden_layers * (attention + 3 * t.hidden_size * t.intermediate_size) + t.vocab_size * t.hidden_size
    assert wide_dense_engine_bytes - int4 >= 0.8 * 1.5 * weights, (wide_dense_engine_bytes, int4, weights)
