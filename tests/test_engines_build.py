"""The three bf16 graphs of a tiny Qwen3-VL, Qwen3-VL-MoE (the expert Loop included) and Qwen2.5-VL parse in
TensorRT(-RTX) and build engines ahead of time, with the plugin library loaded (every qwen_vl node becomes a
PLUGIN_V3 layer) and without it (TensorRT inlines the nodes' ONNX reference functions).

On this CPU-only CI the TensorRT-RTX builder checks parsing, shape inference over the profiles derived
from model/contracts.py, and the build; engines cannot run here (RTX compiles kernels on the GPU at load,
and refuses Hopper). Runs in a subprocess because the RTX library path must be set before the process starts.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from qwen_vl_trt.model.contracts import Limits, dim_ranges
from qwen_vl_trt.export.cli import export_graphs
from qwen_vl_trt.model.trt_compat import rtx_env


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl"])
def bf16_graphs(request, tmp_path_factory) -> Path:
    ckpt = request.getfixturevalue(f"{request.param}_ckpt")
    out = tmp_path_factory.mktemp(f"{request.param}_bf16_graphs")
    export_graphs(ckpt, out, "bf16")
    (out / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    return out


def _plugin_node_count(onnx_path: Path) -> int:
    return sum(n.domain == "qwen_vl" for n in onnx.load(str(onnx_path), load_external_data=False).graph.node)


@pytest.mark.parametrize("with_plugins", [True, False], ids=["plugins", "reference-bodies"])
def test_bf16_engines_build_for_three_targets(bf16_graphs, tmp_path, with_plugins):
    for f in bf16_graphs.iterdir():
        (tmp_path / f.name).symlink_to(f)
    plugin_flags = []
    if with_plugins:
        r = subprocess.run(["bash", str(ROOT / "plugins" / "build.sh")], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        from qwen_vl_trt.model.trt_compat import plugin_library_path

        plugin_flags = ["--plugins", str(plugin_library_path())]
    r = subprocess.run([sys.executable, "-m", "qwen_vl_trt.export.build_engines", str(tmp_path), "--dtype", "bfloat16",
                        "--max-patches", "1024", "--max-batch", "2", "--max-seq", "256", "--max-cache-len", "512",
                        "--compute-capabilities", "8.6", "8.9", "12.0", *plugin_flags],
                       capture_output=True, text=True, env=rtx_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("vision", "embed", "decoder"):
        blob = (tmp_path / f"{name}.engine").read_bytes()
        assert blob[:4] in (b"vtrt", b"ftrt"), name  # TensorRT-RTX / TensorRT engine magic
        built = re.search(rf"built {name}\.engine \((\d+) layers, (\d+) plugin\)", r.stderr)
        assert built, r.stderr[-2000:]
        expected = _plugin_node_count(bf16_graphs / f"{name}.onnx") if with_plugins else 0
        assert int(built.group(2)) == expected, (name, built.group(0))
    # vision: 2 MRoPE + 1 VarlenAttention per block; decoder: 2 MRoPE + 1 KVCacheAttention per layer
    assert _plugin_node_count(bf16_graphs / "vision.onnx") == 3 * 4
    assert _plugin_node_count(bf16_graphs / "decoder.onnx") == 3 * 4


def test_impossible_limit_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qwen_vl_trt.export.build_engines", str(tmp_path),
                        "--max-seq", "4096", "--max-cache-len", "1024"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == ("error: max_cache_len 1024 < max_seq 4096: a prompt of max_seq "
                                                 "tokens would not fit the cache; raise --max-cache-len")


@pytest.mark.parametrize("family", ["QWEN3_VL_TINY", "QWEN3_VL_MOE_TINY", "QWEN2_5_VL_TINY"])
def test_profiles_cover_every_dynamic_dim(family):
    from qwen_vl_trt.model.contracts import CONTRACTS
    from qwen_vl_trt.model.spec import ModelSpec
    import json
    from qwen_vl_trt.export import demo_checkpoint

    spec = ModelSpec.from_config(json.loads(json.dumps(getattr(demo_checkpoint, family))))
    named = {d for fn in CONTRACTS.values() for t in fn(spec).inputs for d in t.dims if isinstance(d, str)}
    ranges = dim_ranges(Limits())
    assert named <= set(ranges)
    assert all(lo <= opt <= hi for lo, opt, hi in ranges.values())
