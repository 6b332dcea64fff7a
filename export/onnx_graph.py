"""A small ONNX graph builder that streams weights to external data one tensor at a time.

Graphs are written directly as ONNX (no tracing): we choose every op (TensorRT-parsable, plugin-replaceable)
and every cast, and the process never holds more than one weight tensor (node names follow
HF's module paths: `/text/layers.3/self_attn/q_proj/MatMul`, which runtime/serve/parity.py relies on).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qwen_vl_trt.model.weight_formats import WeightFormats

OPSET = 21
FUNCTION_DOMAIN = "qwen_vl_trt"  # model-local composite ops that no plugin replaces (export/layers.py RMSNorm)

ELEM = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
        "int64": TensorProto.INT64, "int32": TensorProto.INT32, "int8": TensorProto.INT8, "bool": TensorProto.BOOL}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16",
                 "float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


class GraphBuilder:
    def __init__(self, name: str, data_path: Path | None, dtype: str):
        self.name = name
        self.dtype = dtype  # compute dtype of activations and weights ("float32" | "float16" | "bfloat16")
        self.tp = None  # set: the TensorParallel rank this decoder graph is written for (export/tp.py)
        self.formats = WeightFormats()  # weight format per group of decoder weights (model/weight_formats.py)
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.functions: dict[tuple[str, str], onnx.FunctionProto] = {}
        self.domains: dict[str, int] = {}
        self.memo: dict = {}  # values derived once per graph (e.g. an int64 input cast to int32)
        self._scope: list[str] = []
        self._count: dict[str, int] = {}
        self._consts: dict[bytes, str] = {}
        self._data = ExternalData(data_path) if data_path else None

    @classmethod
    def for_contract(cls, contract, out_dir, dtype: str):
        """A builder for OUT_DIR/<contract.name>.onnx (weights in <name>.onnx.data) with the contract's inputs
        declared; returns (builder, {input name: value}, path of the .onnx file)."""
        path = Path(out_dir) / f"{contract.name}.onnx"
        g = cls(contract.name, path.with_name(f"{contract.name}.onnx.data"), dtype)
        return g, {t.name: g.input(t.name, t.dtype, t.dims) for t in contract.inputs}, path

    # ---- naming -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, name: str):
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def _node_name(self, op_type: str) -> str:
        base = "/" + "/".join(self._scope + [op_type])
        n = self._count.get(base, 0)
        self._count[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    # ---- graph I/O ----------------------------------------------------------------------------------
    def input(self, name: str, dtype: str, dims) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, ELEM[dtype], list(dims)))
        return name

    def output(self, value: str, name: str, dtype: str, dims) -> None:
        """Expose `value` as graph output `name` (an Identity keeps the contract's name)."""
        self.op("Identity", [value], outputs=[name])
        self.outputs.append(helper.make_tensor_value_info(name, ELEM[dtype], list(dims)))

    # ---- nodes --------------------------------------------------------------------------------------
    def op(self, op_type: str, inputs, n_out: int = 1, outputs=None, domain: str = "", **attrs):
        name = self._node_name(op_type)
        outs = outputs or [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, domain=domain or None, **attrs))
        if domain:
            self.domains.setdefault(domain, 1)
        return outs[0] if len(outs) == 1 else outs

    def const(self, value, dtype=None) -> str:
        """A small inline constant (shapes, axes, scalars, index tables); deduplicated by value."""
        arr = np.asarray(value, dtype=dtype)
        key = arr.dtype.str.encode() + str(arr.shape).encode() + arr.tobytes()
        if key not in self._consts:
            name = f"/const/{len(self._consts)}"
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def weight(self, name: str, tensor, dtype: str | None = None) -> str:
        """Stream one torch tensor to the external data file, converted to `dtype` (default: compute dtype)."""
        import torch

        dtype = dtype or self.dtype
        t = tensor.to(getattr(torch, dtype)).contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
        return self._store(name, raw, ELEM[dtype], t.shape)

    def int4_weight(self, name: str, values: np.ndarray) -> str:
        """An INT4 initializer from int8 `values` in [-8, 7], packed two per byte, low nibble first (ONNX INT4)."""
        import ml_dtypes

        packed = numpy_helper.from_array(np.ascontiguousarray(values).astype(ml_dtypes.int4), name)
        return self._store(name, np.frombuffer(packed.raw_data, np.uint8), TensorProto.INT4, values.shape)

    def fp8_weight(self, name: str, tensor) -> str:
        """A float8 e4m3fn initializer holding the bytes of torch float8_e4m3fn `tensor` unchanged (export/fp8.py)."""
        import torch

        t = tensor.contiguous()
        return self._store(name, t.reshape(-1).view(torch.uint8).numpy(), TensorProto.FLOAT8E4M3FN, t.shape)

    def _store(self, name: str, raw: np.ndarray, data_type: int, dims) -> str:
        if self._data is None:
            proto = TensorProto()
            proto.name, proto.data_type, proto.raw_data = name, data_type, raw.tobytes()
            proto.dims.extend(dims)
        else:
            proto = self._data.tensor(name, raw, data_type, dims)
        self.initializers.append(proto)
        return name

    def add_function(self, fn: onnx.FunctionProto) -> None:
        self.functions[(fn.domain, fn.name)] = fn
        self.domains.setdefault(fn.domain, 1)

    # ---- output -------------------------------------------------------------------------------------
    def finish(self, path: Path, doc: str = "", output_order=None, metadata: dict | None = None) -> onnx.ModelProto:
        if output_order is not None:  # graph outputs in the contract's order
            self.outputs.sort(key=lambda v: list(output_order).index(v.name))
        if self._data is not None:
            self._data.close()
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, v) for d, v in self.domains.items()]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="qwen-vl-trt",
                                  functions=list(self.functions.values()), doc_string=doc)
        model.ir_version = 10
        if metadata:
            helper.set_model_props(model, metadata)
        onnx.save_model(model, str(path))
        return model


class ExternalData:
    """One external-data file that tensors are appended to, 64-byte aligned (for mmap / page-wise loading):
    `tensor(name, raw, data_type, dims)` writes `raw` and returns the TensorProto that points at it.
    `append`: continue an existing file (a second writer of decoder.ort.onnx.data) instead of starting it anew."""

    def __init__(self, path: Path, append: bool = False):
        self.path = Path(path)
        self._offset = self.path.stat().st_size if append and self.path.is_file() else 0
        self._file = open(path, "ab" if append else "wb")

    def tensor(self, name: str, raw, data_type: int, dims) -> onnx.TensorProto:
        proto = TensorProto()
        proto.name, proto.data_type = name, data_type
        proto.dims.extend(dims)
        pad = (-self._offset) % 64
        if pad:
            self._file.write(b"\0" * pad)
            self._offset += pad
        raw = memoryview(raw).cast("B")
        self._file.write(raw)
        proto.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(self._offset)), ("length", str(raw.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = k, v
        self._offset += raw.nbytes
        return proto

    def close(self) -> None:
        self._file.close()


class FunctionBody:
    """The nodes of one model-local function body (export/plugin_ops.py, `rms_norm_function`), value names unique;
    constants are Constant nodes (a function has no initializers)."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def op(self, op_type: str, inputs, n_out: int = 1, **attrs):
        self._n += 1
        outs = [f"_{op_type.lower()}{self._n}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, values, dtype=np.int64) -> str:
        return self.op("Constant", [], value=onnx.numpy_helper.from_array(np.asarray(values, dtype)))

    def attr_const(self, attr: str, value_field: str, attr_type) -> str:
        """A Constant whose value is the function attribute `attr` (an attribute reference)."""
        self._n += 1
        out = f"_{attr}{self._n}"
        node = helper.make_node("Constant", [], [out])
        node.attribute.append(helper.make_attribute_ref(value_field, attr_type, ref_attr_name=attr))
        self.nodes.append(node)
        return out

    def f32(self, x: str) -> str:
        return self.op("Cast", [x], to=TensorProto.FLOAT)

    def dim(self, x: str, i: int) -> str:
        """Shape(x)[i:i+1] as a 1-D int64 tensor."""
        return self.op("Shape", [x], start=i, end=i + 1) if i != -1 else self.op("Shape", [x], start=-1)


def elem_type(dtype: str) -> int:
    return ELEM[dtype]
