"""INT4 weight-only decoder linears (opt-in: `qwen-vl-export --weights int4`, or per group: `attention=int4`,
`mlp=int4`, `lm_head=int4`; model/weight_formats.py).

Decode reads every weight once per step, so its speed is bytes per step: INT4 weights are a quarter of bf16's.
Which weights: the text decoder's q/k/v/o and gate/up/down projections and lm_head (the embedding table when tied;
export/decoder.py) whose input width is a multiple of the block (all of them in the released models; TensorRT
accepts only whole blocks). Kept as they are: the vision encoder (quantizing it is the usual source of accuracy
complaints), the embedding table of embed.onnx and the MoE router; the MoE experts are export/moe.py's.

Scheme: round-to-nearest, symmetric, one scale per block of `block` consecutive input features of each output
feature. For the stored transposed weight Wt [K, N] (K = in features) and block b = 0..K/B-1:

    s[b, n] = max |Wt[bB:(b+1)B, n]| / 7, rounded to the graph dtype (1 where the block is all zeros)
    q[k, n] = clamp(round_half_even(Wt[k, n] / s[k // B, n]), -8, 7)            int4

Graph: `DequantizeLinear(q, s, axis=0, block_size=B)` [K, N] in the graph dtype -> MatMul, the ONNX form of
weight-only block quantization. ONNX Runtime fuses the pair into its `MatMulNBits` kernel (runtime/backends/ort.py asks
for accuracy level 1, fp32 activations, unless the manifest says `int4_activations: int8`), TensorRT reads it as INT4
weight-only quantization, and every other runtime still computes x @ (q * s) exactly. In decoder.ort.onnx the
products of one activation are one wider product (`fuse_int4_products`). B defaults to 128 with either activation
type (model/weight_formats.py DEFAULT_INT4_BLOCK). No calibration: this is RTN, so expect some accuracy loss against
the bf16 model on real weights (not measured here: no real checkpoint on these machines).
"""
from __future__ import annotations

import numpy as np

from .onnx_graph import ExternalData, GraphBuilder

from qwen_vl_trt.model.weight_formats import INT4_BLOCK_SIZES as BLOCK_SIZES
from qwen_vl_trt.model.weight_formats import METADATA_KEY as WEIGHTS_METADATA
from qwen_vl_trt.model.weight_formats import WeightFormats

QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INT4_MIN, INT4_MAX = -8, 7


def quantizes(key: str, in_features: int, block: int) -> bool:
    """Whether the HF Linear `key` (e.g. model.language_model.layers.3.mlp.down_proj) is stored as INT4."""
    return key.rsplit(".", 1)[-1] in QUANTIZED and in_features % block == 0


def quantize_rtn(wt, block: int, scale_dtype: str):
    """(q int8 numpy [K, N] in [-8, 7], s torch [K/B, N] in `scale_dtype`) of the transposed weight Wt [K, N]."""
    import torch

    k, n = wt.shape
    w = wt.to(torch.float32)
    amax = w.reshape(k // block, block, n).abs().amax(dim=1)  # [K/B, N]
    s = (amax / INT4_MAX).to(getattr(torch, scale_dtype))
    s = torch.where(s == 0, torch.ones_like(s), s)
    per_row = s.to(torch.float32).repeat_interleave(block, dim=0)  # [K, N]
    q = torch.clamp(torch.round(w / per_row), INT4_MIN, INT4_MAX).to(torch.int8)
    return q.numpy(), s


def int4_matmul_weight(g: GraphBuilder, name: str, wt, block: int) -> str:
    """The [K, N] weight value in the graph dtype, as DequantizeLinear of its INT4 blocks."""
    q, s = quantize_rtn(wt, block, g.dtype)
    return g.op("DequantizeLinear", [g.int4_weight(f"{name}.int4", np.asarray(q)), g.weight(f"{name}.scale", s)],
                axis=0, block_size=block)


def fuse_int4_products(model, graph_dir) -> list[str]:
    """In place, for ONNX Runtime's flavour of a decoder (decoder.ort.onnx): the INT4 products that read the same
    activation (q/k/v of a layer, gate/up of an MLP) become one wider product and a Split ->
    the number of products removed.

    Each group `x @ DequantizeLinear(q_i [K, N_i], s_i [K/B, N_i], axis 0, block B)` (same x, K and B; every
    DequantizeLinear read by that MatMul only) becomes `Split(x @ DequantizeLinear(q [K, sum N_i], s [K/B, sum N_i]),
    axis -1, [N_i...])` whose outputs are the old products' (same names, same values: column n of the concatenated
    weight is column n of one part, blocks run along K only) -> the names of the new INT4 weights and scales. ONNX Runtime fuses the wider pair into one MatMulNBits
    (or export/int4.py `to_matmul_nbits` does, for bf16): one M = 1 kernel call over 2 + 2 * kv/q (q/k/v) or 2x
    (gate/up) the columns, fewer thread-pool dispatches per step (bench/bench_matmulnbits.py `split` vs `fused`,
    docs/benchmarks.md). The concatenated weights are new initializers held in the model (raw data): write them out
    with `store_in_memory_initializers`; the parts stay in `<graph>.onnx.data` for decoder.onnx (TensorRT's graph
    keeps the separate products)."""
    import ml_dtypes
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    dq = {n.output[0]: n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
          and inits[n.input[0]].data_type == TensorProto.INT4 and len(n.input) == 2
          and readers.get(n.output[0]) == 1}

    def key(node):
        src = dq.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if src is None:
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in src.attribute}
        if attrs.get("axis") != 0:
            return None
        return node.input[0], int(attrs["block_size"]), tuple(inits[src.input[0]].dims)[0], inits[src.input[1]].data_type

    groups: dict[tuple, list] = {}
    for node in g.node:
        k = key(node)
        if k is not None:
            groups.setdefault(k, []).append(node)
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return []
    first = {id(v[0]): (k, v) for k, v in groups.items()}
    gone = {id(n) for v in groups.values() for n in v} | {id(dq[n.input[1]]) for v in groups.values() for n in v}
    out_nodes, dropped, added = [], set(), []
    for node in g.node:
        if id(node) in first:
            (x, block, _, _), members = first[id(node)]
            srcs = [dq[m.input[1]] for m in members]
            q = np.concatenate([numpy_helper.to_array(inits[s.input[0]], base_dir=str(graph_dir)).astype(np.int8)
                                for s in srcs], axis=1)
            s = np.concatenate([numpy_helper.to_array(inits[s.input[1]], base_dir=str(graph_dir)) for s in srcs],
                               axis=1)
            name = _common_prefix([m.name for m in members])
            packed = numpy_helper.from_array(np.ascontiguousarray(q).astype(ml_dtypes.int4), f"{name}.int4")
            scales = numpy_helper.from_array(s, f"{name}.scale")  # scales keep their dtype (fp32/fp16/bf16 bits)
            scales.data_type = inits[srcs[0].input[1]].data_type
            added += [packed, scales]
            widths = [inits[s_.input[0]].dims[1] for s_ in srcs]
            split = helper.make_tensor(f"{name}.split", TensorProto.INT64, [len(widths)], widths)
            added.append(split)
            w = f"{name}/DequantizeLinear/output_0"
            y = f"{name}/MatMul/output_0"
            out_nodes += [helper.make_node("DequantizeLinear", [packed.name, scales.name], [w],
                                           name=f"{name}/DequantizeLinear", axis=0, block_size=block),
                          helper.make_node("MatMul", [x, w], [y], name=f"{name}/MatMul"),
                          helper.make_node("Split", [y, split.name], [m.output[0] for m in members],
                                           name=f"{name}/Split", axis=-1)]
            dropped.update(i for s_ in srcs for i in s_.input)
        elif id(node) not in gone:
            out_nodes.append(node)
    _replace_nodes(g, out_nodes, dropped, added)
    return [t.name for t in added if t.data_type != TensorProto.INT64]


def _common_prefix(names: list[str]) -> str:
    """'/text/layers.0/self_attn/q_proj/MatMul', '.../k_proj/MatMul', ... -> '/text/layers.0/self_attn/q_proj+k_proj'"""
    parts = [n.split("/") for n in names]
    head = []
    for column in zip(*parts):
        if len(set(column)) > 1:
            break
        head.append(column[0])
    return "/".join(head + ["+".join(p[len(head)] for p in parts)])


def store_in_memory_initializers(model, data_path, names) -> int:
    """Move the initializers `names` of `model` that are held in the model (raw data) to the end of the
    external-data file `data_path` (64-byte aligned, export/onnx_graph.py ExternalData) -> how many moved."""
    from onnx import TensorProto

    names = set(names)
    big = [t for t in model.graph.initializer if t.name in names and t.data_location != TensorProto.EXTERNAL]
    if not big:
        return 0
    data = ExternalData(data_path, append=True)
    by_name = {t.name: data.tensor(t.name, t.raw_data, t.data_type, list(t.dims)) for t in big}
    data.close()
    kept = [by_name.get(t.name, t) for t in model.graph.initializer]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return len(big)


def to_matmul_nbits(model, graph_dir, data_path) -> int:
    """In place: every DequantizeLinear(int4 [K, N], s [K/B, N], axis 0) -> MatMul pair of `model` becomes one
    `com.microsoft.MatMulNBits` whose weights are appended to `data_path` (external data next to the graph) ->
    the number of pairs rewritten. For decoder.ort.onnx in bf16: ONNX Runtime fuses the pair itself only for
    float/float16 scales, but has MatMulNBits kernels for bf16 on the CUDA EP.

    MatMulNBits layout: B uint8 [N, K/B, B/2] (column n's K values, block by block, two per byte, low nibble
    first, stored as q + 8 since the kernel's default zero point for 4 bits is 8), scales [N * K/B] (graph
    dtype), accuracy_level from the graph's metadata (`int4_activations`: fp32 -> 1, int8 -> 4; the same level
    runtime/backends/ort.py asks ONNX Runtime's own fusion for)."""
    import json

    from onnx import TensorProto, helper, numpy_helper

    meta = {p.key: p.value for p in model.metadata_props}.get(WEIGHTS_METADATA)
    level = WeightFormats.from_json(json.loads(meta) if meta else None).accuracy_level
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    dq = {n.output[0]: n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
          and inits[n.input[0]].data_type == TensorProto.INT4}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    data = ExternalData(data_path, append=True)
    out_nodes, dropped, added = [], set(), []
    for node in g.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in dq and readers.get(node.output[0]) == 1:
            continue  # folded into the MatMulNBits below
        src = dq.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if src is None or readers.get(node.input[1]) != 1:
            out_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in src.attribute}
        block = int(attrs["block_size"])
        q = numpy_helper.to_array(inits[src.input[0]], base_dir=str(graph_dir)).astype(np.int8)  # [K, N]
        s = numpy_helper.to_array(inits[src.input[1]], base_dir=str(graph_dir))  # [K/B, N]
        k, n = q.shape
        u = (q.T.astype(np.int16) + 8).astype(np.uint8).reshape(n, k // block, block // 2, 2)
        packed = (u[..., 0] | (u[..., 1] << 4)).astype(np.uint8)  # [N, K/B, B/2]
        names = (f"{src.input[0]}.nbits", f"{src.input[1]}.nbits")
        for name, arr in zip(names, (packed, np.ascontiguousarray(s.T).reshape(-1))):
            t = numpy_helper.from_array(arr, name)
            added.append(data.tensor(name, t.raw_data, t.data_type, t.dims))
        out_nodes.append(helper.make_node("MatMulNBits", [node.input[0], *names], list(node.output),
                                          name=node.name, domain="com.microsoft", K=k, N=n, bits=4,
                                          block_size=block, accuracy_level=level))
        dropped.update(src.input[:2])
    data.close()
    _replace_nodes(g, out_nodes, dropped, added)
    if not data.path.stat().st_size:
        data.path.unlink()
    return len(added) // 2


def _replace_nodes(g, nodes: list, dropped: set, added: list) -> None:
    """g's nodes become `nodes`; the initializers named in `dropped` that no node reads any more go, `added` join."""
    del g.node[:]
    g.node.extend(nodes)
    still_read = {i for n in g.node for i in n.input}
    kept = [t for t in g.initializer if t.name not in dropped or t.name in still_read]
    del g.initializer[:]
    g.initializer.extend(kept + added)
