"""FP8 checkpoints: weights stored as float8 with scales, dequantized as they are read.

Two on-disk formats, named by config.json `quantization_config`:

| `quant_method` | who writes it | weight | its scale | meaning |
|---|---|---|---|---|
| `fp8` | Qwen's official `*-FP8` releases (HF `FineGrainedFP8Config`) | `X.weight` float8_e4m3fn [.., R, C] | `X.weight_scale_inv` [.., ceil(R/bm), ceil(C/bn)] (bm, bn = `weight_block_size`; absent: one scale) | W = q * scale |
| `compressed-tensors`, `format: float-quantized` | llm-compressor `FP8` / `FP8_DYNAMIC` / `FP8_BLOCK` | `X.weight` float8_e4m3fn | `X.weight_scale`: per tensor [1], per channel [R, 1], per group [R, C/g] or per block | W = q * scale |

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

from .spec import CheckpointError

FP8_METHODS = ("fp8", "compressed-tensors")


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
            f"(quant_method {' / '.join(FP8_METHODS)}). Export the unquantized checkpoint instead")

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
