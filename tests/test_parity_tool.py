"""`qwen-vl-parity`: per-layer comparison of our graphs with HF, on real requests.

On the tiny fp32 artifacts every vision block, the merged and DeepStack features, every decoder layer and the
last logits must be within the fp32 tolerance and the greedy tokens identical (HF is the reference the tool
runs). Then one weight of decoder layer 2 is perturbed in a copy of the artifacts: the tool must fail
(exit 1) and name text/layers.2 as the first tensor out of tolerance, with layers 0 and 1 still passing --
the property that makes it useful for finding where a deployment diverges.
"""
from __future__ import annotations

import io
import shutil
from contextlib import redirect_stdout

import numpy as np
import onnx

from qwen_vl_trt.runtime.serve import parity
from test_generate import artifacts, media  # noqa: F401 (fixtures)


def run_tool(ckpt, arts, image, tokens: int = 8) -> tuple[int, dict]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = parity.main([str(ckpt), str(arts), "--image", str(image), "--tokens", str(tokens)])
    rows = {}
    for line in buf.getvalue().splitlines()[1:]:
        parts = line.split()
        if parts and "/" in parts[0] or parts[:1] == ["logits[last]"]:
            rows[parts[0]] = parts[-1]
    return code, {"rows": rows, "text": buf.getvalue()}


def test_tiny_artifacts_match_hf_layer_by_layer(qwen3_vl_ckpt, artifacts, media):  # noqa: F811
    code, out = run_tool(qwen3_vl_ckpt, artifacts, media["images"][0])
    assert code == 0, out["text"]
    expected = [f"visual/blocks.{i}" for i in range(4)] + ["visual/merged"] + \
        [f"visual/deepstack.{i}" for i in range(3)] + [f"text/layers.{i}" for i in range(4)] + ["logits[last]"]
    assert list(out["rows"]) == expected
    assert set(out["rows"].values()) == {"yes"}
    assert "first divergence: none  yes" in out["text"]


def test_a_perturbed_weight_is_located(qwen3_vl_ckpt, artifacts, media, tmp_path):  # noqa: F811
    bad = tmp_path / "bad"
    shutil.copytree(artifacts, bad)  # copies: ONNX Runtime refuses external data behind a symlink
    model = onnx.load(str(bad / "decoder.onnx"), load_external_data=False)
    init = next(t for t in model.graph.initializer if "layers.2.mlp.down_proj" in t.name)
    info = {e.key: e.value for e in init.external_data}
    with open(bad / "decoder.onnx.data", "r+b") as f:  # add 0.5 to every element of the first 16
        f.seek(int(info["offset"]))
        vals = np.frombuffer(f.read(64), np.float32) + np.float32(0.5)
        f.seek(int(info["offset"]))
        f.write(vals.tobytes())
    code, out = run_tool(qwen3_vl_ckpt, bad, media["images"][0])
    assert code == 1, out["text"]
    assert out["rows"]["text/layers.0"] == out["rows"]["text/layers.1"] == "yes"
    assert out["rows"]["text/layers.2"] == "NO"
    assert "first tensor out of tolerance: text/layers.2" in out["text"]
