"""`vision.ort.onnx` / `decoder.ort.onnx`: the plugin graphs with their attention, rotary and RMSNorm nodes as
ONNX Runtime's fused kernels.

vision.onnx and decoder.onnx carry each attention / rotary op as a `qwen_vl` plugin node whose model-local
function holds the reference body (export/ops.py): TensorRT runs our plugin kernels, ONNX Runtime inlines the
bodies (fp32 MatMul/Softmax over a [T, T] mask for vision; for the decoder a ScatterElements copy of the whole
KV cache per layer and step). For the ONNX Runtime backend this module rewrites them into ops that ONNX Runtime
has fused CPU and CUDA kernels for:

| plugin graph (`qwen_vl`) | `*.ort.onnx` |
|---|---|
| `MRoPE(x, positions)` | `com.microsoft.RotaryEmbedding` on [B,S,H*D] (vision [1,T,H*D]), cos/sin "cache" = one row per token of this call, `cos(positions[n, axis[i]] * inv_freq[i])` (the tables of export/rotary.py), built once per call for all layers |
| `KVCacheAttention(q, k, v, past_key, past_value, past_lengths)` | `com.microsoft.GroupQueryAttention`: writes the step's K/V at rows past_lengths[b].. and attends causally, in place when present is bound to past |
| `VarlenAttention(q, k, v, cu_seqlens)` (vision) | segments gathered into a right-padded batch, `com.microsoft.MultiHeadAttention` (key_padding_mask only when the lengths differ), rows gathered back |
| `qwen_vl_trt.RMSNorm(x, weight)` (export/layers.py) | `SimplifiedLayerNormalization` (fp32 statistics); in the decoder, with the residual Add before it, `com.microsoft.SkipSimplifiedLayerNormalization` |
| `DequantizeLinear(int4) -> MatMul` of q, k, v (and of gate, up): products of one activation | one `DequantizeLinear(int4) -> MatMul` over the concatenated columns, then `Split` (export/int4.py `fuse_int4_products`; the concatenated weights in `decoder.ort.onnx.data`): one wider MatMulNBits per group, measured faster on the CPU |
| `DequantizeLinear(int4) -> MatMul` (`--weights int4`, bf16 decoder only) | `com.microsoft.MatMulNBits` with its weights in `decoder.ort.onnx.data` (export/int4.py; for fp32/fp16 ONNX Runtime fuses the pair itself) |
| `qwen_vl::MoEExperts` on INT4 experts (`--weights experts=int4`) | `com.microsoft.QMoE` fed the router logits, its weights in `decoder.ort.onnx.data` (export/moe_ort.py; FP8 experts keep the node's reference body) |

Same file contract (model/contracts.py) and same weights: the initializers still point into `<graph>.onnx.data`,
so the rewrite writes only a small graph file (INT4 decoders also decoder.ort.onnx.data, above). TensorRT engines are built from the plugin graphs.

GroupQueryAttention's extra inputs come from the contract's: `seqlens_k[b] = past_lengths[b] + S - 1` (int32;
every row of the step counts, as in decoder.onnx: right padding is written and later overwritten), and
`total_sequence_length` = S when S > 1 and B > 1, else cache_len. ONNX Runtime's contract for them (CPU and CUDA
share its input check, microsoft/onnxruntime:onnxruntime/contrib_ops/cpu/bert/group_query_attention_helper.h
`CheckInputs`; "continuous decoding", microsoft/onnxruntime#21523, onnxruntime >= 1.20):
- S == total_sequence_length: a first prompt; every sequence's past is 0 (rows 0..seqlens_k[b] are this step's);
- S > 1 and S != total_sequence_length: a "subsequent prompt", B must be 1; the sequence's past is
  seqlens_k[0] + 1 - S rows, so its S rows continue them (chunked prefill, a prompt after a reused prefix);
- S == 1: a decode step; each sequence's past is seqlens_k[b] rows.
`total_sequence_length` is otherwise only a bound (present length = max(it, past's K)): cache_len for B = 1 makes
every one-sequence prompt a subsequent prompt, right from an empty cache (past = 0) and after rows already there;
a batch of prompts (runtime/generate.py) keeps S and so must start from an empty cache (`past_lengths` all 0).
Host values (shapes) only ever reach host slots of the kernels (Reshape shapes, `total_sequence_length`,
ConstantOfShape's shape); S - 1 and the rotary row ids are counted on the device. So the CUDA EP has no Memcpy
node in the decoder, the condition for capturing the decode step as a CUDA graph (a past + S total would be read
back from `past_lengths` on the device).

Rounding: cos/sin in fp32 (HF: `inv_freq @ position` in fp32), cast to the graph dtype as HF does; RMSNorm rounds
to the graph dtype once, after the weight (HF: before and after): equal in fp32, at most one bf16 ulp apart.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qwen_vl_trt.model.spec import ModelSpec

from .onnx_graph import FUNCTION_DOMAIN
from .plugin_ops import DOMAIN

ORT_DOMAIN = "com.microsoft"
FUSED_SUFFIX = ".ort.onnx"
_PREFIX = "ort_fused"


def fused_path(onnx_path: Path) -> Path:
    """decoder.onnx -> decoder.ort.onnx"""
    return onnx_path.with_name(onnx_path.name[: -len(".onnx")] + FUSED_SUFFIX)


def write_fused(graph_onnx: Path, spec: ModelSpec) -> Path:
    """Rewrite vision.onnx or decoder.onnx (weights left where they are) into <graph>.ort.onnx next to it."""
    graph_onnx = Path(graph_onnx)
    kind = graph_onnx.name[: -len(".onnx")]
    model = onnx.load(str(graph_onnx), load_external_data=False)
    {"decoder": fuse_decoder, "vision": fuse_vision}[kind](model, spec)
    out = fused_path(graph_onnx)
    nbits_data_path(out).unlink(missing_ok=True)  # every writer below appends to it
    fused_int4 = []
    if kind == "decoder":  # INT4 products reading one activation (q/k/v, gate/up) -> one wider product each
        from .int4 import fuse_int4_products

        fused_int4 = fuse_int4_products(model, graph_onnx.parent)
    if kind == "decoder" and _activation_dtype(model.graph) == TensorProto.BFLOAT16:
        # INT4 decoders (export/int4.py): ONNX Runtime fuses DequantizeLinear + MatMul for fp32/fp16 only
        from .int4 import to_matmul_nbits

        to_matmul_nbits(model, graph_onnx.parent, nbits_data_path(out))
    if kind == "decoder":  # INT4 MoE experts (export/moe_quant.py) -> QMoE, weights appended to the same file
        from .moe_ort import to_qmoe

        if to_qmoe(model, graph_onnx.parent, nbits_data_path(out)):
            _prune_dead_nodes(model.graph)  # the routers' softmax / top-k, now inside QMoE
            _drop_unread(model)
    if fused_int4:  # fp32/fp16: the concatenated INT4 weights that ONNX Runtime fuses at session creation
        from .int4 import store_in_memory_initializers

        store_in_memory_initializers(model, nbits_data_path(out), fused_int4)
    onnx.save_model(model, str(out))
    return out


def nbits_data_path(ort_onnx: Path) -> Path:
    """decoder.ort.onnx -> decoder.ort.onnx.data: an INT4 decoder's fused q|k|v and gate|up weights
    (export/int4.py fuse_int4_products), the MatMulNBits weights of a bf16 INT4 decoder and the QMoE weights of
    INT4 MoE experts (export/moe_ort.py); absent otherwise."""
    return ort_onnx.with_name(ort_onnx.name + ".data")


def fuse_decoder(model: onnx.ModelProto, spec: ModelSpec) -> onnx.ModelProto:
    """In place: every top-level qwen_vl MRoPE / KVCacheAttention node of a decoder graph -> contrib ops, each
    RMSNorm that reads a residual sum fused with that Add."""
    _fuse(model, spec.text.num_attention_heads, spec.text.num_key_value_heads, spec.text.head_dim, rank=4)
    _fuse_skip_norms(model.graph)
    return model


def fuse_vision(model: onnx.ModelProto, spec: ModelSpec) -> onnx.ModelProto:
    """In place: every top-level qwen_vl MRoPE / VarlenAttention node of a vision graph -> contrib ops."""
    v = spec.vision
    return _fuse(model, v.num_heads, v.num_heads, v.hidden_size // v.num_heads, rank=3)


def _fuse(model: onnx.ModelProto, n_q: int, n_kv: int, head_dim: int, rank: int) -> onnx.ModelProto:
    g = model.graph
    new_nodes: list[onnx.NodeProto] = []
    shared = _Shared(new_nodes, g)
    rewritten = 0
    for node in g.node:
        if node.domain != DOMAIN:
            new_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MRoPE":
            cos, sin = shared.rotary_tables(node.input[1], attrs["inv_freq"], attrs["axis"])
            _rope(new_nodes, node, cos, sin, shared.rotary_ids(node.input[0], rank), head_dim, rank, n_q)
        elif node.op_type == "KVCacheAttention":
            _gqa(new_nodes, node, shared.seqlens_k(), shared.total_sequence_length(), attrs["scale"], n_q, n_kv,
                 head_dim)
        elif node.op_type == "VarlenAttention" and not attrs.get("causal", 0) and n_q == n_kv:
            _padded_mha(new_nodes, node, shared, attrs["scale"], n_q, head_dim)
        else:
            new_nodes.append(node)
            continue
        rewritten += 1
    if not rewritten:
        raise ValueError(f"{g.name}: no {DOMAIN} node to rewrite")
    del g.node[:]
    g.node.extend(_bypass_output_identities(new_nodes, g))
    _fuse_rms_norms(g)
    _prune_dead_nodes(g)
    used = {(n.domain, n.op_type) for n in g.node}
    kept = [f for f in model.functions if (f.domain, f.name) in used]
    del model.functions[:]
    model.functions.extend(kept)
    domains = {d for d, _ in used}
    opsets = [o for o in model.opset_import
              if o.domain != ORT_DOMAIN and not (o.domain in (DOMAIN, FUNCTION_DOMAIN) and o.domain not in domains)]
    del model.opset_import[:]
    model.opset_import.extend(opsets + [helper.make_opsetid(ORT_DOMAIN, 1)])
    model.doc_string = (model.doc_string + "\n\n" if model.doc_string else "") + __doc__.split("\n\n")[0]
    return model


def _activation_dtype(graph: onnx.GraphProto) -> int:
    """The graph dtype: that of present_key.0 (decoder) or vision_features (vision); logits are always fp32."""
    return next(o.type.tensor_type.elem_type for o in graph.output if o.name != "logits")


class _Shared:
    """Values computed once per graph call and read by every layer (built on first use)."""

    def __init__(self, nodes: list, graph: onnx.GraphProto):
        self.nodes, self.memo, self.names = nodes, {}, set()
        self.dtype = _activation_dtype(graph)

    def op(self, op_type: str, inputs, name: str, **attrs) -> str:
        out = f"{_PREFIX}/{name}"
        while out in self.names:
            out += "_"
        self.names.add(out)
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

    def _count(self, kind: str) -> int:
        return sum(k[0] == kind for k in self.memo if isinstance(k, tuple))

    def ones(self, dims: str, name: str) -> str:
        """int64 ones of shape `dims` (a host shape value), made on the EP's device: ConstantOfShape reads its
        shape on the host, so nothing computed on the host flows into a device kernel (no Memcpy node, which
        would stop ONNX Runtime from capturing the decode step as a CUDA graph)."""
        one = numpy_helper.from_array(np.array([1], np.int64), f"{_PREFIX}/{name}_value")
        return self.op("ConstantOfShape", [dims], name, value=one)

    def rotary_ids(self, x: str, rank: int) -> str:
        """int64 [B, S] (decoder, x [B,S,H,D]) or [1, T] (vision, x [T,H,D]): token n reads cos/sin row n,
        counted on the device (CumSum of ones) rather than by a host Range."""
        def build():
            k = self._count("ids")
            lead = self.op("Slice", [self.op("Shape", [x], f"x_shape{k}"), self.const(np.array([0], np.int64)),
                                     self.const(np.array([rank - 2], np.int64))], f"token_dims{k}")  # [B, S] | [T]
            flat = self.op("Reshape", [self.ones(lead, f"token_ones{k}"), self.const(np.array([-1], np.int64))],
                           f"token_ones_flat{k}")
            count = self.op("CumSum", [flat, self.const(np.array(0, np.int64))], f"token_count{k}")  # 1..N
            ids = self.op("Sub", [count, self.const(np.array([1], np.int64))], f"token_index{k}")  # 0..N-1
            if rank == 3:
                return self.op("Unsqueeze", [ids, self.const(np.array([0], np.int64))], f"rotary_ids{k}")
            return self.op("Reshape", [ids, lead], f"rotary_ids{k}")
        return self._once(("ids", rank), build)  # every layer's q / k has the same token dims

    def rotary_tables(self, positions: str, inv_freq, axis) -> tuple[str, str]:
        """cos, sin [N, D/2] in the graph dtype from positions [..., A] (the MRoPE node's int32 input, N tokens):
        row n, column i = cos/sin(positions[n, axis[i]] * inv_freq[i]), in fp32 as HF computes them."""
        inv = np.asarray(inv_freq, np.float32)
        ax = np.asarray(axis, np.int64)

        def build():
            k = self._count("tables")
            per_freq = self.op("Gather", [positions, self.const(ax)], f"pos_by_freq{k}", axis=-1)  # [..., D/2]
            flat = self.op("Reshape", [per_freq, self.const(np.array([-1, ax.size], np.int64))],
                           f"pos_rows{k}")  # [N, D/2]
            angle = self.op("Mul", [self.op("Cast", [flat], f"pos_f32_{k}", to=TensorProto.FLOAT),
                                    self.const(inv)], f"angle{k}")
            out = []
            for fn in ("Cos", "Sin"):
                v = self.op(fn, [angle], f"{fn.lower()}{k}_f32")
                if self.dtype != TensorProto.FLOAT:
                    v = self.op("Cast", [v], f"{fn.lower()}{k}", to=self.dtype)
                out.append(v)
            return tuple(out)
        return self._once(("tables", positions, inv.tobytes(), ax.tobytes()), build)

    def segments(self, cu: str, rows: str) -> tuple[str, str, str, str]:
        """For cu_seqlens `cu` (int32 [F+1], cu[F] = T) and any packed [T, ...] tensor `rows`:
        gather int64 [F, Lmax] (row cu[f] + j of segment f, clamped to T-1 where j >= its length),
        lengths int32 [F] (MultiHeadAttention's key_padding_mask), unpad int64 [T] (token t's row in the
        flattened [F*Lmax] batch), equal bool scalar (all segments have Lmax rows: no padding, no mask needed)."""
        def build():
            k = self._count("segments")
            i64 = lambda v: self.const(np.array(v, np.int64))  # noqa: E731
            cu64 = self.op("Cast", [cu], f"cu64_{k}", to=TensorProto.INT64)
            starts = self.op("Slice", [cu64, i64([0]), i64([-1])], f"seg_starts{k}")  # [F]
            ends = self.op("Slice", [cu64, i64([1]), i64([np.iinfo(np.int64).max])], f"seg_ends{k}")  # [F]
            lengths = self.op("Sub", [ends, starts], f"seg_lengths{k}")
            longest = self.op("ReduceMax", [lengths], f"seg_longest{k}", keepdims=1)  # [1]
            offsets = self.op("Range", [i64(0), self.op("Squeeze", [longest], f"seg_longest_s{k}"), i64(1)],
                              f"seg_offsets{k}")  # [Lmax]
            gather = self.op("Add", [self.op("Unsqueeze", [starts, i64([1])], f"seg_starts_col{k}"),
                                     self.op("Unsqueeze", [offsets, i64([0])], f"seg_offsets_row{k}")],
                             f"seg_rows{k}")  # [F, Lmax]
            n_tok = self.op("Slice", [self.op("Shape", [rows], f"packed_shape{k}"), i64([0]), i64([1])],
                            f"tokens{k}")  # [1] = T
            gather = self.op("Min", [gather, self.op("Sub", [n_tok, i64([1])], f"last_row{k}")], f"seg_gather{k}")
            tok = self.op("Range", [i64(0), self.op("Squeeze", [n_tok], f"tokens_s{k}"), i64(1)], f"tok{k}")
            after = self.op("GreaterOrEqual", [self.op("Unsqueeze", [tok, i64([1])], f"tok_col{k}"),
                                               self.op("Unsqueeze", [ends, i64([0])], f"ends_row{k}")],
                            f"tok_after{k}")  # [T, F]
            seg = self.op("ReduceSum", [self.op("Cast", [after], f"tok_after_i{k}", to=TensorProto.INT64), i64([1])],
                          f"tok_segment{k}", keepdims=0)  # [T] segment of each token
            within = self.op("Sub", [tok, self.op("Gather", [starts, seg], f"tok_start{k}", axis=0)], f"tok_within{k}")
            unpad = self.op("Add", [self.op("Mul", [seg, longest], f"tok_seg_base{k}"), within], f"tok_unpad{k}")
            mask = self.op("Cast", [lengths], f"seg_lengths_i32_{k}", to=TensorProto.INT32)
            shortest = self.op("ReduceMin", [lengths], f"seg_shortest{k}", keepdims=1)
            equal = self.op("Squeeze", [self.op("Equal", [shortest, longest], f"seg_equal1{k}")], f"seg_equal{k}")
            return gather, mask, unpad, equal
        return self._once(("segments", cu), build)

    def step_dims(self) -> tuple[str, str, str]:
        """(S [1], cache_len [1], B [1]) int64 from the shapes of position_ids [3, B, S] and past_key.0
        [B, Hkv, K, D]."""
        def build():
            pos = self.op("Shape", ["position_ids"], "pos_shape")
            s = self.op("Slice", [pos, self.const(np.array([2], np.int64)), self.const(np.array([3], np.int64))],
                        "seq")
            b = self.op("Slice", [pos, self.const(np.array([1], np.int64)), self.const(np.array([2], np.int64))],
                        "batch")
            k = self.op("Slice", [self.op("Shape", ["past_key.0"], "cache_shape"),
                                  self.const(np.array([2], np.int64)), self.const(np.array([3], np.int64))],
                        "cache_len")
            return s, k, b
        return self._once("dims", build)

    def seqlens_k(self) -> str:
        """int32 [B]: past_lengths + S - 1 (the last row each sequence holds after the step)."""
        def build():
            s, _, _ = self.step_dims()  # on the host; S - 1 is counted on the device
            s_dev = self.op("ReduceSum", [self.ones(s, "seq_ones")], "seq_on_device", keepdims=1)  # [1] = S
            last = self.op("Sub", [self.op("Add", ["past_lengths", s_dev], "total_lengths"),
                                   self.const(np.array([1], np.int64))], "last_rows")
            return self.op("Cast", [last], "seqlens_k", to=TensorProto.INT32)
        return self._once("seqlens_k", build)

    def total_sequence_length(self) -> str:
        """int32 scalar: S when S > 1 and B > 1 (a batch of prompts into an empty cache), else cache_len (a decode
        step, or one sequence's prompt chunk, which may continue rows already in its cache). The module docstring
        says why, from ONNX Runtime's contract."""
        def build():
            s, cap, b = self.step_dims()
            one, zero = self.const(np.array([1], np.int64)), self.const(np.array([0], np.int64))
            # (S - 1) * (B - 1) > 0: shape arithmetic ONNX Runtime keeps on the host (no And: tests/test_ort_fused.py)
            both = self.op("Mul", [self.op("Sub", [s, one], "seq_minus_1"), self.op("Sub", [b, one], "batch_minus_1")],
                           "seq_batch_product")
            batch_prompt = self.op("Greater", [both, zero], "is_batch_prompt")
            total = self.op("Where", [batch_prompt, s, cap], "total_i64")
            return self.op("Cast", [self.op("Squeeze", [total], "total_scalar")], "total_sequence_length",
                           to=TensorProto.INT32)
        return self._once("total", build)


def _const(nodes: list, name: str, value) -> str:
    nodes.append(helper.make_node("Constant", [], [name], name=name,
                                  value=numpy_helper.from_array(np.asarray(value), name)))
    return name


def _reshape(nodes: list, x: str, dims, out: str) -> str:
    nodes.append(helper.make_node("Reshape", [x, _const(nodes, f"{out}/shape", np.array(dims, np.int64))], [out],
                                  name=out))
    return out


def _rope(nodes: list, node: onnx.NodeProto, cos: str, sin: str, rotary_ids: str, head_dim: int, rank: int,
          n_heads: int) -> None:
    """MRoPE x [B,S,H,D] -> RotaryEmbedding on [B,S,H*D] -> [B,S,H,D]; vision x [T,H,D] (H = n_heads) through
    [1,T,H*D]. Rotate-half (interleaved=0), as HF's apply_rotary_pos_emb."""
    base = node.name or node.output[0]
    flat, back = ([0, 0, -1], [0, 0, -1, head_dim]) if rank == 4 else ([1, -1, n_heads * head_dim],
                                                                        [-1, n_heads, head_dim])
    x3 = _reshape(nodes, node.input[0], flat, f"{base}/x_bsh")
    y3 = f"{base}/rotary"
    nodes.append(helper.make_node("RotaryEmbedding", [x3, rotary_ids, cos, sin], [y3], name=y3,
                                  domain=ORT_DOMAIN, interleaved=0))
    _reshape(nodes, y3, back, node.output[0])


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


def _padded_mha(nodes: list, node: onnx.NodeProto, shared: "_Shared", scale: float, n_heads: int,
                head_dim: int) -> None:
    """VarlenAttention (q/k/v [T,H,D], cu_seqlens int32 [F+1], non-causal, no GQA) -> the segments gathered into a
    right-padded batch [F, Lmax, H*D], one MultiHeadAttention call (no attention bias; key_padding_mask = segment
    lengths only when they differ), rows gathered back to the packed order."""
    base = node.name or node.output[0]
    q, k, v, cu = node.input
    hidden = n_heads * head_dim
    rows = [_reshape(nodes, x, [-1, hidden], f"{base}/{n}_rows") for x, n in ((q, "q"), (k, "k"), (v, "v"))]
    gather, lengths, unpad, equal = shared.segments(cu, rows[0])
    padded = []
    for x, n in zip(rows, "qkv"):
        out = f"{base}/{n}_padded"
        nodes.append(helper.make_node("Gather", [x, gather], [out], name=out, axis=0))  # [F, Lmax, H*D]
        padded.append(out)
    o = f"{base}/mha"
    # segments of one length (one image, the frames of a video, images of one size): no mask, so the CUDA EP may
    # pick its flash kernel; otherwise key_padding_mask = the segment lengths
    branches = {}
    for kind, inputs in (("unmasked", padded), ("masked", [*padded, "", lengths])):
        out = f"{o}/{kind}"
        mha = helper.make_node("MultiHeadAttention", inputs, [out], name=out, domain=ORT_DOMAIN, num_heads=n_heads,
                               scale=float(scale))
        branches[kind] = helper.make_graph([mha], out, [], [helper.make_tensor_value_info(out, shared.dtype, None)])
    nodes.append(helper.make_node("If", [equal], [o], name=o, then_branch=branches["unmasked"],
                                  else_branch=branches["masked"]))
    flat = _reshape(nodes, o, [-1, hidden], f"{base}/mha_rows")  # [F*Lmax, H*D]
    packed = f"{base}/packed"
    nodes.append(helper.make_node("Gather", [flat, unpad], [packed], name=packed, axis=0))  # [T, H*D]
    _reshape(nodes, packed, [-1, n_heads, head_dim], node.output[0])


def _fuse_rms_norms(g: onnx.GraphProto) -> int:
    """Every `qwen_vl_trt.RMSNorm(x, weight)` node (export/layers.py) becomes one SimplifiedLayerNormalization(x,
    weight, epsilon, stash_type fp32) with the same output. Statistics in fp32 as HF; the normalized value is
    rounded to the graph dtype once (after the weight) instead of twice: the same in fp32, up to 1 ulp in bf16.
    Returns the number of norms fused."""
    fused, kept = 0, []
    for n in g.node:
        if n.domain == FUNCTION_DOMAIN and n.op_type == "RMSNorm":
            eps = next(helper.get_attribute_value(a) for a in n.attribute if a.name == "epsilon")
            n = helper.make_node("SimplifiedLayerNormalization", list(n.input), list(n.output), name=n.name,
                                 axis=-1, epsilon=float(eps), stash_type=1)
            fused += 1
        kept.append(n)
    del g.node[:]
    g.node.extend(kept)
    return fused


def _fuse_skip_norms(g: onnx.GraphProto) -> int:
    """Add(x, y) -> SimplifiedLayerNormalization  =>  SkipSimplifiedLayerNormalization(x, y, weight), whose 4th
    output is the sum (the residual stream the next layer adds to). Only for activation + activation sums (the
    decoder's residual and DeepStack adds, all [B, S, C]). The sum is rounded to the graph dtype as the Add
    rounds it. Returns the number fused."""
    nodes = list(g.node)
    producer = {o: n for n in nodes for o in n.output}
    consts = {i.name for i in g.initializer} | {o for n in nodes if n.op_type == "Constant" for o in n.output}
    readers: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    outputs = {o.name for o in g.output}
    fused_at, drop = {}, set()
    for norm in [n for n in nodes if n.op_type == "SimplifiedLayerNormalization"]:
        add = producer.get(norm.input[0])
        if add is None or add.op_type != "Add" or id(add) in fused_at or any(i in consts for i in add.input):
            continue
        eps = next(helper.get_attribute_value(a) for a in norm.attribute if a.name == "epsilon")
        keep_sum = readers.get(add.output[0], 0) > 1 or add.output[0] in outputs
        fused_at[id(add)] = helper.make_node(
            "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], norm.input[1]],
            [norm.output[0], "", "", add.output[0] if keep_sum else ""], name=f"{norm.name}/skip",
            domain=ORT_DOMAIN, epsilon=float(eps))
        drop.add(id(norm))
    kept = [fused_at.get(id(n), n) for n in nodes if id(n) not in drop]
    del g.node[:]
    g.node.extend(kept)
    return len(fused_at)


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


def _drop_unread(model: onnx.ModelProto) -> None:
    """Drop the initializers no node reads (in any subgraph) and the functions no node calls."""
    g = model.graph
    read = _names_read(g) | {o.name for o in g.output}
    kept = [t for t in g.initializer if t.name in read]
    del g.initializer[:]
    g.initializer.extend(kept)
    used = {(n.domain, n.op_type) for n in g.node}
    fns = [f for f in model.functions if (f.domain, f.name) in used]
    del model.functions[:]
    model.functions.extend(fns)


def _names_read(g: onnx.GraphProto) -> set:
    names = {i for n in g.node for i in n.input}
    for n in g.node:
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                names |= _names_read(sub)
    return names
