"""Host-side tensors the vision graph takes: numpy ports of `transformers/vision_utils.py` (5.24).

All functions take `grid_thw` int [n, 3] (one row per image / video, in prompt order) and return exactly
what HF computes (same dtypes, same float32 arithmetic), so the exported graph sees HF's values:

| function | HF function | returns |
|---|---|---|
| `cu_seqlens` | `get_vision_cu_seqlens` | int32 [n_frames + 1] |
| `rotary_pos_ids` | `get_vision_position_ids(grid, merge)` | int64 [T, 2] (h, w) |
| `pos_embed_interpolation` | `get_vision_interpolation_indices_and_weights(bilinear, align_corners=True)` | int64 [T, 4], float32 [T, 4] |
| `window_index` | `get_vision_window_index` | int64 [T / merge^2], int32 [n_windows + 1] |

T = sum(t*h*w) patches. Vectorized per image (no per-patch Python loops). `qwen3_vl_feeds` / `qwen2_5_vl_feeds` are
the families' `vision_feeds` (model/families.py): the vision inputs that differ between the families.
"""
from __future__ import annotations

import numpy as np


def _grid(grid_thw) -> np.ndarray:
    return np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)


def cu_seqlens(grid_thw) -> np.ndarray:
    """Attention segment boundaries: one segment of h*w patches per temporal patch. int32 [n_frames + 1]."""
    g = _grid(grid_thw)
    seqlens = np.repeat(g[:, 1] * g[:, 2], g[:, 0])
    return np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)


def max_seqlen(grid_thw) -> int:
    g = _grid(grid_thw)
    return int((g[:, 1] * g[:, 2]).max()) if len(g) else 0


def _merge_order_rc(h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each patch of an h x w grid, in merge-block order (block_row, block_col, in_row, in_col)."""
    rows = np.arange(h).reshape(h // merge, merge, 1, 1)
    cols = np.arange(w).reshape(1, 1, w // merge, merge)
    shape = (h // merge, merge, w // merge, merge)
    r = np.broadcast_to(rows, shape).transpose(0, 2, 1, 3).reshape(-1)
    c = np.broadcast_to(cols, shape).transpose(0, 2, 1, 3).reshape(-1)
    return r, c


def rotary_pos_ids(grid_thw, spatial_merge_size: int) -> np.ndarray:
    """Vision 2D rope ids (h, w) per patch, merge-block order, repeated per temporal patch. int64 [T, 2]."""
    out = []
    for t, h, w in _grid(grid_thw).tolist():
        r, c = _merge_order_rc(h, w, spatial_merge_size)
        out.append(np.tile(np.stack([r, c], axis=-1), (t, 1)))
    return np.concatenate(out, axis=0).astype(np.int64) if out else np.zeros((0, 2), np.int64)


def _axis_taps(index: np.ndarray, size: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear align_corners=True taps/weights along one axis, float32 like HF (`_interpolation_axis_taps_weights`)."""
    index = index.astype(np.float32)
    denom = np.maximum(size - 1, 1).astype(np.float32)  # torch divides a float32 tensor by a long one in float32
    src = index * np.float32(side - 1) / denom
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
    weights = np.maximum(np.float32(1) - distance, np.float32(0))
    return taps, weights.astype(np.float32)


def pos_embed_interpolation(grid_thw, num_grid_per_side: int, spatial_merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-VL learned pos-embed resampling: gather indices int64 [T, 4] and weights float32 [T, 4].

    The 4 taps are (h0,w0), (h0,w1), (h1,w0), (h1,w1) into the flattened side x side table.
    """
    rows, cols, heights, widths = [], [], [], []
    for t, h, w in _grid(grid_thw).tolist():
        r, c = _merge_order_rc(h, w, spatial_merge_size)
        rows.append(np.tile(r, t))
        cols.append(np.tile(c, t))
        heights.append(np.full(t * h * w, h, np.int64))
        widths.append(np.full(t * h * w, w, np.int64))
    if not rows:
        return np.zeros((0, 4), np.int64), np.zeros((0, 4), np.float32)
    side = num_grid_per_side
    h_taps, h_w = _axis_taps(np.concatenate(rows), np.concatenate(heights), side)
    w_taps, w_w = _axis_taps(np.concatenate(cols), np.concatenate(widths), side)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
    return indices.astype(np.int64), weights.astype(np.float32)


def window_index(grid_thw, spatial_merge_size: int, window_size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL window attention: merged-token permutation int64 [T / m^2] and cu_window_seqlens int32.

    Windows are `window_size // merge // patch` merged tokens on a side, tiled from the top-left;
    `cu_window_seqlens` counts patches (x m^2) and drops empty windows (unique_consecutive), as HF.
    """
    vws = window_size // spatial_merge_size // patch_size
    unit = spatial_merge_size ** 2
    indices, cu = [], [0]
    offset = 0
    for t, h, w in _grid(grid_thw).tolist():
        lh, lw = h // spatial_merge_size, w // spatial_merge_size
        pad_h, pad_w = vws - lh % vws, vws - lw % vws  # HF pads a full window when already divisible
        nh, nw = (lh + pad_h) // vws, (lw + pad_w) // vws
        idx = np.full((t, lh + pad_h, lw + pad_w), -100, np.int64)
        idx[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
        idx = idx.reshape(t, nh, vws, nw, vws).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, vws * vws)
        seqlens = (idx != -100).sum(axis=2).reshape(-1)
        flat = idx.reshape(-1)
        indices.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(seqlens) * unit + cu[-1]).tolist())
        offset += t * lh * lw
    cu_arr = np.asarray(cu, dtype=np.int32)
    keep = np.concatenate([[True], cu_arr[1:] != cu_arr[:-1]])  # torch.unique_consecutive
    win = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    return win.astype(np.int64), cu_arr[keep]


def qwen3_vl_feeds(spec, grid_thw) -> dict:
    """Qwen3-VL's own vision inputs: the learned position table's bilinear taps and weights."""
    indices, weights = pos_embed_interpolation(grid_thw, spec.vision.num_grid_per_side, spec.vision.spatial_merge_size)
    return {"pos_embed_indices": indices, "pos_embed_weights": weights}


def qwen2_5_vl_feeds(spec, grid_thw) -> dict:
    """Qwen2.5-VL's own vision inputs: the window permutation and the windows' cumulative lengths."""
    v = spec.vision
    index, cu_windows = window_index(grid_thw, v.spatial_merge_size, v.window_size, v.patch_size)
    return {"window_index": index, "cu_window_seqlens": cu_windows}
