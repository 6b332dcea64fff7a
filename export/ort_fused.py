"""`decoder.ort.onnx`: decoder.onnx with its attention and rotary nodes as ONNX Runtime's fused contrib ops.

decoder.onnx carries each attention / rotary op as a `qwen_vl` plugin node whose model-local function holds the
reference body (export/ops.py): TensorRT runs our plugin kernels, ONNX Runtime inlines the bodies (MatMul,
Softmax and a ScatterElements copy of the whole KV cache per layer and step). For the ONNX Runtime backend this
module rewrites those nodes into the ops ONNX Runtime ships fused kernels for, on the CPU and the CUDA EP:

| decoder.onnx (`qwen_vl`) | decoder.ort.onnx (`com.microsoft`) |
|---|---|
| `MRoPE(x [B,S,H,D], positions)` | `RotaryEmbedding(x [B,S,H*D], rotary_ids [B,S], cos [B*S,D/2], sin)`: one cos/sin row per token, built once per step for all layers from `position_ids` (frequency i takes axis `axis[i]`, the tables of export/rotary.py) |
| `KVCacheAttention(q, k, v, past_key, past_value, past_lengths)` | `GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total_sequence_length)`: writes the step's K/V at rows past_lengths[b].. and attends causally, in place when past and present are one buffer |

Same file contract as decoder.onnx (export/contracts.py), same weights: the initializers still point into
`decoder.onnx.data`, so the rewrite writes only a small graph file. The TensorRT engines are built from
decoder.onnx; this file is for ONNX Runtime only.

GroupQueryAttention's inputs from the contract's: `seqlens_k[b] = past_lengths[b] + S - 1` (int32; every row of
the step counts, as in decoder.onnx: right padding is written and later overwritten), `total_sequence_length =
S` when S > 1 (a prompt into an empty cache: ONNX Runtime requires it then) else cache_len (a decode step;
the kernel reads its lengths from seqlens_k). Both come from shapes only, so no device value is read on the host
and the decode step stays capturable as a CUDA graph. Restriction (ONNX Runtime's, checked by the runtime):
a step with S > 1 and B > 1 must start from an empty cache (`past_lengths` all 0), the way runtime/generate.py
prefills; a single sequence may continue a cache with S > 1.

Rounding: the cos/sin rows are computed in fp32 (HF: `inv_freq @ position` in fp32) and cast to the graph
dtype, as HF does before `apply_rotary_pos_emb`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .plugin_ops import DOMAIN
from .spec import ModelSpec

ORT_DOMAIN = "com.microsoft"
FUSED_SUFFIX = ".ort.onnx"
_PREFIX = "ort_fused"


def fused_path(onnx_path: Path) -> Path:
    """decoder.onnx -> decoder.ort.onnx"""
    return onnx_path.with_name(onnx_path.name[: -len(".onnx")] + FUSED_SUFFIX)


def write_fused_decoder(decoder_onnx: Path, spec: ModelSpec) -> Path:
    """Rewrite `decoder_onnx` (weights left where they are) into decoder.ort.onnx next to it; returns its path."""
    decoder_onnx = Path(decoder_onnx)
    model = onnx.load(str(decoder_onnx), load_external_data=False)
    fuse_decoder(model, spec)
    out = fused_path(decoder_onnx)
    onnx.save_model(model, str(out))
    return out


def fuse_decoder(model: onnx.ModelProto, spec: ModelSpec) -> onnx.ModelProto:
    """In place: every top-level qwen_vl MRoPE / KVCacheAttention node of a decoder graph -> contrib ops."""
    g = model.graph
    dtype = {i.name: i.type.tensor_type.elem_type for i in g.input}["inputs_embeds"]
    t = spec.text
    new_nodes: list[onnx.NodeProto] = []
    shared = _Shared(new_nodes, dtype)
    rewritten = 0
    for node in g.node:
        if node.domain == DOMAIN and node.op_type == "MRoPE":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            cos, sin = shared.rotary_tables(attrs["inv_freq"], attrs["axis"])
            _rope(new_nodes, node, cos, sin, shared.rotary_ids(), t.head_dim)
            rewritten += 1
        elif node.domain == DOMAIN and node.op_type == "KVCacheAttention":
            scale = {a.name: helper.get_attribute_value(a) for a in node.attribute}["scale"]
            _gqa(new_nodes, node, shared.seqlens_k(), shared.total_sequence_length(), scale,
                 t.num_attention_heads, t.num_key_value_heads, t.head_dim)
            rewritten += 1
        else:
            new_nodes.append(node)
    if not rewritten:
        raise ValueError(f"{g.name}: no {DOMAIN} MRoPE / KVCacheAttention node to rewrite (not a decoder graph?)")
    del g.node[:]
    g.node.extend(_bypass_output_identities(new_nodes, g))
    _prune_dead_nodes(g)
    used = {n.op_type for n in g.node if n.domain == DOMAIN}
    kept = [f for f in model.functions if not (f.domain == DOMAIN and f.name not in used)]
    del model.functions[:]
    model.functions.extend(kept)
    opsets = [o for o in model.opset_import if not (o.domain == DOMAIN and not used) and o.domain != ORT_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(opsets + [helper.make_opsetid(ORT_DOMAIN, 1)])
    model.doc_string = (model.doc_string + "\n\n" if model.doc_string else "") + __doc__.split("\n\n")[0]
    return model


class _Shared:
    """Values computed once per step and read by every layer (built on first use)."""

    def __init__(self, nodes: list, dtype: int):
        self.nodes, self.dtype, self.memo = nodes, dtype, {}

    def op(self, op_type: str, inputs, name: str, **attrs) -> str:
        out = f"{_PREFIX}/{name}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def const(self, value) -> str:
        """A Constant node per distinct value."""
        value = np.asarray(value)
        key = ("const", value.dtype.str, value.shape, value.tobytes())
        if key not in self.memo:
            out = self.memo[key] = f"{_PREFIX}/const{sum(k[0] == 'const' for k in self.memo)}"
            self.nodes.append(helper.make_node("Constant", [], [out], name=out,
                                               value=numpy_helper.from_array(value, out)))
        return self.memo[key]

    def _once(self, key, build):
        if key not in self.memo:
            self.memo[key] = build()
        return self.memo[key]

    def step_dims(self) -> tuple[str, str, str]:
        """(S [1], B*S [1], (B, S) [2]) int64 from position_ids' shape [3, B, S] (shape arithmetic only)."""
        def build():
            shape = self.op("Shape", ["position_ids"], "pos_shape")  # [3, B, S]
            bs = self.op("Slice", [shape, self.const(np.array([1], np.int64)),
                                   self.const(np.array([3], np.int64))], "batch_seq")  # [B, S]
            s = self.op("Slice", [shape, self.const(np.array([2], np.int64)),
                                  self.const(np.array([3], np.int64))], "seq")  # [S]
            n = self.op("ReduceProd", [bs], "tokens", keepdims=1)  # [B*S]
            return s, n, bs
        return self._once("dims", build)

    def rotary_ids(self) -> str:
        """int64 [B, S]: token b*S + s reads cos/sin row b*S + s."""
        def build():
            _, n, bs = self.step_dims()
            flat = self.op("Range", [self.const(np.array(0, np.int64)),
                                     self.op("Squeeze", [n], "tokens_scalar"),
                                     self.const(np.array(1, np.int64))], "token_range")
            return self.op("Reshape", [flat, bs], "rotary_ids")
        return self._once("rotary_ids", build)

    def rotary_tables(self, inv_freq, axis) -> tuple[str, str]:
        """cos, sin [B*S, D/2] in the graph dtype: row b*S+s, column i = cos/sin(position_ids[axis[i], b, s] * inv_freq[i])."""
        inv = np.asarray(inv_freq, np.float32)
        ax = np.asarray(axis, np.int64)
        key = ("tables", inv.tobytes(), ax.tobytes())

        def build():
            k = sum(m[0] == "tables" for m in self.memo)
            per_freq = self.op("Gather", ["position_ids", self.const(ax)], f"pos_by_freq{k}", axis=0)
            tokens = self.op("Transpose", [per_freq], f"pos_tokens{k}", perm=[1, 2, 0])  # [B, S, D/2]
            flat = self.op("Reshape", [tokens, self.const(np.array([-1, ax.size], np.int64))],
                           f"pos_rows{k}")  # [B*S, D/2]
            angle = self.op("Mul", [self.op("Cast", [flat], f"pos_f32_{k}", to=TensorProto.FLOAT),
                                    self.const(inv)], f"angle{k}")
            out = []
            for fn in ("Cos", "Sin"):
                v = self.op(fn, [angle], f"{fn.lower()}{k}_f32")
                if self.dtype != TensorProto.FLOAT:
                    v = self.op("Cast", [v], f"{fn.lower()}{k}", to=self.dtype)
                out.append(v)
            return tuple(out)
        return self._once(key, build)

    def seqlens_k(self) -> str:
        """int32 [B]: past_lengths + S - 1 (the last row each sequence holds after the step)."""
        def build():
            s, _, _ = self.step_dims()
            last = self.op("Sub", [self.op("Add", ["past_lengths", s], "total_lengths"),
                                   self.const(np.array([1], np.int64))], "last_rows")
            return self.op("Cast", [last], "seqlens_k", to=TensorProto.INT32)
        return self._once("seqlens_k", build)

    def total_sequence_length(self) -> str:
        """int32 scalar: S when S > 1 (prompt into an empty cache), else cache_len (from past_key.0's shape)."""
        def build():
            s, _, _ = self.step_dims()
            cache_shape = self.op("Shape", ["past_key.0"], "cache_shape")  # [B, Hkv, K, D]
            cap = self.op("Slice", [cache_shape, self.const(np.array([2], np.int64)),
                                    self.const(np.array([3], np.int64))], "cache_len")
            prompt = self.op("Greater", [s, self.const(np.array([1], np.int64))], "is_prompt")
            total = self.op("Where", [prompt, s, cap], "total_i64")
            return self.op("Cast", [self.op("Squeeze", [total], "total_scalar")], "total_sequence_length",
                           to=TensorProto.INT32)
        return self._once("total", build)


def _reshape(nodes: list, x: str, dims, out: str) -> str:
    shape = f"{out}/shape"
    nodes.append(helper.make_node("Constant", [], [shape], name=shape,
                                  value=numpy_helper.from_array(np.array(dims, np.int64), shape)))
    nodes.append(helper.make_node("Reshape", [x, shape], [out], name=out))
    return out


def _rope(nodes: list, node: onnx.NodeProto, cos: str, sin: str, rotary_ids: str, head_dim: int) -> None:
    """MRoPE x [B,S,H,D] -> RotaryEmbedding on [B,S,H*D] (rotate-half: interleaved=0) -> [B,S,H,D]."""
    base = node.name or node.output[0]
    x3 = _reshape(nodes, node.input[0], [0, 0, -1], f"{base}/x_bsh")
    y3 = f"{base}/rotary"
    nodes.append(helper.make_node("RotaryEmbedding", [x3, rotary_ids, cos, sin], [y3], name=y3,
                                  domain=ORT_DOMAIN, interleaved=0))
    _reshape(nodes, y3, [0, 0, -1, head_dim], node.output[0])


def _gqa(nodes: list, node: onnx.NodeProto, seqlens_k: str, total: str, scale: float, n_q: int, n_kv: int,
         head_dim: int) -> None:
    """KVCacheAttention (q/k/v [B,S,H,D]) -> GroupQueryAttention on [B,S,H*D]; present outputs keep their names."""
    base = node.name or node.output[0]
    q, k, v, past_k, past_v, _ = node.input
    flat = [_reshape(nodes, x, [0, 0, -1], f"{base}/{n}_bsh") for x, n in ((q, "q"), (k, "k"), (v, "v"))]
    o3 = f"{base}/attention"
    nodes.append(helper.make_node("GroupQueryAttention", [*flat, past_k, past_v, seqlens_k, total],
                                  [o3, node.output[1], node.output[2]], name=f"{base}/gqa", domain=ORT_DOMAIN,
                                  num_heads=n_q, kv_num_heads=n_kv, scale=float(scale)))
    _reshape(nodes, o3, [0, 0, -1, head_dim], node.output[0])


def _bypass_output_identities(nodes: list, g: onnx.GraphProto) -> list:
    """GroupQueryAttention writes its cache in place only when its present output IS the bound graph output:
    drop the Identity between a present value and its graph output by renaming the value."""
    outputs = {o.name for o in g.output}
    gqa_outs = {o for n in nodes if n.op_type == "GroupQueryAttention" for o in n.output[1:]}
    rename = {n.input[0]: n.output[0] for n in nodes
              if n.op_type == "Identity" and n.input[0] in gqa_outs and n.output[0] in outputs}
    kept = []
    for n in nodes:
        if n.op_type == "Identity" and n.input[0] in rename:
            continue
        for i, name in enumerate(n.output):
            if name in rename:
                n.output[i] = rename[name]
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
        kept.append(n)
    return kept


def _prune_dead_nodes(g: onnx.GraphProto) -> None:
    """Drop nodes none of whose outputs is read (the int32 casts and the position transpose the plugin nodes read)."""
    while True:
        read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        for n in g.node:  # values read inside subgraphs (Loop bodies) count too
            for a in n.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    read |= _names_read(sub)
        dead = [i for i, n in enumerate(g.node) if not any(o in read for o in n.output if o)]
        if not dead:
            return
        for i in reversed(dead):
            del g.node[i]


def _names_read(g: onnx.GraphProto) -> set:
    names = {i for n in g.node for i in n.input}
    for n in g.node:
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                names |= _names_read(sub)
    return names
