"""qwen_vl::MatMulInt4, our ONNX Runtime custom op for INT4 weight-only products with fp32 activations on the CPU
(plugins/ortMatMulInt4/, built into build/ort/libqwen_vl_ort_kernels.so by its build.sh).

ONNX Runtime 1.32's MatMulNBits at accuracy level 1 (fp32 activations) widens every weight to fp32 inside MLAS and
decodes at about a third of the memory bandwidth (docs/benchmarks.md); MatMulInt4 dequantizes in registers
(AVX-512). Its inputs and attributes are MatMulNBits's, so the switch is a rename of the nodes in the optimized model
that ONNX Runtime writes into the optimized-model cache (runtime/backends/ort_cache.py):

    MatMulNBits (com.microsoft; bits 4, fp32 A, no g_idx / bias, accuracy level 0-3, block a multiple of 32)
        -> MatMulInt4 (domain qwen_vl), same inputs A, B, scales[, zero_points] and attributes

The exported graphs do not change: decoder.onnx / decoder.ort.onnx keep DequantizeLinear + MatMul (TensorRT, the CUDA
provider and every other runtime read them as before). Used only on ONNX Runtime's CPU provider, for INT4 decoders
with fp32 activations, when the library is built and the CPU has AVX-512F (elsewhere its kernel is the scalar
reference, slower than MLAS's). `QWEN_VL_ORT_KERNELS`: the library's path, or `off` for MLAS's kernel.
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

DOMAIN = "qwen_vl"
OP = "MatMulInt4"
VERSION = "MatMulInt4/1"  # part of the optimized-model cache key: entries with renamed nodes are their own
ENV = "QWEN_VL_ORT_KERNELS"
DEFAULT_LIBRARY = Path(__file__).resolve().parents[2] / "build" / "ort" / "libqwen_vl_ort_kernels.so"


def library(environ=os.environ) -> Path | None:
    """The custom-op library to register, or None: switched off (`QWEN_VL_ORT_KERNELS=off`), not built, not loadable,
    or built for a CPU without AVX-512F."""
    value = environ.get(ENV, "")
    if value.lower() in ("off", "0", "none", "mlas"):
        return None
    path = Path(value) if value else DEFAULT_LIBRARY
    return path if _vectorized(str(path)) else None


@functools.lru_cache(maxsize=None)
def _vectorized(path: str) -> bool:
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return False
    return bool(lib.qwen_vl_matmul_int4_vectorized())


def node_attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def eligible(node, float_names: set) -> bool:
    """Whether a MatMulNBits node is one MatMulInt4 runs: 4 bits, fp32 activations (its scales are fp32 and its
    accuracy level is not 4), no g_idx or bias, a block that is a multiple of 32."""
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
        return False
    a = node_attributes(node)
    inputs = list(node.input)
    return (a.get("bits", 4) == 4 and a.get("accuracy_level", 0) != 4 and a.get("block_size", 0) % 32 == 0
            and len(inputs) >= 3 and inputs[2] in float_names and all(not name for name in inputs[4:]))


def rename_matmul_nbits(model) -> int:
    """In place: every eligible MatMulNBits node of the main graph becomes qwen_vl::MatMulInt4 -> how many."""
    from onnx import TensorProto, helper

    graph = model.graph
    float_names = {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT}
    count = 0
    for node in graph.node:
        if eligible(node, float_names):
            node.domain, node.op_type = DOMAIN, OP
            del node.input[4:]
            count += 1
    if count and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return count


def rewrite_saved_model(path: Path) -> int:
    """rename_matmul_nbits on the model file ONNX Runtime saved (its weights stay in their external data file)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    count = rename_matmul_nbits(model)
    if count:
        tmp = path.with_name(path.name + ".tmp")
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    return count
