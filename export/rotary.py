"""Rotary frequency tables: which position axis and which inverse frequency feed each rotary pair.

Every rotary variant of the family is `angle[n, i] = positions[n, axis[i]] * inv_freq[i]` for i < D/2
(then rotate-half over cat(angle, angle)); only the tables differ:
- Qwen3-VL text, interleaved MRoPE (HF Qwen3VLTextRotaryEmbedding.recomposition_frequencies): frequency i
  takes H if i % 3 == 1 and i < 3*sec[1], W if i % 3 == 2 and i < 3*sec[2], else T; inv_freq_i = theta^(-2i/D).
- Qwen2.5-VL text, chunked: the first sec[0] frequencies T, the next sec[1] H, the last sec[2] W.
- Vision 2-D rotary (HF Qwen3VLVisionRotaryEmbedding / Qwen2_5_VisionRotaryEmbedding): D/4 frequencies
  f_j = theta^(-2j/(D/2)) for the row, then the same D/4 for the column.
"""
from __future__ import annotations

import numpy as np


def text_tables(head_dim: int, theta: float, mrope_section, interleaved: bool) -> tuple[np.ndarray, np.ndarray]:
    """(inv_freq float32 [D/2], axis int64 [D/2]) of the text MRoPE; positions are (t, h, w)."""
    half = head_dim // 2
    sec = [int(s) for s in mrope_section]
    if head_dim % 2 or len(sec) != 3 or sum(sec) != half:
        raise ValueError(f"mrope_section {sec} must have 3 entries summing to head_dim/2 = {half}")
    i = np.arange(half)
    if interleaved:
        axis = np.zeros(half, np.int64)
        axis[(i % 3 == 1) & (i < 3 * sec[1])] = 1
        axis[(i % 3 == 2) & (i < 3 * sec[2])] = 2
    else:
        axis = np.repeat(np.arange(3, dtype=np.int64), sec)
    return _inv_freq(head_dim, theta), axis


def vision_tables(head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """(inv_freq float32 [D/2], axis int64 [D/2]) of the 2-D vision rotary; positions are (h, w)."""
    if head_dim % 4:
        raise ValueError(f"vision head_dim {head_dim} must be a multiple of 4")
    f = _inv_freq(head_dim // 2, theta)
    return np.concatenate([f, f]), np.repeat(np.arange(2, dtype=np.int64), head_dim // 4)


def _inv_freq(dim: int, theta: float) -> np.ndarray:
    """1 / theta^(arange(0, dim, 2) / dim) as float32, bit-identical to HF's rope init.

    HF evaluates `base ** (arange(0, dim, 2).float() / dim)` with torch's fp32 pow, which is not correctly
    rounded; the export always has torch, so we evaluate the same expression. Without torch (a torch-free
    caller) the fp32 power is rounded from fp64: at most 1 ulp from HF's value for a few frequencies.
    """
    try:
        import torch
    except ImportError:
        exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        return np.float32(1.0) / np.power(np.float64(theta), exponent.astype(np.float64)).astype(np.float32)
    return (1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))).numpy().astype(np.float32)
