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
    half = head_dim // 2
    inv_freq = _inv_freq(theta, head_dim, head_dim)
    axis = np.zeros(half, np.int64)
    if interleaved:
        for dim, offset in ((1, 1), (2, 2)):
            axis[offset: mrope_section[dim] * 3: 3] = dim
    else:
        bounds = np.cumsum(mrope_section)
        axis[bounds[0]:bounds[1]] = 1
        axis[bounds[1]:bounds[2]] = 2
    return inv_freq.astype(np.float32), axis


def vision_tables(head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    spatial = head_dim // 2
    f = _inv_freq(theta, spatial, spatial)
    inv_freq = np.concatenate([f, f]).astype(np.float32)
    axis = np.concatenate([np.zeros(len(f), np.int64), np.ones(len(f), np.int64)])
    return inv_freq, axis


def _inv_freq(theta: float, stop: int, dim: int) -> np.ndarray:
    """1 / theta^(arange(0, stop, 2) / dim), in torch float32 exactly as HF computes it (bit-identical)."""
    import torch

    return (1.0 / (theta ** (torch.arange(0, stop, 2, dtype=torch.float) / dim))).numpy()
