"""Stacked MoE expert tensors in FP8 or INT4 (`--weights experts=fp8|int4`; model/weight_formats.py).

One tensor per projection and layer, in the release layout that export/moe.py reads (`release_layout`):
gate_up Wt [E, C, 2I] (gate columns first, then up) and down Wt [E, I, C]; K (the input features) is axis 1.
Each is stored as q [E, K, N] plus a scale s [E, ceil(K/B), N] in the graph dtype, one scale per block of B
consecutive input features of each (expert, output feature); the last block may be partial (FP8 only). The
value is

    W[e, k, n] = q[e, k, n] * s[e, k // B, n]          (ONNX DequantizeLinear(q, s, axis=1, block_size=B))

Formats:
- `fp8` (float8 e4m3fn). A Qwen FP8 checkpoint (`quant_method: fp8`, `weight_scale_inv` on a [bk, bn] block grid)
  keeps its own bytes: the e4m3 values are copied, and the block scale [E, K/bk, N/bn] is repeated bn times
  along N (TensorRT accepts only one blocked axis in DequantizeLinear; the repetition is exact), B = bk. The
  product is what HF's `Fp8Dequantize` computes (q.float() * s.float()); in a bf16/fp16 graph the scale is
  stored in the graph dtype, exact for Qwen's bf16 scales. Any other expert tensor (dense checkpoint,
  or an FP8 checkpoint with per-tensor/channel scales) is quantized round-to-nearest per block of 128 along K:
  s = amax / 448 rounded to the graph dtype (1 for an all-zero block), q = e4m3(clamp(W / s, -448, 448)).
- `int4`: symmetric round-to-nearest in blocks of `int4_block` along K (export/int4.py `quantize_rtn`, one expert
  at a time), q in [-8, 7]. K must be a multiple of the block (TensorRT's INT4 takes whole blocks only).

Memory: one stacked tensor at a time (as export/weights.py reads them), quantized one expert at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qwen_vl_trt.model.errors import CheckpointError
from qwen_vl_trt.model.spec import ModelSpec
from qwen_vl_trt.model.weight_formats import FP8_BLOCK, WeightFormats

from .int4 import quantize_rtn
from .onnx_graph import GraphBuilder
from .weights import CheckpointWeights

E4M3_MAX = 448.0
PROJECTIONS = ("gate_up_proj", "down_proj")


@dataclass
class StackedExperts:
    """One quantized stacked expert tensor: q [E, K, N] (torch float8_e4m3fn, or numpy int8 in [-8, 7] for
    int4), scale [E, ceil(K/block), N] (torch, graph dtype), `kept`: the checkpoint's own FP8 bytes."""

    fmt: str
    q: object
    scale: object
    block: int
    kept: bool = False

    def dequantized(self):
        """float32 torch [E, K, N]: q * s per block (what DequantizeLinear computes in fp32)."""
        import torch

        q = self.q.to(torch.float32) if self.fmt == "fp8" else torch.from_numpy(np.asarray(self.q, np.float32))
        k = q.shape[1]
        return q * self.scale.to(torch.float32).repeat_interleave(self.block, dim=1)[:, :k]


def quantized_experts(w: CheckpointWeights, key: str, spec: ModelSpec, formats: WeightFormats, dtype: str,
                      read_dense) -> tuple[StackedExperts, StackedExperts]:
    """(gate_up, down) of the MoE block `key` (e.g. model.language_model.layers.0.mlp) in `formats.experts`;
    `read_dense()` -> the two dense tensors in release layout (export/moe.py `release_layout`)."""
    fmt = formats.experts
    if fmt not in ("fp8", "int4"):
        raise ValueError(f"experts format {fmt!r} is not quantized")
    kept = {name: _kept_fp8(w, f"{key}.experts.{name}", spec, dtype) if fmt == "fp8" else None
            for name in PROJECTIONS}
    dense = read_dense() if not all(kept.values()) else (None, None)
    out = []
    for name, wt in zip(PROJECTIONS, dense):
        if kept[name] is not None:
            out.append(kept[name])
        elif fmt == "fp8":
            out.append(fp8_rtn(wt, FP8_BLOCK, dtype))
        else:
            out.append(int4_rtn(wt, formats.int4_block, dtype, f"{key}.experts.{name}"))
    return out[0], out[1]


def fp8_rtn(wt, block: int, dtype: str) -> StackedExperts:
    """Round-to-nearest FP8 of Wt [E, K, N] in blocks of `block` along K (partial last block allowed)."""
    import torch

    e, k, n = wt.shape
    kb = -(-k // block)
    q = torch.empty((e, k, n), dtype=torch.float8_e4m3fn)
    scale = torch.empty((e, kb, n), dtype=getattr(torch, dtype))
    for i in range(e):  # one expert at a time
        x = wt[i].to(torch.float32)
        padded = torch.nn.functional.pad(x, (0, 0, 0, kb * block - k)).reshape(kb, block, n)
        s = (padded.abs().amax(dim=1) / E4M3_MAX).to(scale.dtype)  # [K/B, N] in the graph dtype
        s = torch.where(s == 0, torch.ones_like(s), s)
        scale[i] = s
        per_row = s.to(torch.float32).repeat_interleave(block, dim=0)[:k]
        q[i] = torch.clamp(x / per_row, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return StackedExperts("fp8", q, scale, block)


def int4_rtn(wt, block: int, dtype: str, key: str) -> StackedExperts:
    """Symmetric round-to-nearest INT4 of Wt [E, K, N] in blocks of `block` along K (export/int4.py)."""
    import torch

    e, k, n = wt.shape
    if k % block:
        raise CheckpointError(f"{key}: {k} input features are not a multiple of the INT4 block {block} "
                              f"(TensorRT takes whole blocks); choose --int4-block-size dividing {k}")
    q = np.empty((e, k, n), np.int8)
    scale = torch.empty((e, k // block, n), dtype=getattr(torch, dtype))
    for i in range(e):
        q[i], scale[i] = quantize_rtn(wt[i], block, dtype)
    return StackedExperts("int4", q, scale, block)


def _kept_fp8(w: CheckpointWeights, key: str, spec: ModelSpec, dtype: str) -> StackedExperts | None:
    """The checkpoint's own FP8 bytes of `key` in release layout with the block scale repeated along N; None when
    the tensor is not stored as block-scaled FP8 (it is then quantized by `fp8_rtn`). A tensor-parallel rank
    (export/tp.py RankWeights) gives its slice of the same bytes and scales (`fp8_experts`)."""
    import torch

    raw = w.fp8_experts(key, spec)  # a tensor-parallel rank (export/tp.py RankWeights): its slice
    if raw is None:
        return None
    q, grid, (bk, bn) = raw
    n = q.shape[2]
    scale = grid.to(torch.float32).repeat_interleave(bn, dim=2)[:, :, :n].to(getattr(torch, dtype))
    return StackedExperts("fp8", q.contiguous(), scale.contiguous(), bk, kept=True)


def store(g: GraphBuilder, name: str, t: StackedExperts) -> tuple[str, str]:
    """Initializers `<name>.fp8|.int4` [E, K, N] and `<name>.scale` [E, ceil(K/B), N] -> their names."""
    if t.fmt == "int4":
        q = g.int4_weight(f"{name}.int4", np.asarray(t.q))
    else:
        q = g.fp8_weight(f"{name}.fp8", t.q)
    return q, g.weight(f"{name}.scale", t.scale)
