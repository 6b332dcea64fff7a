"""Building blocks shared by the graphs: linear, norms, activations, casts.

Numerics follow HF: norm statistics in fp32; RMSNorm multiplies its weight in the compute dtype
after casting back (HF Qwen3VLTextRMSNorm / Qwen2RMSNorm), written as one `qwen_vl_trt.RMSNorm` node whose
model-local function holds those ops (ONNX Runtime and TensorRT inline it; export/ort_fused.py matches the one node); LayerNorm in fp32 (torch computes bf16/fp16
layer_norm in fp32 internally); weights of Linear layers are stored transposed ([in, out]) so the graph
uses plain MatMul, which TensorRT and ORT both fuse with the bias Add.
"""
from __future__ import annotations

import onnx
from onnx import AttributeProto, helper

from . import fp8, int4
from .onnx_graph import ELEM, FUNCTION_DOMAIN, OPSET, FunctionBody, GraphBuilder
from .weights import CheckpointWeights


def cast(g: GraphBuilder, x: str, dtype: str) -> str:
    return g.op("Cast", [x], to=ELEM[dtype])


def to_compute(g: GraphBuilder, x: str) -> str:
    return x if g.dtype == "float32" else cast(g, x, g.dtype)


def linear(g: GraphBuilder, w: CheckpointWeights, x: str, key: str, bias: bool, weight=None) -> str:
    """y = x @ W^T + b for HF Linear `key` (weight [out, in] stored as [in, out]). A decoder projection is stored
    in the format `g.formats` gives its group (model/weight_formats.py): INT4 blocks (export/int4.py; a K that is
    not a whole number of blocks stays dense) or FP8 blocks (export/fp8.py)."""
    fmt = g.formats.format_of(key) if weight is None else "dense"
    with g.scope(key.split(".")[-1]):
        wt_value = fp8.fp8_matmul_weight(g, w, f"{key}.weight", f"{key}.weight_t") if fmt == "fp8" else None
        if wt_value is None:
            wt = (weight if weight is not None else w.get(f"{key}.weight")).t()
            if fmt == "int4" and int4.quantizes(key, wt.shape[0], g.formats.int4_block):
                wt_value = int4.int4_matmul_weight(g, f"{key}.weight_t", wt, g.formats.int4_block)
            else:
                wt_value = g.weight(f"{key}.weight_t", wt)
        y = g.op("MatMul", [x, wt_value])
        if bias:
            y = g.op("Add", [y, g.weight(f"{key}.bias", w.get(f"{key}.bias"))])
    return y


def rms_norm(g: GraphBuilder, w: CheckpointWeights, x: str, key: str, eps: float) -> str:
    """HF RMSNorm over the last dim: one `RMSNorm(x, weight)` node (`rms_norm_function` is its body)."""
    with g.scope(key.split(".")[-1]):
        g.add_function(rms_norm_function())
        weight = g.weight(f"{key}.weight", w.get(f"{key}.weight"))
        return g.op("RMSNorm", [x, weight], domain=FUNCTION_DOMAIN, epsilon=float(eps))


def rms_norm_function() -> onnx.FunctionProto:
    """RMSNorm(x [..., C], weight [C]; epsilon) -> y, as HF: x in fp32, var = mean(x * x) over the last dim,
    x * 1 / sqrt(var + epsilon), cast back to x's dtype, times the weight in that dtype."""
    b = FunctionBody()
    x32 = b.f32("x")
    var = b.op("ReduceMean", [b.op("Mul", [x32, x32]), b.const([-1])], keepdims=1)
    eps = b.attr_const("epsilon", "value_float", AttributeProto.FLOAT)
    inv = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, eps])])])
    y = b.op("CastLike", [b.op("Mul", [x32, inv]), "x"])
    b.nodes.append(helper.make_node("Mul", [y, "weight"], ["y"]))
    return helper.make_function(FUNCTION_DOMAIN, "RMSNorm", ["x", "weight"], ["y"], b.nodes,
                                [helper.make_opsetid("", OPSET)], attributes=["epsilon"],
                                doc_string=rms_norm_function.__doc__)


def layer_norm(g: GraphBuilder, w: CheckpointWeights, x: str, key: str, eps: float) -> str:
    """nn.LayerNorm over the last dim, computed in fp32 (weights kept fp32: they are tiny)."""
    with g.scope(key.split(".")[-1]):
        x32 = cast(g, x, "float32") if g.dtype != "float32" else x
        y = g.op("LayerNormalization", [x32, g.weight(f"{key}.weight", w.get(f"{key}.weight"), "float32"),
                                        g.weight(f"{key}.bias", w.get(f"{key}.bias"), "float32")],
                 axis=-1, epsilon=eps)
        return to_compute(g, y)


def activation(g: GraphBuilder, x: str, kind: str) -> str:
    if kind in ("gelu_pytorch_tanh", "gelu_tanh"):
        return g.op("Gelu", [x], approximate="tanh")
    if kind == "gelu":
        return g.op("Gelu", [x])
    if kind == "silu":
        return g.op("Mul", [x, g.op("Sigmoid", [x])])
    raise ValueError(f"unsupported activation {kind!r}")


def gated_mlp(g: GraphBuilder, w: CheckpointWeights, x: str, key: str, act: str, bias: bool) -> str:
    """down(act(gate(x)) * up(x)): the text MLP (no bias) and the Qwen2.5-VL vision MLP (with bias)."""
    gate = activation(g, linear(g, w, x, f"{key}.gate_proj", bias), act)
    up = linear(g, w, x, f"{key}.up_proj", bias)
    return linear(g, w, g.op("Mul", [gate, up]), f"{key}.down_proj", bias)


def reshape(g: GraphBuilder, x: str, shape) -> str:
    return g.op("Reshape", [x, g.const(list(shape), "int64")])


def transpose(g: GraphBuilder, x: str, perm) -> str:
    return g.op("Transpose", [x], perm=list(perm))
