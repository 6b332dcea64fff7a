"""ONNX side of the qwen_vl TensorRT plugins: one node per op, plus a model-local function with its reference body.

Every op is a node of domain `qwen_vl` carrying `plugin_namespace="qwen_vl"` and `plugin_version="1"`
(plugins/README.md). The model also holds a FunctionProto of the same domain/name whose body is the
reference computation in standard ONNX ops (opset 21), so the same graph runs two ways:
  * ONNX Runtime (and TensorRT without our library) inlines the function body;
  * TensorRT with libqwen_vl_plugins.so loaded imports the node as a PLUGIN_V3 layer (the parser prefers the
    plugin once `plugin_namespace` names a registered creator: tests/test_plugins_build.py builds both ways).
Function bodies read the op attributes through attribute references (Constant nodes with ref_attr_name),
which ONNX Runtime resolves when it inlines the function. Bodies do their math in fp32 and cast the results
back to the input dtype (CastLike), so fp16/bf16 graphs also run on ORT CPU (it has no bf16 MatMul).

Op contracts (N... = any leading token dims; all int inputs are int32):
  MRoPE(x [N..., H, D], positions [N..., A]) -> y [N..., H, D]
      attrs inv_freq: floats [D/2], axis: ints [D/2]
      angle[n, i] = positions[n, axis[i]] * inv_freq[i]; emb = cat(angle, angle);
      y = x * cos(emb) + rotate_half(x) * sin(emb), rotate_half(x) = cat(-x[D/2:], x[:D/2]); fp32 math.
  VarlenAttention(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], cu_seqlens [n+1]) -> o [T, Hq, D]
      attrs scale: float, causal: int. Attention only within [cu[i], cu[i+1]); head h uses kv head h // (Hq/Hkv).
  KVCacheAttention(q [B, S, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, D], past_key [B, Hkv, C, D],
                   past_value [B, Hkv, C, D], past_lengths [B]) -> o [B, S, Hq, D], present_key, present_value
      attr scale: float. present = past with rows past_lengths[b] + s set to the new k/v (s < S);
      o[b, s] = softmax_{j <= past_lengths[b] + s}(q . k_j * scale) v_j (causal, GQA, fp32 softmax).
  MoEExperts(x [N, C], ids [A] int32, weights [A], gate_up [E, C, 2I] fp8|int4, gate_up_scale [E, ceil(C/Bg), 2I],
             down [E, I, C] fp8|int4, down_scale [E, ceil(I/Bd), C]) -> y [N, C]
      attrs top_k: int (A = N * top_k; assignment a is token a // top_k), gate_up_block_size Bg, down_block_size Bd.
      W_e = q_e * s_e per block of B input features (DequantizeLinear axis 1); h = x_t @ Gu_e;
      y[t] = sum_a weights[a] * (silu(h[:I]) * h[I:]) @ D_e over t's assignments a (e = ids[a]), in the x dtype.
      The body is generated per model (export/moe.py: shapes, dtype and activation are the model's): DQ of the
      stacked tensors, then the expert-tile Loop of the dense MoE block.
"""
from __future__ import annotations

import contextlib

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper

from .onnx_graph import FunctionBody
from .rotary import text_tables, vision_tables

DOMAIN = "qwen_vl"
PLUGIN_NAMESPACE = "qwen_vl"
PLUGIN_VERSION = "1"
OPSET = 21
NEG_INF = -3.0e38  # finite "minus infinity" in fp32: a fully masked row gives uniform weights, never NaN

_PLUGIN_ATTRS = ("plugin_namespace", "plugin_version")
OP_ATTRIBUTES = {  # op -> its own attributes (the plugin fields), in addition to _PLUGIN_ATTRS
    "MRoPE": ("inv_freq", "axis"),
    "VarlenAttention": ("scale", "causal"),
    "KVCacheAttention": ("scale",),
    "MoEExperts": ("top_k", "gate_up_block_size", "down_block_size"),
}


# ---- rotary tables (export/rotary.py; the names the plugin tests and benchmarks use) --------------------
mrope_tables_text = text_tables
rotary_tables_vision = vision_tables


# ---- nodes -----------------------------------------------------------------------------------------------
def _plugin_node(op: str, inputs, outputs, name: str | None, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, list(inputs), list(outputs), name=name, domain=DOMAIN,
                            plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION, **attrs)


def make_mrope_node(x: str, positions: str, y: str, inv_freq, axis, name: str | None = None) -> onnx.NodeProto:
    inv_freq = np.asarray(inv_freq, np.float32).reshape(-1)
    axis = np.asarray(axis, np.int64).reshape(-1)
    if inv_freq.shape != axis.shape or inv_freq.size == 0:
        raise ValueError("inv_freq and axis must both have D/2 entries")
    return _plugin_node("MRoPE", [x, positions], [y], name, inv_freq=[float(v) for v in inv_freq],
                        axis=[int(a) for a in axis])


def make_varlen_attention_node(q: str, k: str, v: str, cu_seqlens: str, out: str, scale: float,
                               causal: bool = False, name: str | None = None) -> onnx.NodeProto:
    return _plugin_node("VarlenAttention", [q, k, v, cu_seqlens], [out], name, scale=float(scale),
                        causal=int(bool(causal)))


def make_kv_cache_attention_node(q: str, k: str, v: str, past_key: str, past_value: str, past_lengths: str,
                                 out: str, present_key: str, present_value: str, scale: float,
                                 name: str | None = None) -> onnx.NodeProto:
    return _plugin_node("KVCacheAttention", [q, k, v, past_key, past_value, past_lengths],
                        [out, present_key, present_value], name, scale=float(scale))


def make_moe_experts_node(x: str, ids: str, weights: str, gate_up: str, gate_up_scale: str, down: str,
                          down_scale: str, y: str, top_k: int, gate_up_block_size: int, down_block_size: int,
                          name: str | None = None) -> onnx.NodeProto:
    return _plugin_node("MoEExperts", [x, ids, weights, gate_up, gate_up_scale, down, down_scale], [y], name,
                        top_k=int(top_k), gate_up_block_size=int(gate_up_block_size),
                        down_block_size=int(down_block_size))


# ---- function bodies ---------------------------------------------------------------------------------
def function(op: str, inputs, outputs, body: FunctionBody, doc: str) -> onnx.FunctionProto:
    """The model-local FunctionProto of qwen_vl op `op` with `body` (its attributes: OP_ATTRIBUTES + plugin ones)."""
    return _function(op, inputs, outputs, body, doc)


def _function(op: str, inputs, outputs, body: FunctionBody, doc: str) -> onnx.FunctionProto:
    return helper.make_function(DOMAIN, op, list(inputs), list(outputs), body.nodes,
                                [helper.make_opsetid("", OPSET)],
                                attributes=list(OP_ATTRIBUTES[op]) + list(_PLUGIN_ATTRS), doc_string=doc)


def mrope_function() -> onnx.FunctionProto:
    b = FunctionBody()
    inv_freq = b.attr_const("inv_freq", "value_floats", AttributeProto.FLOATS)  # [D/2]
    axis = b.attr_const("axis", "value_ints", AttributeProto.INTS)  # [D/2]
    pos = b.op("Gather", ["positions", axis], axis=-1)  # [N..., D/2] the position feeding each frequency
    angle = b.op("Mul", [b.f32(pos), inv_freq])  # fp32 like HF (inv_freq @ position_ids in fp32)
    emb = b.op("Unsqueeze", [b.op("Concat", [angle, angle], axis=-1), b.const([-2])])  # [N..., 1, D]
    x = b.f32("x")  # rotation in fp32, cast back at the end
    half = b.op("Div", [b.dim("x", -1), b.const([2])])
    x1 = b.op("Slice", [x, b.const([0]), half, b.const([-1])])
    x2 = b.op("Slice", [x, half, b.const([np.iinfo(np.int64).max]), b.const([-1])])
    rot = b.op("Concat", [b.op("Neg", [x2]), x1], axis=-1)  # rotate_half
    y = b.op("Add", [b.op("Mul", [x, b.op("Cos", [emb])]), b.op("Mul", [rot, b.op("Sin", [emb])])])
    b.nodes.append(helper.make_node("CastLike", [y, "x"], ["y"]))
    return _function("MRoPE", ["x", "positions"], ["y"], b, "Multi-axis rotary embedding (plugins/README.md)")


def _attention(b: FunctionBody, q: str, k: str, v: str, mask: str, scale: str, rank: int) -> str:
    """softmax(q k^T * scale | mask) v, all fp32 (HF eager attention takes the softmax in fp32).
    q [..., Hkv, G, Sq, D]; k, v [..., Hkv, 1, Sk, D] (GQA by broadcasting); mask -> [..., Sq, Sk]."""
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    scores = b.op("Mul", [b.op("MatMul", [q, b.op("Transpose", [k], perm=perm)]), scale])
    scores = b.op("Where", [mask, scores, b.const(NEG_INF, np.float32)])
    return b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])


def varlen_attention_function() -> onnx.FunctionProto:
    b = FunctionBody()
    scale = b.attr_const("scale", "value_float", AttributeProto.FLOAT)
    causal = b.attr_const("causal", "value_int", AttributeProto.INT)
    n_tok = b.dim("q", 0)  # [1] = T
    tok = b.op("Range", [b.const(0), b.op("Squeeze", [n_tok]), b.const(1)])  # [T]
    ends = b.op("Slice", [b.op("Cast", ["cu_seqlens"], to=TensorProto.INT64), b.const([1]),
                          b.const([np.iinfo(np.int64).max]), b.const([0])])  # [n]
    ge = b.op("GreaterOrEqual", [b.op("Unsqueeze", [tok, b.const([1])]), b.op("Unsqueeze", [ends, b.const([0])])])
    seg = b.op("ReduceSum", [b.op("Cast", [ge], to=TensorProto.INT64), b.const([1])], keepdims=0)  # [T] segment id
    same = b.op("Equal", [b.op("Unsqueeze", [seg, b.const([1])]), b.op("Unsqueeze", [seg, b.const([0])])])  # [T, T]
    lower = b.op("LessOrEqual", [b.op("Unsqueeze", [tok, b.const([0])]), b.op("Unsqueeze", [tok, b.const([1])])])
    no_causal = b.op("Equal", [causal, b.const(0)])
    mask = b.op("And", [same, b.op("Or", [lower, no_causal])])  # [Tq, Tk]
    # GQA: q [T, Hq, D] -> [Hkv, G, T, D]; k, v [T, Hkv, D] -> [Hkv, 1, T, D]
    hkv = b.dim("k", 1)
    q5 = b.op("Reshape", [b.f32("q"), b.op("Concat", [n_tok, hkv, b.const([-1]), b.dim("q", 2)], axis=0)])
    qg = b.op("Transpose", [q5], perm=[1, 2, 0, 3])
    kg, vg = (b.op("Unsqueeze", [b.op("Transpose", [b.f32(t)], perm=[1, 0, 2]), b.const([1])]) for t in ("k", "v"))
    out = _attention(b, qg, kg, vg, mask, scale, 4)  # [Hkv, G, T, D]
    out = b.op("Reshape", [b.op("Transpose", [out], perm=[2, 0, 1, 3]), b.op("Shape", ["q"])])  # [T, Hq, D]
    b.nodes.append(helper.make_node("CastLike", [out, "q"], ["o"]))
    return _function("VarlenAttention", ["q", "k", "v", "cu_seqlens"], ["o"], b,
                     "Attention within cu_seqlens segments, GQA (plugins/README.md)")


def kv_cache_attention_function() -> onnx.FunctionProto:
    b = FunctionBody()
    scale = b.attr_const("scale", "value_float", AttributeProto.FLOAT)
    # Cache write: ScatterElements on the row axis (no reduction; TensorRT parses it, ScatterND+add it does not).
    kt, vt = (b.op("Transpose", [t], perm=[0, 2, 1, 3]) for t in ("k", "v"))  # [B, Hkv, S, D]
    n_seq = b.dim("q", 1)  # [1] = S
    s_idx = b.op("Range", [b.const(0), b.op("Squeeze", [n_seq]), b.const(1)])  # [S]
    past = b.op("Cast", ["past_lengths"], to=TensorProto.INT64)  # [B]
    row = b.op("Add", [b.op("Unsqueeze", [past, b.const([1])]), b.op("Unsqueeze", [s_idx, b.const([0])])])  # [B, S]
    idx = b.op("Expand", [b.op("Unsqueeze", [row, b.const([1, 3])]), b.op("Shape", [kt])])  # [B, Hkv, S, D]
    b.nodes.append(helper.make_node("ScatterElements", ["past_key", idx, kt], ["present_key"], axis=2))
    b.nodes.append(helper.make_node("ScatterElements", ["past_value", idx, vt], ["present_value"], axis=2))
    # Causal mask over cache rows: key j is visible to query s of batch b iff j <= past_lengths[b] + s.
    kpos = b.op("Range", [b.const(0), b.op("Squeeze", [b.dim("past_key", 2)]), b.const(1)])  # [C]
    allowed = b.op("LessOrEqual", [b.op("Unsqueeze", [kpos, b.const([0, 1])]),
                                   b.op("Unsqueeze", [row, b.const([2])])])  # [B, S, C]
    mask = b.op("Unsqueeze", [allowed, b.const([1, 2])])  # [B, 1, 1, S, C]
    # GQA: q [B, S, Hq, D] -> [B, Hkv, G, S, D]; present [B, Hkv, C, D] -> [B, Hkv, 1, C, D]
    shape5 = b.op("Concat", [b.dim("q", 0), n_seq, b.dim("k", 2), b.const([-1]), b.dim("q", 3)], axis=0)
    qg = b.op("Transpose", [b.op("Reshape", [b.f32("q"), shape5])], perm=[0, 2, 3, 1, 4])
    kc, vc = (b.op("Unsqueeze", [b.f32(t), b.const([2])]) for t in ("present_key", "present_value"))
    out = _attention(b, qg, kc, vc, mask, scale, 5)  # [B, Hkv, G, S, D]
    out = b.op("Reshape", [b.op("Transpose", [out], perm=[0, 3, 1, 2, 4]), b.op("Shape", ["q"])])  # [B, S, Hq, D]
    b.nodes.append(helper.make_node("CastLike", [out, "q"], ["o"]))
    return _function("KVCacheAttention", ["q", "k", "v", "past_key", "past_value", "past_lengths"],
                     ["o", "present_key", "present_value"], b,
                     "One decoder step: in-place cache write + causal GQA attention (plugins/README.md)")


class ModelBody(FunctionBody):
    """A function body that export/moe.py's graph helpers can write into (they take a GraphBuilder): the graph
    dtype, `const(value, dtype)` as Constant nodes, no name scopes."""

    def __init__(self, dtype: str):
        super().__init__()
        self.dtype = dtype

    def scope(self, name: str):
        return contextlib.nullcontext()


def block_dequantize(b: FunctionBody, q: str, scale: str, block_attr: str) -> str:
    """DequantizeLinear(q, scale, axis=1) with block_size = the function attribute `block_attr`."""
    out = f"_{q}_dequantized"
    node = helper.make_node("DequantizeLinear", [q, scale], [out], axis=1)
    node.attribute.append(helper.make_attribute_ref("block_size", AttributeProto.INT, ref_attr_name=block_attr))
    b.nodes.append(node)
    return out


FUNCTIONS = {
    "MRoPE": mrope_function,
    "VarlenAttention": varlen_attention_function,
    "KVCacheAttention": kv_cache_attention_function,
}


# ops whose bodies are made per model (export/moe.py `moe_experts_function`): the exporter adds them
MODEL_FUNCTIONS = ("MoEExperts",)


def inlined_for_tensorrt(onnx_path) -> bytes | None:
    """The graph at `onnx_path` with its MoEExperts calls replaced by their bodies (values and nodes renamed per
    call, onnx.inliner), for TensorRT without libqwen_vl_plugins.so; None when the graph has none. TensorRT's
    importer names each inlined DequantizeLinear layer after the body's node and refuses the second call of the
    same body ("Failed attempt to rename a layer ... name is already in use", TensorRT-RTX 1.7), so it cannot
    inline MoEExperts itself in a model with more than one MoE layer. External data stays where it is."""
    import onnx.inliner

    model = onnx.load(str(onnx_path), load_external_data=False)
    ops = sorted({(n.domain, n.op_type) for n in _nodes(model.graph)} & {(DOMAIN, op) for op in MODEL_FUNCTIONS})
    if not ops:
        return None
    return onnx.inliner.inline_selected_functions(model, ops).SerializeToString()


def _nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:  # subgraphs (If / Loop bodies)
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _nodes(g)


def functions_for(model: onnx.ModelProto) -> list[onnx.FunctionProto]:
    """The reference FunctionProtos of the qwen_vl ops that `model`'s graph uses (each once, sorted by name)."""
    used = {n.op_type for n in _nodes(model.graph) if n.domain == DOMAIN} - set(MODEL_FUNCTIONS)
    unknown = used - set(FUNCTIONS)
    if unknown:
        raise ValueError(f"unknown {DOMAIN} ops {sorted(unknown)}; known: {sorted(FUNCTIONS)}")
    return [FUNCTIONS[op]() for op in sorted(used)]


def add_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Attach (or replace) the function protos `model` needs and import the qwen_vl domain; returns `model`."""
    fns = functions_for(model)
    names = {f.name for f in fns}
    kept = [f for f in model.functions if not (f.domain == DOMAIN and f.name in names)]
    del model.functions[:]
    model.functions.extend(kept + fns)
    if fns and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return model
