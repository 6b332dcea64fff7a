"""The three bf16 graphs of a tiny Qwen3-VL parse in TensorRT(-RTX) and build engines ahead of time.

On this CPU-only CI the TensorRT-RTX builder checks parsing, shape inference over the profiles derived
from export/contracts.py, and the build; engines cannot run here (RTX compiles kernels on the GPU at load,
and refuses Hopper). Runs in a subprocess because the RTX library path must be set before the process starts.
"""
from __future__ import annotations

import subprocess
import sys

from qwen_vl_trt.export.build_engines import Limits, dim_ranges
from qwen_vl_trt.export.cli import export_graphs
from qwen_vl_trt.export.trt_compat import rtx_env


def test_bf16_engines_build_for_three_targets(qwen3_vl_ckpt, tmp_path):
    export_graphs(qwen3_vl_ckpt, tmp_path, "bf16")
    (tmp_path / "config.json").write_bytes((qwen3_vl_ckpt / "config.json").read_bytes())
    r = subprocess.run([sys.executable, "-m", "qwen_vl_trt.export.build_engines", str(tmp_path), "--dtype", "bfloat16",
                        "--max-patches", "1024", "--max-batch", "2", "--max-seq", "256", "--max-cache-len", "512",
                        "--compute-capabilities", "8.6", "8.9", "12.0"],
                       capture_output=True, text=True, env=rtx_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("vision", "embed", "decoder"):
        blob = (tmp_path / f"{name}.engine").read_bytes()
        assert blob[:4] in (b"vtrt", b"ftrt"), name  # TensorRT-RTX / TensorRT engine magic
        assert f"built {name}.engine" in r.stderr


def test_impossible_limit_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qwen_vl_trt.export.build_engines", str(tmp_path),
                        "--max-seq", "4096", "--max-cache-len", "1024"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == ("error: max_cache_len 1024 < max_seq 4096: a prompt of max_seq "
                                                 "tokens would not fit the cache; raise --max-cache-len")


def test_profiles_cover_every_dynamic_dim():
    from qwen_vl_trt.export.contracts import CONTRACTS
    from qwen_vl_trt.export.spec import ModelSpec
    import json
    from qwen_vl_trt.export.demo_checkpoint import QWEN3_VL_TINY

    spec = ModelSpec.from_config(json.loads(json.dumps(QWEN3_VL_TINY)))
    named = {d for fn in CONTRACTS.values() for t in fn(spec).inputs for d in t.dims if isinstance(d, str)}
    ranges = dim_ranges(Limits())
    assert named <= set(ranges)
    assert all(lo <= opt <= hi for lo, opt, hi in ranges.values())
