"""FP8 (e4m3) weight-only decoder linears inside the graphs (`--weights fp8`, or `attention=fp8` / `mlp=fp8` /
`lm_head=fp8`; model/weight_formats.py).

Graph form, for the transposed weight Wt [K, N] (K = in features, N = out features) of `x @ Wt`:

    DequantizeLinear(q float8e4m3fn [K, N], s [ceil(K/B), N], axis=0, block_size=B) -> MatMul       (opset 21)

i.e. Wt[k, n] = q[k, n] * s[k // B, n]; the last block along K may be partial. ONNX Runtime's CPU provider runs it
in fp32 and fp16 graphs (no bf16 kernel: bf16 FP8 graphs are for TensorRT), TensorRT(-RTX) keeps the FP8 bytes
in the engine. Standard ONNX blocks only one axis, and TensorRT refuses a 2-D scale, so a checkpoint's 2-D block
scale [ceil(N/bm), ceil(K/bn)] is written replicated along N: s[b, n] = scale[n // bm, b] with B = bn, which is
exact (the same product, `bm` times the scale bytes: +1.6 % over the e4m3 bytes at 128x128 blocks).

Where the values come from:
- an FP8 checkpoint (export/quantized.py; Qwen's `*-FP8`: `weight_scale_inv` in 128x128 blocks): the stored e4m3
  bytes, transposed, and its scales, unchanged: no re-quantization, so DQ computes exactly HF's dequantization
  `q.float() * s.float()`. A weight the checkpoint keeps unquantized stays dense (its author chose so, as Qwen does
  for lm_head and the vision tower);
- a dense checkpoint: round to nearest per block of B = 128 along K of each output column,
  s = amax / 448 rounded to the scale dtype (1 for an all-zero block), q = e4m3(clamp(Wt / s, -448, 448)). Lossy.

Scale dtype: the graph dtype when every scale is exactly representable in it (then DQ's single rounding of the
exact product q * s equals HF's fp32 product cast to the graph dtype); otherwise fp32 with a Cast of the
dequantized weight to the graph dtype after it (the same value: one rounding of the exact product).
"""
from __future__ import annotations

from qwen_vl_trt.model.weight_formats import FP8_BLOCK

from .onnx_graph import ELEM, GraphBuilder
from .quantized import Fp8Weights

E4M3_MAX = 448.0  # largest finite float8 e4m3fn


def fp8_matmul_weight(g: GraphBuilder, w, key: str, name: str, dense_t=None) -> str | None:
    """The [K, N] weight value of HF Linear weight `key` ([N, K] stored) as DequantizeLinear of FP8 blocks, or None
    when it stays dense (an FP8 checkpoint that keeps this weight unquantized). `dense_t`: the transposed dense
    weight when the caller already read it (a dense checkpoint)."""
    raw = w.get_fp8(key)
    if raw is not None:
        q, scale, (bm, bn) = raw  # [N, K] e4m3, [ceil(N/bm), ceil(K/bn)], W[n, k] = q[n, k] * scale[n // bm, k // bn]
        n, k = q.shape
        qt = q.t().contiguous()  # [K, N], the stored bytes
        block = min(bn, k)
        s = scale.t().repeat_interleave(bm, dim=1)[:, :n].contiguous()  # [ceil(K/bn), N]
    elif isinstance(w.quant, Fp8Weights):
        return None  # an FP8 checkpoint that stores this weight dense keeps it dense
    else:
        wt = dense_t if dense_t is not None else w.get(key).t()
        block = min(FP8_BLOCK, wt.shape[0])
        qt, s = quantize_rtn(wt, block, _scale_dtype(g))
    return dequantize(g, name, qt, s, block)


def _scale_dtype(g: GraphBuilder) -> str:
    return "float32" if g.dtype == "float32" else g.dtype


def quantize_rtn(wt, block: int, scale_dtype: str):
    """(q float8_e4m3fn [K, N], s [ceil(K/B), N] in `scale_dtype`) of the transposed weight Wt [K, N]: round to
    nearest per block of `block` rows (the last one may be partial), scale = amax / 448."""
    import torch

    k, n = wt.shape
    w = wt.to(torch.float32)
    nb = -(-k // block)
    padded = torch.nn.functional.pad(w, (0, 0, 0, nb * block - k))  # zeros do not change a block's amax
    amax = padded.reshape(nb, block, n).abs().amax(dim=1)  # [nb, N]
    s = (amax / E4M3_MAX).to(getattr(torch, scale_dtype))
    s = torch.where(s == 0, torch.ones_like(s), s)
    per_row = s.to(torch.float32).repeat_interleave(block, dim=0)[:k]  # [K, N]
    q = torch.clamp(w / per_row, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, s


def dequantize(g: GraphBuilder, name: str, qt, s, block: int) -> str:
    """DequantizeLinear(qt e4m3 [K, N], s [ceil(K/B), N], axis 0, block B) in the graph dtype (module docstring)."""
    import torch

    exact = g.dtype == "float32" or torch.equal(s.to(getattr(torch, g.dtype)).to(s.dtype), s)
    q_name = g.fp8_weight(f"{name}.fp8", qt)
    s_name = g.weight(f"{name}.scale", s, g.dtype if exact else "float32")
    y = g.op("DequantizeLinear", [q_name, s_name], axis=0, block_size=int(block))
    return y if exact else g.op("Cast", [y], to=ELEM[g.dtype])
