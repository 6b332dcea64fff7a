"""qwen_vl::MatMulF32, our ONNX Runtime custom op for a dense fp32 decoder's weight products on the CPU
(plugins/ortMatMulInt4/matMulF32*.cpp, in build/ort/libqwen_vl_ort_kernels.so beside qwen_vl::MatMulInt4).

ONNX Runtime copies every MatMul / Gemm weight into MLAS's packed layout when it creates a session: for the 2.86 GB
fp32 decoder of the benchmark checkpoint, seconds of single-threaded copying on every start. Without the copy
(`session.disable_prepacking`) MLAS's decode step ran about 10 % slower (docs/benchmarks.md). MatMulF32 reads each weight where ONNX Runtime memory-maps it, as sequential streams, so the
session starts on mapped weights and decodes at the memory bandwidth.

The switch is a rename of the decoder's nodes in the graph protobuf the session loads (kept in the default cache
like runtime/backends/prepack_order.py's reordered graph: no weights copied, the initializers still name the
artifact folder's `.onnx.data`):

    MatMul (A fp32 [..., K], B a 2-D fp32 initializer [K, N])            -> qwen_vl::MatMulF32 (A, B)
    Gemm   (A fp32 [M, K], B a 2-D fp32 initializer [N, K], transB = 1,
            transA = 0, alpha = 1, no C: lm_head)                        -> qwen_vl::MatMulF32 (A, B), transB = 1

The exported graphs do not change. Used only on ONNX Runtime's CPU provider, for dense fp32 decoders, where the
library is built and the CPU has AVX-512F (`ort_int4_kernel.library()`; `QWEN_VL_ORT_KERNELS=off` switches both ops
off).
"""
from __future__ import annotations

from . import ort_int4_kernel

DOMAIN = ort_int4_kernel.DOMAIN
OP = "MatMulF32"
VERSION = {"qwen_vl.f32_kernel": "MatMulF32/1"}  # part of the cache key of the renamed graph


def eligible(node, weights: set) -> bool:
    """Whether MatMulF32 runs this node: a MatMul on a 2-D fp32 initializer, or lm_head's Gemm (transB, no C)."""
    inputs = list(node.input)
    if node.domain not in ("", "ai.onnx") or len(inputs) < 2 or inputs[1] not in weights:
        return False
    if node.op_type == "MatMul":
        return len(inputs) == 2
    if node.op_type == "Gemm":
        a = ort_int4_kernel.node_attributes(node)
        return (len(inputs) == 2 or not inputs[2]) and a.get("transB", 0) == 1 and a.get("transA", 0) == 0 \
            and float(a.get("alpha", 1.0)) == 1.0
    return False


def rename_dense_products(model) -> int:
    """In place: every eligible node of the main graph becomes qwen_vl::MatMulF32 -> how many. Needs A to be fp32,
    which it is wherever B is (ONNX's MatMul and Gemm take one element type)."""
    from onnx import TensorProto, helper

    graph = model.graph
    weights = {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2}
    count = 0
    for node in graph.node:
        if not eligible(node, weights):
            continue
        gemm = node.op_type == "Gemm"
        del node.attribute[:]
        del node.input[2:]
        if gemm:
            node.attribute.append(helper.make_attribute("transB", 1))
        node.domain, node.op_type = DOMAIN, OP
        count += 1
    if count and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return count


def renamed(graph_path) -> bytes:
    """The graph protobuf of `graph_path` (no weights: its initializers keep naming their external data file) with
    its dense products renamed."""
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    rename_dense_products(model)
    return model.SerializeToString()
