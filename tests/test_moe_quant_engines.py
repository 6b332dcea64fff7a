"""TensorRT-RTX AOT-builds bf16 decoders whose MoE experts are FP8 or INT4 (export/moe_quant.py), with the plugin
library (each `qwen_vl::MoEExperts` node becomes a PLUGIN_V3 layer fed the quantized tensors) and without it
(build_engines inlines the node's reference body: DequantizeLinear + the expert Loop), and the engines keep the
experts' quantized bytes.

Bytes: the FP8 and INT4 decoders differ only in the experts' storage (same graph, same layers), so their engine sizes
must differ by what their expert initializers differ by in decoder.onnx.data (the independent reference: the bytes
the ONNX file holds). 5 %: engines also hold per-layer metadata whose size may differ with the weight type; the
measured gap is 1.5 % with the plugin and 0.1 % without (32 experts, I = 128: 1.17 MB of expert-byte difference).
Kernels cannot run here (RTX compiles them on the GPU at load): tests/gpu/test_moe_experts_numerics.py covers them.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from qwen_vl_trt.export.decoder import export_decoder
from qwen_vl_trt.export.demo_checkpoint import QWEN3_VL_MOE_TINY, make_checkpoint
from qwen_vl_trt.export.weights import CheckpointWeights
from qwen_vl_trt.model.spec import ModelSpec
from qwen_vl_trt.model.trt_compat import rtx_env
from qwen_vl_trt.model.weight_formats import WeightFormats

ROOT = Path(__file__).resolve().parents[1]
FORMATS = {"dense": "dense", "fp8": "experts=fp8", "int4": "experts=int4"}


@pytest.fixture(scope="module")
def decoders(tmp_path_factory) -> dict:
    """bf16 decoder.onnx of a tiny Qwen3-VL-MoE with 32 experts of I = 128 (so the experts' bytes show in the
    engines) per experts format -> {format: directory}."""
    root = tmp_path_factory.mktemp("moe_quant_engines")
    text = {**QWEN3_VL_MOE_TINY["text_config"], "num_experts": 32, "moe_intermediate_size": 128}
    ckpt = make_checkpoint(root / "ckpt", "qwen3_vl_moe", seed=4, config_overrides={"text_config": text})
    spec = ModelSpec.from_checkpoint(ckpt)
    out = {}
    for name, fmt in FORMATS.items():
        out[name] = root / name
        out[name].mkdir()
        (out[name] / "config.json").write_bytes((ckpt / "config.json").read_bytes())
        export_decoder(spec, CheckpointWeights(ckpt), out[name], "bfloat16",
                       formats=WeightFormats.parse(fmt, int4_block=64))
    return out


@pytest.fixture(scope="module")
def plugin_lib() -> Path:
    from qwen_vl_trt.model.trt_compat import plugin_library_path

    r = subprocess.run(["bash", str(ROOT / "plugins" / "build.sh")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return plugin_library_path()


def _expert_bytes(graph_dir: Path) -> int:
    model = onnx.load(str(graph_dir / "decoder.onnx"), load_external_data=False)
    return sum(int({e.key: e.value for e in t.external_data}["length"]) for t in model.graph.initializer
               if ".experts." in t.name)


def _build(graph_dir: Path, plugins: Path | None) -> tuple[int, int]:
    """-> (engine bytes, plugin layers) of decoder.engine built for SM89 + SM120."""
    flags = ["--plugins", str(plugins)] if plugins else []
    r = subprocess.run([sys.executable, "-m", "qwen_vl_trt.export.build_engines", str(graph_dir), "--graphs", "decoder",
                        "--dtype", "bfloat16", "--max-batch", "2", "--max-seq", "256", "--max-cache-len", "512",
                        "--compute-capabilities", "8.9", "12.0", *flags],
                       capture_output=True, text=True, env=rtx_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    blob = (graph_dir / "decoder.engine").read_bytes()
    assert blob[:4] == b"vtrt"  # TensorRT-RTX engine
    built = re.search(r"built decoder\.engine \((\d+) layers, (\d+) plugin\)", r.stderr)
    assert built, r.stderr[-2000:]
    return len(blob), int(built.group(2))


@pytest.mark.parametrize("with_plugins", [True, False], ids=["plugins", "reference-bodies"])
def test_quantized_expert_decoders_build_and_keep_their_bytes(decoders, with_plugins, request):
    plugins = request.getfixturevalue("plugin_lib") if with_plugins else None
    sizes, n_plugins = {}, {}
    for name in ("fp8", "int4"):
        sizes[name], n_plugins[name] = _build(decoders[name], plugins)
        nodes = onnx.load(str(decoders[name] / "decoder.onnx"), load_external_data=False).graph.node
        assert sum(n.op_type == "MoEExperts" for n in nodes) == 3  # the 3 sparse layers of the 4
    # with the library: per layer MRoPE x2 + KVCacheAttention, and MoEExperts per sparse layer; without it: none
    assert n_plugins == ({"fp8": 4 * 3 + 3, "int4": 4 * 3 + 3} if with_plugins else {"fp8": 0, "int4": 0})
    onnx_delta = _expert_bytes(decoders["fp8"]) - _expert_bytes(decoders["int4"])
    assert onnx_delta > 1_000_000
    assert abs((sizes["fp8"] - sizes["int4"]) - onnx_delta) <= 0.05 * onnx_delta, (sizes, onnx_delta)


def test_expert_bytes_per_format_in_the_onnx_graph(decoders):
    """decoder.onnx.data: FP8 experts are half the bf16 bytes plus one bf16 scale per 128 x 1 block; INT4 (block 64)
    a quarter plus one per 64 x 1 (32 experts x 3 layers; gate_up [32, 64, 256], down [32, 128, 64])."""
    values = 3 * 32 * (64 * 256 + 128 * 64)
    blocks = {"fp8": 3 * 32 * (1 * 256 + 1 * 64), "int4": 3 * 32 * (1 * 256 + 2 * 64)}
    assert _expert_bytes(decoders["dense"]) == 2 * values
    assert _expert_bytes(decoders["fp8"]) == values + 2 * blocks["fp8"]
    assert _expert_bytes(decoders["int4"]) == values // 2 + 2 * blocks["int4"]
