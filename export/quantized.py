"""Quantized checkpoints: FP8 and AWQ weights, dequantized as they are read.

On-disk formats, named by config.json `quantization_config`:

| `quant_method` | who writes it | weight | its scale | meaning |
|---|---|---|---|---|
| `fp8` | Qwen's official `*-FP8` releases (HF `FineGrainedFP8Config`) | `X.weight` float8_e4m3fn [.., R, C] | `X.weight_scale_inv` [.., ceil(R/bm), ceil(C/bn)] (bm, bn = `weight_block_size`; absent: one scale) | W = q * scale |
| `compressed-tensors`, `format: float-quantized` | llm-compressor `FP8` / `FP8_DYNAMIC` / `FP8_BLOCK` | `X.weight` float8_e4m3fn | `X.weight_scale`: per tensor [1], per channel [R, 1], per group [R, C/g] or per block | W = q * scale |
| `awq` (`version: gemm`, 4 bits) | AutoAWQ, e.g. Qwen's official `Qwen2.5-VL-*-AWQ` | `X.qweight` int32 [C, R/8]: eight 4-bit values per int32, columns in AutoAWQ's order 0 2 4 6 1 3 5 7 | `X.qzeros` int32 [C/g, R/8] (same packing), `X.scales` fp16 [C/g, R] | W^T[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n], in fp16 (AutoAWQ's `dequantize_gemm`) |

(R = out features, C = in features, g = group size.) An AWQ checkpoint has no `X.weight`: it is made from the
three tensors when asked for, as [R, C] float32 holding the fp16 values. TensorRT cannot keep AWQ's zero points
in an INT4 weight-only GEMM (it accepts only zero zero-points), so AWQ weights are exported dense.

A scale multiplies every element of its block: W[.., i, j] = float(q[.., i, j]) * scale[.., i // bm, j // bn], in
fp32 (HF `Fp8Dequantize`: `q.to(float32) * scales.to(float32)`, then `.to(model dtype)`; the graph writer does
that last cast). Blocks at the right/bottom edge may be partial (ceil grids, as vLLM reads them). Activation scales
(`input_scale`, dynamic or static) are not used: the graphs compute in the export dtype, i.e. weight-only
dequantization, which is what HF itself runs on a machine without FP8 kernels.

Memory: one tensor at a time (export/weights.py); a stacked [E, R, C] expert tensor is dequantized one expert at a
time into its fp32 result, so the peak is that result plus one expert's temporaries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from qwen_vl_trt.model.errors import CheckpointError

FP8_METHODS = ("fp8", "compressed-tensors")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # packed nibble i of an int32 holds column AWQ_ORDER[i] of its group of 8


def weight_quantization(cfg: dict, where: str):
    """Fp8Weights | AwqWeights | None (unquantized) for a checkpoint's config.json; CheckpointError otherwise."""
    q = cfg.get("quantization_config")
    if q and q.get("quant_method") == "awq":
        return AwqWeights.from_config(q, where)
    return Fp8Weights.from_config(cfg, where)


def is_fp8(tensor) -> bool:
    import torch

    return tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class Fp8Weights:
    """How a checkpoint's FP8 weights are scaled: where each weight's scale is stored, and its block shape."""

    method: str                        # "fp8" | "compressed-tensors"
    scale_suffix: str                  # appended to a weight's key: "_scale_inv" | "_scale"
    block: tuple[int, int] | None      # (bm, bn) when the config fixes it; None: inferred from the scale's shape

    @classmethod
    def from_config(cls, cfg: dict, where: str) -> "Fp8Weights | None":
        """None for an unquantized checkpoint; a CheckpointError for a quantization this exporter cannot read."""
        q = cfg.get("quantization_config")
        if not q:
            return None
        method = q.get("quant_method")
        if method == "fp8":
            fmt = q.get("fmt", "e4m3")
            if fmt != "e4m3":
                raise CheckpointError(f"{where}: FP8 format {fmt!r} is not supported (only e4m3)")
            block = q.get("weight_block_size")
            return cls("fp8", "_scale_inv", tuple(int(b) for b in block) if block else None)
        if method == "compressed-tensors":
            fmt = q.get("format")
            if fmt != "float-quantized":
                raise CheckpointError(f"{where}: compressed-tensors format {fmt!r} is not supported "
                                      f"(only float-quantized, i.e. FP8 weights)")
            block = None
            for group in (q.get("config_groups") or {}).values():
                w = group.get("weights") or {}
                if w.get("type") != "float" or w.get("num_bits") != 8:
                    raise CheckpointError(f"{where}: compressed-tensors weights {w.get('type')}{w.get('num_bits')} "
                                          f"are not supported (only 8-bit float)")
                if w.get("strategy") == "block" and w.get("block_structure"):
                    block = tuple(int(b) for b in w["block_structure"])
            return cls("compressed-tensors", "_scale", block)
        raise CheckpointError(
            f"{where}: quantization method {method!r} is not supported; supported: FP8 checkpoints "
            f"(quant_method {' / '.join(FP8_METHODS)}) and 4-bit AWQ (gemm). Export the unquantized checkpoint instead")

    def describe(self) -> str:
        blocks = f"{self.block[0]}x{self.block[1]} blocks" if self.block else "scales per tensor/channel"
        return f"FP8 weights ({self.method}, {blocks})"

    def scale_key(self, key: str) -> str:
        return key + self.scale_suffix

    def is_auxiliary(self, key: str) -> bool:
        """Keys that hold scales, not weights (hidden from the exporters)."""
        return key.endswith((self.scale_suffix, ".input_scale", ".weight_zero_point", ".input_zero_point"))

    def dequantize(self, q, scale, key: str):
        """float32 [.., R, C] from float8 `q` [.., R, C] and its `scale` (see the module docstring)."""
        import torch

        rows, cols = (q.shape[-2], q.shape[-1]) if q.ndim >= 2 else (1, q.shape[-1])
        lead = q.shape[:-2] if q.ndim >= 2 else ()
        grid = self._grid(scale, lead, rows, cols, key)  # fp32 [prod(lead), sr, sc]
        bm, bn = self._block(grid.shape[-2:], rows, cols, key)
        out = torch.empty(q.shape, dtype=torch.float32)
        flat_q, flat_out = q.reshape(-1, rows, cols), out.view(-1, rows, cols)
        for e in range(flat_q.shape[0]):  # one expert (or the one matrix) at a time
            s = grid[e if grid.shape[0] > 1 else 0]
            s = s.repeat_interleave(bm, dim=0)[:rows].repeat_interleave(bn, dim=1)[:, :cols]
            torch.mul(flat_q[e].to(torch.float32), s, out=flat_out[e])
        return out

    def block_grid(self, q, scale, key: str):
        """(scale [sr, sc] in its stored dtype, (bm, bn)) of a 2-D FP8 weight q [R, C]: the same reading of the
        scale as `dequantize` (per tensor: one block of R x C; per channel [R] or [R, 1]: blocks of 1 x C)."""
        rows, cols = q.shape
        grid = self._grid(scale, (), rows, cols, key)[0]  # fp32 [sr, sc]
        bm, bn = self._block(grid.shape, rows, cols, key)
        return scale.reshape(grid.shape), (bm, bn)

    def _grid(self, scale, lead: tuple, rows: int, cols: int, key: str):
        import torch

        s = scale.to(torch.float32)
        if s.numel() == 1:
            return s.reshape(1, 1, 1)
        n_lead = math.prod(lead)
        if s.ndim == 1 and s.shape[0] == rows and n_lead == 1:  # per-channel stored flat
            return s.reshape(1, rows, 1)
        if s.ndim < 2 or tuple(s.shape[:-2]) not in (tuple(lead), ()):
            raise CheckpointError(f"{key}: scale of shape {list(scale.shape)} does not fit weight "
                                  f"{[*lead, rows, cols]}")
        return s.reshape(-1, s.shape[-2], s.shape[-1])

    def _block(self, grid: tuple, rows: int, cols: int, key: str) -> tuple[int, int]:
        sr, sc = int(grid[0]), int(grid[1])
        if sr == 1 and sc == 1:
            return rows, cols
        bm, bn = self.block or (math.ceil(rows / sr), math.ceil(cols / sc))
        if (math.ceil(rows / bm), math.ceil(cols / bn)) != (sr, sc):
            raise CheckpointError(f"{key}: scale grid {[sr, sc]} does not match weight [{rows}, {cols}] in blocks "
                                  f"of {[bm, bn]}")
        return bm, bn


@dataclass(frozen=True)
class AwqWeights:
    """AutoAWQ's 4-bit GEMM format (see the module docstring)."""

    group_size: int
    method: str = "awq"

    @classmethod
    def from_config(cls, q: dict, where: str) -> "AwqWeights":
        bits, version = q.get("bits", q.get("w_bit")), str(q.get("version", "gemm")).lower()
        if bits != 4 or version != "gemm" or not q.get("zero_point", True):
            raise CheckpointError(f"{where}: AWQ with bits={bits}, version={version!r}, zero_point="
                                  f"{q.get('zero_point')} is not supported (only 4-bit GEMM with zero points)")
        return cls(int(q.get("group_size", q.get("q_group_size", 128))))

    def describe(self) -> str:
        return f"AWQ 4-bit weights (groups of {self.group_size})"

    def is_auxiliary(self, key: str) -> bool:
        return key.endswith((".qweight", ".qzeros", ".scales"))

    def weight_keys(self, keys) -> dict[str, str]:
        """{"X.weight": "X"} for every AWQ layer X among the checkpoint's keys."""
        return {k[: -len(".qweight")] + ".weight": k[: -len(".qweight")] for k in keys if k.endswith(".qweight")}

    def dequantize(self, qweight, qzeros, scales, key: str):
        """float32 [R, C] (HF's Linear weight) from qweight int32 [C, R/8], qzeros int32 [C/g, R/8], scales [C/g, R]."""
        import torch

        q, z = _unpack_awq(qweight), _unpack_awq(qzeros)  # [C, R], [C/g, R] in 0..15
        c, r = q.shape
        if tuple(scales.shape) != (-(-c // self.group_size), r) or tuple(z.shape) != tuple(scales.shape):
            raise CheckpointError(f"{key}: AWQ tensors do not fit (qweight {list(qweight.shape)}, qzeros "
                                  f"{list(qzeros.shape)}, scales {list(scales.shape)}, group {self.group_size})")
        g = self.group_size
        w = (q - z.repeat_interleave(g, dim=0)[:c]).to(torch.float16) * \
            scales.to(torch.float16).repeat_interleave(g, dim=0)[:c]  # fp16, as AutoAWQ dequantizes
        return w.to(torch.float32).t().contiguous()


def _unpack_awq(packed):
    """int32 [A, B/8] -> int16 [A, B], values 0..15, columns in their true order."""
    import torch

    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (packed.to(torch.int32)[:, :, None] >> shifts) & 0xF  # [A, B/8, 8]: nibble i = column AWQ_ORDER[i]
    order = torch.empty(8, dtype=torch.long)
    order[list(AWQ_ORDER)] = torch.arange(8)
    return nibbles[:, :, order].reshape(packed.shape[0], -1).to(torch.int16)
