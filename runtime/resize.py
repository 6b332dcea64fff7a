"""torchvision's uint8 antialiased bicubic resize (`tvF.resize(..., BICUBIC, antialias=True)` on uint8 CPU
tensors -> torch's `_upsample_bicubic2d_aa` uint8 kernel) in numpy, no torch (rule G10).

HF's torchvision-backed processors resize with it: the video processors and, when torchvision is installed,
the default (`AutoProcessor`) Qwen2-VL image processor. float64 Keys-cubic weights (a = -0.5) are quantized to
int16 with torch's precision rule, then a width pass and a height pass run in integers, each rounded and
clamped to uint8; the result is bitwise equal to torchvision (tests/test_video_vs_hf.py, tests/test_preprocess.py).
PIL's bicubic is not: its 22-bit weights move ~0.5% of values by 1-2 levels, and Pillow 13 runs the height pass
first when an image is widened and shortened, which clamps differently (up to 26 levels on noise images).
"""
from __future__ import annotations

import functools
import math

import numpy as np


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution, a = -0.5 (torch `HelperInterpCubic::aa_filter`), in torch's operation order."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _int16_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """torch `_compute_index_ranges_int16_weights` (bicubic, antialias, align_corners=False) for one axis:
    first input index per output int64 [out], integer weights int64 [out, K], precision bits."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0  # the filter widens by `scale` when downscaling
    taps = math.ceil(support) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size) + 0.5)
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xsize = np.clip(np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - xmin, 0, taps)
    j = np.arange(taps)
    w = np.where(j < xsize[:, None], _keys_cubic((j + xmin[:, None] - center[:, None] + 0.5) * invscale), 0.0)
    total = np.zeros(out_size)
    for k in range(taps):  # left to right, as torch sums: the order decides the last bit
        total = total + w[:, k]
    w = w / np.where(total == 0.0, 1.0, total)[:, None]
    wt_max = max(float(w.max()), 0.0)
    precision = 0  # the most bits that keep round(2 * wt_max * 2^bits) below 2^15 (at most 22)
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    v = w * (1 << precision)
    return xmin, np.where(v < 0, np.trunc(v - 0.5), np.trunc(v + 0.5)).astype(np.int64), precision


@functools.lru_cache(maxsize=8)
def _band_blocks(in_size: int, out_size: int, block: int = 16) -> tuple[list, int]:
    """The weights as dense float64 blocks: (j0, j1, lo, hi, W [hi-lo, j1-j0]) for outputs j0..j1-1."""
    xmin, weights, precision = _int16_weights(in_size, out_size)
    taps = weights.shape[1]
    blocks = []
    for j0 in range(0, out_size, block):
        j1 = min(j0 + block, out_size)
        lo, hi = int(xmin[j0]), min(int(xmin[j1 - 1]) + taps, in_size)  # xmin is non-decreasing
        dense = np.zeros((hi - lo, j1 - j0))
        for j in range(j0, j1):
            n = min(taps, in_size - int(xmin[j]))
            dense[xmin[j] - lo:xmin[j] - lo + n, j - j0] = weights[j, :n]
        blocks.append((j0, j1, lo, hi, dense))
    return blocks, precision


def _resample_axis(frames: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One integer pass along W (axis -1) or H (axis -2) of uint8 [F, C, H, W], one frame at a time.

    Pixels (< 2^8) times weights (< 2^15) summed over a few dozen taps stay far below 2^53, so the float64
    products are exact in any summation order; floor((acc + 2^(p-1)) / 2^p) is torch's `>> p`, then clamp."""
    blocks, precision = _band_blocks(frames.shape[axis], out_size)
    shape = list(frames.shape)
    shape[axis] = out_size
    out = np.empty(shape, np.uint8)
    for f in range(frames.shape[0]):
        x = frames[f].astype(np.float64)  # [C, H, W]
        acc = np.empty(shape[1:])
        for j0, j1, lo, hi, dense in blocks:
            if axis == -1:
                acc[:, :, j0:j1] = x[:, :, lo:hi] @ dense
            else:
                acc[:, j0:j1, :] = dense.T @ x[:, lo:hi, :]
        out[f] = np.clip(np.floor((acc + (1 << (precision - 1))) / (1 << precision)), 0, 255)
    return out


def resize_bicubic_aa(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [F, C, H, W] -> uint8 [F, C, height, width], bitwise as torchvision `resize(BICUBIC, antialias=True)`
    on uint8 CPU tensors: the width pass first, its result rounded to uint8, then the height pass; an axis
    that keeps its size is not touched."""
    if frames.shape[-1] != width:
        frames = _resample_axis(frames, width, axis=-1)
    if frames.shape[-2] != height:
        frames = _resample_axis(frames, height, axis=-2)
    return frames
