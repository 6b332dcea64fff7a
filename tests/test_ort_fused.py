"""vision.ort.onnx / decoder.ort.onnx (export/ort_fused.py): what the rewrite produced, for each family.

Numerics are tested where the plugin graphs are: against HF in tests/test_export_qwen3_vl.py, test_qwen2_5_vl.py
and test_moe.py (parametrized over both files), end to end in tests/test_generate.py (`--ort-graphs`), and the
in-place KV cache in tests/test_decode_io.py. Here: the structure those numbers rest on.
"""
from __future__ import annotations

import collections

import onnx
import pytest

from qwen_vl_trt.export.ort_fused import fuse_decoder
from qwen_vl_trt.model.spec import ModelSpec

FAMILIES = ("qwen3_vl", "qwen2_5_vl", "qwen3_vl_moe")


def _ops(model: onnx.ModelProto) -> collections.Counter:
    def walk(g):
        for n in g.node:
            yield n
            for a in n.attribute:
                if a.HasField("g"):
                    yield from walk(a.g)
    return collections.Counter((n.domain or "ai.onnx", n.op_type) for n in walk(model.graph))


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_graphs_use_ort_kernels_and_share_the_weights(family, request):
    """Vision: per block an If between MultiHeadAttention without a mask (segments of one length: one image, the
    frames of a video) and with key_padding_mask (the two-image and Qwen2.5-VL window HF tests take that branch)."""
    ckpt = request.getfixturevalue(f"{family}_ckpt")
    graphs = request.getfixturevalue(f"{family}_fp32_graphs")
    spec = ModelSpec.from_checkpoint(ckpt)
    layers, depth = spec.text.num_hidden_layers, spec.vision.depth
    for name, want in (("decoder", {("com.microsoft", "GroupQueryAttention"): layers,
                                    ("com.microsoft", "RotaryEmbedding"): 2 * layers}),
                       ("vision", {("com.microsoft", "MultiHeadAttention"): 2 * depth, ("ai.onnx", "If"): depth,
                                   ("com.microsoft", "RotaryEmbedding"): 2 * depth})):
        fused = onnx.load(str(graphs / f"{name}.ort.onnx"), load_external_data=False)
        ops = _ops(fused)
        for op, count in want.items():
            assert ops[op] == count, (name, op, ops[op])
        assert not [op for op in ops if op[0] == "qwen_vl"] and not fused.functions
        plain = onnx.load(str(graphs / f"{name}.onnx"), load_external_data=False)
        for op in ("Softmax", "ScatterElements"):  # no reference body inlined (the MoE router's Softmax stays)
            assert ops["ai.onnx", op] == _ops(plain)["ai.onnx", op], op
        assert ops["ai.onnx", "Cos"] == 1  # the rotary table is computed once per call, not per layer
        # every RMSNorm one fused node: decoder 2 per layer (+ q/k norms on Qwen3) + the final one; Qwen2.5-VL
        # vision 2 per block + the merger's (Qwen3-VL's vision uses LayerNorm)
        t = spec.text
        norms = {"decoder": (4 if t.qk_norm else 2) * layers + 1,
                 "vision": 2 * depth + 1 if spec.model_type == "qwen2_5_vl" else 0}[name]
        # decoder: the norm after each residual sum takes the Add with it (2 per layer: after attention, and the
        # next layer's input norm or the final one); only layer 0's input norm and the q/k norms stay plain
        skip = 2 * layers if name == "decoder" else 0
        assert ops["com.microsoft", "SkipSimplifiedLayerNormalization"] == skip
        assert ops["ai.onnx", "SimplifiedLayerNormalization"] == norms - skip and ops["ai.onnx", "Reciprocal"] == 0
        # same weights: every initializer of the plugin graph, read from the same external data file
        location = lambda m: {i.name: {e.key: e.value for e in i.external_data}  # noqa: E731
                              for i in m.graph.initializer}
        assert location(fused) == location(plain)
        assert {v["location"] for v in location(fused).values() if v} == {f"{name}.onnx.data"}
        assert (graphs / f"{name}.ort.onnx").stat().st_size < (graphs / f"{name}.onnx").stat().st_size * 2


def test_decoder_present_outputs_are_the_attention_outputs(qwen3_vl_fp32_graphs):
    """GroupQueryAttention writes in place only when its present outputs are the graph outputs themselves (an
    Identity in between would make ONNX Runtime allocate and copy)."""
    fused = onnx.load(str(qwen3_vl_fp32_graphs / "decoder.ort.onnx"), load_external_data=False)
    gqa = [n for n in fused.graph.node if n.op_type == "GroupQueryAttention"]
    assert [list(n.output[1:]) for n in gqa] == [[f"present_key.{i}", f"present_value.{i}"] for i in range(len(gqa))]
    assert [list(n.input[3:5]) for n in gqa] == [[f"past_key.{i}", f"past_value.{i}"] for i in range(len(gqa))]


def test_rewrite_refuses_a_graph_without_plugin_nodes(qwen3_vl_ckpt, qwen3_vl_fp32_graphs):
    embed = onnx.load(str(qwen3_vl_fp32_graphs / "embed.onnx"), load_external_data=False)
    with pytest.raises(ValueError, match="no qwen_vl node to rewrite"):
        fuse_decoder(embed, ModelSpec.from_checkpoint(qwen3_vl_ckpt))


# Input slots that ONNX Runtime's CUDA kernels read on the host (their kernel definitions declare them
# OrtMemTypeCPUInput); every other input of a device kernel must already be on the device.
HOST_SLOTS = {"Reshape": {1}, "Expand": {1}, "ConstantOfShape": {0}, "Slice": {1, 2, 3, 4}, "Squeeze": {1},
              "Unsqueeze": {1}, "ReduceSum": {1}, "ReduceMean": {1}, "ReduceMax": {1}, "ReduceProd": {1},
              "CumSum": {1}, "Range": {0, 1, 2}, "Tile": {1}, "GroupQueryAttention": {6}}
SHAPE_OPS = {"Shape", "Slice", "Concat", "Gather", "Squeeze", "Unsqueeze", "Add", "Sub", "Mul", "Greater", "Where",
             "Cast", "ReduceProd", "Range", "Equal", "Less"}


def host_to_device_copies(graph: onnx.GraphProto) -> list[str]:
    """Where a value computed on the host (shape arithmetic: Shape, then ops on shapes and constants only) would
    flow into a device kernel's data input: each such edge is a Memcpy node on the CUDA EP, and ONNX Runtime
    refuses CUDA-graph capture of a graph with Memcpy nodes (inference_session.cc: CPU shape nodes are allowed,
    copies are not). A static stand-in for ONNX Runtime's placement; the GPU run has the last word."""
    const = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    host, copies = set(), []
    for n in graph.node:
        inputs = [i for i in n.input if i]
        if n.op_type in ("Shape", "Size") or (n.op_type in SHAPE_OPS and inputs and
                                              all(i in host or i in const for i in inputs)
                                              and any(i in host for i in inputs)):
            host.update(n.output)
            continue
        for slot, name in enumerate(n.input):
            if name in host and slot not in HOST_SLOTS.get(n.op_type, set()):
                copies.append(f"{n.op_type} {n.name} input {slot} ({name})")
    return copies


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_fused_decoder_needs_no_host_to_device_copy(family, request):
    """The dense decoders' *.ort.onnx keeps the decode step capturable as a CUDA graph (MoE: its Loop is not)."""
    graphs = request.getfixturevalue(f"{family}_fp32_graphs")
    fused = onnx.load(str(graphs / "decoder.ort.onnx"), load_external_data=False)
    assert host_to_device_copies(fused.graph) == []


def test_copy_check_sees_a_host_value_in_a_device_kernel():
    """The check above is not vacuous: S from the shape added to a device tensor is a copy; as a Reshape shape,
    or through ConstantOfShape, it is not."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Add", ["p", "s"], ["bad"]),
             helper.make_node("Reshape", ["x", "s"], ["ok"]), helper.make_node("ConstantOfShape", ["s"], ["ones"]),
             helper.make_node("Add", ["p", "ones"], ["fine"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.INT64, [2]),
                                       helper.make_tensor_value_info("p", TensorProto.INT64, [2])], [])
    assert host_to_device_copies(g) == ["Add  input 1 (s)"]
