"""The three ops that TensorRT plugins replace: MRoPE, VarlenAttention, KVCacheAttention.

Each is emitted as one node of domain `qwen_vl` with a model-local function whose body is the reference
computation in standard ONNX ops (export/plugin_ops.py): ONNX Runtime runs the body, TensorRT with our
plugin library loaded imports the node as a PLUGIN_V3 layer (see plugins/README.md). Until the plugin ops
module is present, the reference bodies below are emitted inline.

Shapes (dimension alphabet of export/contracts.py):
  mrope:              x [..., H, D], positions [..., A] int64 -> [..., H, D]
  varlen_attention:   q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens [F+1] int32 -> [T, Hq, D]
  kv_cache_attention: q [B, S, Hq, D], k/v [B, S, Hkv, D], past_key/value [B, Hkv, K, D],
                      past_lengths [B] int64 -> out [B, S, Hq, D], present_key/value [B, Hkv, K, D]
"""
from __future__ import annotations

import numpy as np

from .layers import cast, reshape, to_compute, transpose
from .onnx_graph import GraphBuilder

NEG_INF = -3.0e38  # finite "minus infinity" in fp32: avoids NaN from (-inf) - (-inf) in fully masked rows


def mrope(g: GraphBuilder, x: str, positions: str, inv_freq: np.ndarray, axis: np.ndarray) -> str:
    """Rotary embedding, rotate-half style; frequency i uses position axis `axis[i]` (fp32 math)."""
    with g.scope("mrope"):
        pos = g.op("Gather", [positions, g.const(axis, "int64")], axis=-1)  # [..., D/2]
        angle = g.op("Mul", [cast(g, pos, "float32"), g.const(inv_freq.astype(np.float32))])
        angle = g.op("Unsqueeze", [g.op("Concat", [angle, angle], axis=-1), g.const([-2], "int64")])  # [..., 1, D]
        cos, sin = g.op("Cos", [angle]), g.op("Sin", [angle])
        x32 = cast(g, x, "float32") if g.dtype != "float32" else x
        half = len(inv_freq)
        x1 = g.op("Slice", [x32, g.const([0]), g.const([half]), g.const([-1])])
        x2 = g.op("Slice", [x32, g.const([half]), g.const([2 * half]), g.const([-1])])
        rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
        y = g.op("Add", [g.op("Mul", [x32, cos]), g.op("Mul", [rot, sin])])
        return to_compute(g, y)


def _softmax_attention(g: GraphBuilder, q: str, k: str, v: str, mask: str, scale: float, rank: int) -> str:
    """softmax(q k^T * scale + mask) v with fp32 scores and softmax (HF eager: softmax in fp32)."""
    q32, k32, v32 = (cast(g, t, "float32") if g.dtype != "float32" else t for t in (q, k, v))
    scores = g.op("Mul", [g.op("MatMul", [q32, transpose(g, k32, _swap_last2(rank))]), g.const(scale, "float32")])
    scores = g.op("Where", [mask, scores, g.const(NEG_INF, "float32")])
    probs = g.op("Softmax", [scores], axis=-1)
    return g.op("MatMul", [probs, v32])


def _swap_last2(rank: int):
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return perm


def varlen_attention(g: GraphBuilder, q: str, k: str, v: str, cu_seqlens: str, scale: float) -> str:
    """Non-causal attention within each segment [cu[i], cu[i+1]) of the packed tokens (Hq == Hkv here)."""
    with g.scope("varlen_attention"):
        cu = cast(g, cu_seqlens, "int64")
        n_tok = g.op("Gather", [g.op("Shape", [q]), g.const(0, "int64")])
        tok = g.op("Range", [g.const(0, "int64"), n_tok, g.const(1, "int64")])  # [T]
        ends = g.op("Slice", [cu, g.const([1]), g.const([2**62]), g.const([0])])  # [F]
        seg = g.op("ReduceSum", [cast(g, g.op("GreaterOrEqual", [g.op("Unsqueeze", [tok, g.const([1])]),
                                                                 g.op("Unsqueeze", [ends, g.const([0])])]),
                                      "int64"), g.const([1])], keepdims=0)  # [T] segment id
        mask = g.op("Equal", [g.op("Unsqueeze", [seg, g.const([1])]), g.op("Unsqueeze", [seg, g.const([0])])])
        qh, kh, vh = (g.op("Unsqueeze", [transpose(g, t, [1, 0, 2]), g.const([0])]) for t in (q, k, v))
        out = _softmax_attention(g, qh, kh, vh, mask, scale, 4)  # [1, H, T, D]
        out = transpose(g, g.op("Squeeze", [out, g.const([0])]), [1, 0, 2])  # [T, H, D]
        return to_compute(g, out)


def kv_cache_attention(g: GraphBuilder, q: str, k: str, v: str, past_key: str, past_value: str,
                       past_lengths: str, scale: float, n_kv: int, head_dim: int):
    """Write the step's K/V at rows past_lengths[b]+s of the cache, then causal GQA attention over the cache."""
    with g.scope("kv_cache_attention"):
        shape_q = g.op("Shape", [q])  # [B, S, Hq, D]
        b = g.op("Gather", [shape_q, g.const([0])])
        s = g.op("Gather", [shape_q, g.const([1])])
        kt, vt = transpose(g, k, [0, 2, 1, 3]), transpose(g, v, [0, 2, 1, 3])  # [B, Hkv, S, D]
        # ScatterND indices [B, Hkv, S, 3] = (b, h, past_lengths[b] + s)
        rng = lambda n: g.op("Range", [g.const(0, "int64"), g.op("Squeeze", [n]), g.const(1, "int64")])
        bi, si = rng(b), rng(s)
        row = g.op("Add", [g.op("Unsqueeze", [past_lengths, g.const([1])]), g.op("Unsqueeze", [si, g.const([0])])])
        full = g.op("Concat", [b, g.const([n_kv]), s], axis=0)
        b_idx = g.op("Expand", [reshape(g, bi, [-1, 1, 1]), full])
        h_idx = g.op("Expand", [reshape(g, g.const(np.arange(n_kv), "int64"), [1, -1, 1]), full])
        r_idx = g.op("Expand", [g.op("Unsqueeze", [row, g.const([1])]), full])
        idx = g.op("Concat", [g.op("Unsqueeze", [t, g.const([-1])]) for t in (b_idx, h_idx, r_idx)], axis=-1)
        present_k = g.op("ScatterND", [past_key, idx, kt])
        present_v = g.op("ScatterND", [past_value, idx, vt])
        # GQA: q [B, S, Hq, D] -> [B, Hkv, G, S, D]; cache [B, Hkv, K, D] -> [B, Hkv, 1, K, D]
        qg = transpose(g, reshape(g, q, [0, 0, n_kv, -1, head_dim]), [0, 2, 3, 1, 4])
        kc = g.op("Unsqueeze", [present_k, g.const([2])])
        vc = g.op("Unsqueeze", [present_v, g.const([2])])
        n_ctx = g.op("Gather", [g.op("Shape", [past_key]), g.const(2, "int64")])
        kpos = g.op("Range", [g.const(0, "int64"), n_ctx, g.const(1, "int64")])  # [K]
        allowed = g.op("LessOrEqual", [reshape(g, kpos, [1, 1, -1]), g.op("Unsqueeze", [row, g.const([-1])])])
        mask = g.op("Unsqueeze", [allowed, g.const([1, 2])])  # [B, 1, 1, S, K]
        out = _softmax_attention(g, qg, kc, vc, mask, scale, 5)  # [B, Hkv, G, S, D]
        out = reshape(g, transpose(g, out, [0, 3, 1, 2, 4]), [0, 0, -1, head_dim])  # [B, S, Hq, D]
        return to_compute(g, out), present_k, present_v
