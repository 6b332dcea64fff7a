"""The three ops that TensorRT plugins replace: MRoPE, VarlenAttention, KVCacheAttention.

Each is emitted as one node of domain `qwen_vl` (export/plugin_ops.py) and the graph carries the op's
model-local ONNX function whose body is the reference computation in standard ops: ONNX Runtime (and
TensorRT without our library) runs the body, TensorRT with libqwen_vl_plugins.so loaded imports the node as
a PLUGIN_V3 layer (plugins/README.md). One file serves both runtimes.

The plugins take int32 index inputs; the graph contracts keep int64 positions / past lengths (what the
runtime and HF hold), so each is cast once per graph here.

Shapes (dimension alphabet of model/contracts.py):
  mrope:              x [..., H, D], positions [..., A] int64 -> [..., H, D]
  varlen_attention:   q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens [F+1] int32 -> [T, Hq, D]
  kv_cache_attention: q [B, S, Hq, D], k/v [B, S, Hkv, D], past_key/value [B, Hkv, K, D],
                      past_lengths [B] int64 -> out [B, S, Hq, D], present_key/value [B, Hkv, K, D]
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from . import plugin_ops
from .onnx_graph import GraphBuilder


def _int32(g: GraphBuilder, x: str) -> str:
    """`x` as int32, one Cast per graph value however many ops read it."""
    key = ("int32", x)
    if key not in g.memo:
        g.memo[key] = g.op("Cast", [x], to=TensorProto.INT32)
    return g.memo[key]


def _emit(g: GraphBuilder, op: str, make_node, inputs, n_out: int, **attrs):
    name = g._node_name(op)
    outs = [f"{name}/output_{i}" for i in range(n_out)]
    g.nodes.append(make_node(*inputs, *outs, name=name, **attrs))
    g.add_function(plugin_ops.FUNCTIONS[op]())
    return outs[0] if n_out == 1 else outs


def mrope(g: GraphBuilder, x: str, positions: str, inv_freq: np.ndarray, axis: np.ndarray) -> str:
    """Rotary embedding, rotate-half style; frequency i uses position axis `axis[i]` (fp32 math)."""
    return _emit(g, "MRoPE", plugin_ops.make_mrope_node, [x, _int32(g, positions)], 1,
                 inv_freq=inv_freq, axis=axis)


def varlen_attention(g: GraphBuilder, q: str, k: str, v: str, cu_seqlens: str, scale: float) -> str:
    """Non-causal attention within each segment [cu[i], cu[i+1]) of the packed tokens (GQA allowed)."""
    return _emit(g, "VarlenAttention", plugin_ops.make_varlen_attention_node, [q, k, v, _int32(g, cu_seqlens)], 1,
                 scale=scale, causal=False)


def kv_cache_attention(g: GraphBuilder, q: str, k: str, v: str, past_key: str, past_value: str,
                       past_lengths: str, scale: float, n_kv: int = 0, head_dim: int = 0):
    """Write the step's K/V at rows past_lengths[b]+s of the cache, then causal GQA attention over the cache.

    Returns (out [B, S, Hq, D], present_key, present_value). `n_kv` / `head_dim` are read from the tensors.
    """
    out, present_k, present_v = _emit(g, "KVCacheAttention", plugin_ops.make_kv_cache_attention_node,
                                      [q, k, v, past_key, past_value, _int32(g, past_lengths)], 3, scale=scale)
    return out, present_k, present_v
