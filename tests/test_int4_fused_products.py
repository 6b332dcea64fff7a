"""ONNX Runtime's flavour of an INT4 decoder fuses the INT4 products that read one activation (q/k/v, gate/up) into
one wider product and a Split (export/int4.py `fuse_int4_products`, called by export/ort_fused.py).

Reference: numpy. Each weight is quantized here from the scheme's definition (export/int4.py's docstring: blocks
of B rows of Wt [K, N], scale = absmax / 7 in fp32, round half to even, clamp to [-8, 7]) and the product
x @ (q * s) is taken in float64. The fused graph computes that at accuracy level 1 (fp32 activations), so the
fp32 tolerance (tests/tolerances.py) applies: only the summation order differs.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from qwen_vl_trt.export.int4 import fuse_int4_products, int4_matmul_weight, store_in_memory_initializers
from qwen_vl_trt.export.onnx_graph import GraphBuilder
from qwen_vl_trt.runtime.backends.ort import exact_int4_matmul
from tolerances import FP32_ATOL

K, WIDTHS, OTHER = 64, {"q_proj": 48, "k_proj": 16, "v_proj": 16}, 24


def dequantized(wt: np.ndarray, block: int) -> np.ndarray:
    """Wt [K, N] float32 -> q * s [K, N] float64 per the RTN scheme."""
    k, n = wt.shape
    blocks = wt.reshape(k // block, block, n)
    s = (np.abs(blocks).max(axis=1, keepdims=True) / np.float32(7)).astype(np.float32)
    s[s == 0] = 1
    q = np.clip(np.round(blocks / s), -8, 7)
    return (q.astype(np.float64) * s.astype(np.float64)).reshape(k, n)


def graph(path, weights: dict, other: np.ndarray, block: int):
    """x [B, S, K] -> q/k/v products (+ a bias Add on k, as Qwen2.5's attention bias), y [B, S, K] -> one more."""
    g = GraphBuilder("int4_products", path.with_name(path.name + ".data"), "float32")
    x = g.input("x", "float32", ["batch", "seq", K])
    y = g.input("y", "float32", ["batch", "seq", K])
    for name, wt in weights.items():
        with g.scope(name):
            out = g.op("MatMul", [x, int4_matmul_weight(g, f"{name}.weight_t", torch.from_numpy(wt), block)])
            if name == "k_proj":
                out = g.op("Add", [out, g.weight("k_proj.bias", torch.ones(wt.shape[1]))])
        g.output(out, name, "float32", ["batch", "seq", wt.shape[1]])
    with g.scope("o_proj"):
        out = g.op("MatMul", [y, int4_matmul_weight(g, "o_proj.weight_t", torch.from_numpy(other), block)])
    g.output(out, "o_proj", "float32", ["batch", "seq", OTHER])
    g.finish(path)
    return path


def session(path, optimized=None):
    opts = ort.SessionOptions()
    exact_int4_matmul(opts)
    if optimized:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("block", [16, 32])
def test_fused_products_equal_the_dequantized_products(tmp_path, block):
    rng = np.random.default_rng(block)
    weights = {n: (rng.standard_normal((K, w)) * 0.05).astype(np.float32) for n, w in WIDTHS.items()}
    other = (rng.standard_normal((K, OTHER)) * 0.05).astype(np.float32)
    path = graph(tmp_path / "products.onnx", weights, other, block)

    model = onnx.load(str(path), load_external_data=False)
    new = fuse_int4_products(model, tmp_path)
    assert store_in_memory_initializers(model, tmp_path / "fused.onnx.data", new) == 2
    onnx.save_model(model, str(tmp_path / "fused.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("DequantizeLinear") == 2 and ops.count("MatMul") == 2 and ops.count("Split") == 1
    split = next(n for n in model.graph.node if n.op_type == "Split")
    assert list(split.output) == [f"/{n}/MatMul/output_0" for n in WIDTHS]  # the old products' names
    inits = {t.name: t for t in model.graph.initializer}
    fused_q = next(inits[i] for i in new if inits[i].data_type == onnx.TensorProto.INT4)
    assert list(fused_q.dims) == [K, sum(WIDTHS.values())]
    assert {e.value for t in (inits[i] for i in new) for e in t.external_data if e.key == "location"} == {
        "fused.onnx.data"}

    feeds = {"x": rng.standard_normal((2, 3, K)).astype(np.float32),
             "y": rng.standard_normal((2, 3, K)).astype(np.float32)}
    got = dict(zip(["q_proj", "k_proj", "v_proj", "o_proj"],
                   session(tmp_path / "fused.onnx", tmp_path / "opt.onnx").run(
                       ["q_proj", "k_proj", "v_proj", "o_proj"], feeds)))
    for name, wt in {**weights, "o_proj": other}.items():
        ref = (feeds["y" if name == "o_proj" else "x"].astype(np.float64) @ dequantized(wt, block)
               + (1.0 if name == "k_proj" else 0.0))
        assert np.abs(got[name] - ref).max() <= FP32_ATOL, name
        # and the products really are INT4: the dense weight's product is far away
        dense = feeds["y" if name == "o_proj" else "x"].astype(np.float64) @ wt + (1.0 if name == "k_proj" else 0.0)
        assert np.abs(got[name] - dense).max() > 100 * FP32_ATOL, name
    # ONNX Runtime fuses the wider pair into one MatMulNBits: two products in all, no DequantizeLinear left
    optimized = onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False)
    nbits = [n for n in optimized.graph.node if n.op_type == "MatMulNBits"]
    assert sorted({a.name: a.i for a in n.attribute}["N"] for n in nbits) == [OTHER, sum(WIDTHS.values())]
    assert not any(n.op_type == "DequantizeLinear" for n in optimized.graph.node)


def test_nothing_to_fuse_leaves_the_graph_alone(tmp_path):
    rng = np.random.default_rng(0)
    path = graph(tmp_path / "one.onnx", {"q_proj": (rng.standard_normal((K, 16)) * 0.05).astype(np.float32)},
                 (rng.standard_normal((K, OTHER)) * 0.05).astype(np.float32), 16)
    model = onnx.load(str(path), load_external_data=False)
    before = model.SerializeToString()
    assert fuse_int4_products(model, tmp_path) == []
    assert model.SerializeToString() == before
