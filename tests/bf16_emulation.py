"""Run a bf16 graph on ONNX Runtime CPU, which has no bf16 kernels, by emulating bf16 in fp32.

Every bf16 tensor becomes fp32, and every value that was bf16 is rounded to bf16 right after the node that
produces it (Cast fp32 -> bf16 -> fp32, round-to-nearest-even in ORT). Inside each node the math is fp32,
which is what GPU bf16 kernels do (fp32 accumulation, bf16 storage). Weights are bf16 values held in fp32
(exact). So the emulated graph computes what the bf16 graph computes on a GPU, up to accumulation order.
"""
from __future__ import annotations

import copy

import onnx
from onnx import TensorProto, helper, numpy_helper

BF16, F32 = TensorProto.BFLOAT16, TensorProto.FLOAT


def emulate_bf16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` (external data already loaded) that runs on ORT CPU. Subgraphs (the MoE experts'
    Loop body) are emulated the same way; they read the converted outer initializers by name."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types = {}
    for graph in _graphs(inferred.graph):
        types.update({v.name: v.type.tensor_type.elem_type for v in
                      list(graph.value_info) + list(graph.input) + list(graph.output)})
    m = copy.deepcopy(model)
    g = m.graph
    for init in g.initializer:
        if init.data_type == BF16:
            types[init.name] = BF16
            arr = numpy_helper.to_array(init).astype("float32")
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    for graph in _graphs(g):
        _emulate_nodes(graph, types)
    return m


def _graphs(g: onnx.GraphProto):
    """`g` and every subgraph below it (Loop / If bodies)."""
    yield g
    for node in g.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)


def _emulate_nodes(g: onnx.GraphProto, types: dict) -> None:
    for v in list(g.input) + list(g.output):
        if v.type.tensor_type.elem_type == BF16:
            v.type.tensor_type.elem_type = F32
    nodes = []
    for node in g.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == BF16:
                attr.i = F32
            if attr.name == "value" and attr.t.data_type == BF16:  # ConstantOfShape / Constant
                arr = numpy_helper.to_array(attr.t).astype("float32")
                attr.t.CopyFrom(numpy_helper.from_array(arr, attr.t.name))
        bf16_outs = [o for o in node.output if types.get(o) == BF16]
        renamed = {o: f"{o}__fp32" for o in bf16_outs}
        node.output[:] = [renamed.get(o, o) for o in node.output]
        nodes.append(node)
        for o in bf16_outs:
            nodes.append(helper.make_node("Cast", [renamed[o]], [f"{o}__bf16"], to=BF16))
            nodes.append(helper.make_node("Cast", [f"{o}__bf16"], [o], to=F32))
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]


def load_emulated(path) -> onnx.ModelProto:
    """Load a bf16 graph with its weights, inline the plugin ops' reference bodies, emulate bf16."""
    import onnx.inliner

    model = onnx.load(str(path), load_external_data=True)
    return emulate_bf16(onnx.inliner.inline_local_functions(model))
