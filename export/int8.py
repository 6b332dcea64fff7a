"""INT8 weight-only lm_head (`--weights lm_head=int8`; model/weight_formats.py): symmetric, one scale per output
channel (vocabulary row).

For the transposed weight Wt [K, N] (K = hidden, N = vocabulary):

    s[n] = max_k |Wt[k, n]| / 127, rounded to the graph dtype (1 where the column is all zeros)
    q[k, n] = clamp(round_half_even(Wt[k, n] / s[n]), -128, 127)                                   int8

Graph: `DequantizeLinear(q int8 [K, N], s [N], axis=1) -> MatMul` (per-axis DQ, opset 13+). Half the bytes of
bf16 with a finer step than INT4 (1/127 of the channel's range instead of 1/7 of a block's); round to nearest,
so lossy.
"""
from __future__ import annotations

from .onnx_graph import GraphBuilder

INT8_MAX = 127


def quantize_per_channel(wt, scale_dtype: str):
    """(q torch int8 [K, N], s torch [N] in `scale_dtype`) of the transposed weight Wt [K, N]."""
    import torch

    w = wt.to(torch.float32)
    s = (w.abs().amax(dim=0) / INT8_MAX).to(getattr(torch, scale_dtype))
    s = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.clamp(torch.round(w / s.to(torch.float32)), -INT8_MAX - 1, INT8_MAX).to(torch.int8)
    return q, s


def int8_matmul_weight(g: GraphBuilder, name: str, wt) -> str:
    """The [K, N] weight value in the graph dtype, as DequantizeLinear of its per-column INT8 values."""
    q, s = quantize_per_channel(wt, g.dtype)
    return g.op("DequantizeLinear", [g.weight(f"{name}.int8", q, "int8"), g.weight(f"{name}.scale", s)], axis=1)
