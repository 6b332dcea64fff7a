"""MRoPE position ids: numpy ports of `Qwen3VLModel.get_rope_index` and `Qwen2_5_VLModel.get_rope_index`
(transformers 5.24), plus the decode-step rule.

Walk the runs of equal `mm_token_type_ids` (0 text, 1 image pad, 2 video pad) of the unpadded tokens:
- text run of length L: `cur .. cur+L-1` on all three axes; `cur += L`;
- vision run with merged grid (t, h/m, w/m): T = cur + floor(t_idx * interval), H = cur + row,
  W = cur + col (row-major over merged tokens); then `cur += max(h, w) / m` (5.x rule, also for
  Qwen2.5-VL videos whose time extent exceeds that; 4.57 used max(position)+1 there).
Qwen3-VL splits each video into one run per temporal patch (timestamps sit between them), so its
interval never matters; Qwen2.5-VL uses interval `tokens_per_second * second_per_grid_ts` in float32.
Padding positions (attention_mask == 0) are 0; `rope_deltas = max(position) + 1 - n_valid_tokens`.
"""
from __future__ import annotations

import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2


def mm_token_type_ids(input_ids: np.ndarray, image_token_id: int, video_token_id: int) -> np.ndarray:
    """0 text, 1 image pad, 2 video pad -- as HF's processor `create_mm_token_type_ids`. int64, same shape."""
    ids = np.asarray(input_ids)
    out = np.zeros(ids.shape, np.int64)
    out[ids == image_token_id] = IMAGE
    out[ids == video_token_id] = VIDEO
    return out


def _runs(types: np.ndarray) -> list[tuple[int, int, int]]:
    """(type, start, end) for each run of equal values."""
    if len(types) == 0:
        return []
    starts = np.concatenate([[0], np.flatnonzero(np.diff(types)) + 1])
    ends = np.concatenate([starts[1:], [len(types)]])
    return [(int(types[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def _vision_block(cur: int, grid, merge: int, interval: np.float32 | int) -> np.ndarray:
    """[3, t*h*w/m^2] positions of one vision run starting at `cur`."""
    t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
    if isinstance(interval, np.floating):
        # torch: arange(t) (long) * float32 scalar tensor -> float32, then .long() truncates
        tpos = (np.arange(t, dtype=np.float32) * np.float32(interval)).astype(np.int64)
    else:
        tpos = np.arange(t, dtype=np.int64) * int(interval)
    pos = np.empty((3, t, h, w), np.int64)
    pos[0] = tpos[:, None, None] + cur
    pos[1] = np.arange(h)[None, :, None] + cur
    pos[2] = np.arange(w)[None, None, :] + cur
    return pos.reshape(3, -1)


def _rope_index(input_ids, types, grids: dict, attention_mask, merge: int, intervals) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(input_ids)
    types = np.asarray(types)
    batch, seq = ids.shape
    mask = np.ones((batch, seq), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    position_ids = np.zeros((3, batch, seq), np.int64)
    deltas = np.zeros(batch, np.int64)
    iters = {IMAGE: iter(grids[IMAGE]), VIDEO: iter(grids[VIDEO])}
    for b in range(batch):
        cur, blocks = 0, []
        for kind, start, end in _runs(types[b][mask[b]]):
            if kind == TEXT:
                blocks.append(np.broadcast_to(np.arange(start, end, dtype=np.int64) - start + cur, (3, end - start)))
                cur += end - start
            else:
                grid = next(iters[kind])
                blocks.append(_vision_block(cur, grid, merge, intervals(kind)))
                cur += max(int(grid[1]), int(grid[2])) // merge
        pos = np.concatenate(blocks, axis=1) if blocks else np.zeros((3, 0), np.int64)
        position_ids[:, b, mask[b]] = pos
        deltas[b] = (pos.max() + 1 if pos.size else 0) - int(mask[b].sum())
    return position_ids, deltas


def _as_grids(grid_thw) -> np.ndarray:
    return np.zeros((0, 3), np.int64) if grid_thw is None else np.asarray(grid_thw, np.int64).reshape(-1, 3)


def qwen3_vl_rope_index(input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None,
                        attention_mask=None, *, spatial_merge_size: int = 2, image_token_id: int = 151655,
                        video_token_id: int = 151656) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-VL `get_rope_index` -> (position_ids int64 [3, B, S], rope_deltas int64 [B]).

    `input_ids` int [B, S]; `mm_token_type_ids` [B, S] (derived from the pad token ids when None);
    grids int [n, 3] in prompt order; `attention_mask` [B, S] (left or right padding) or None.
    """
    ids = np.atleast_2d(np.asarray(input_ids))
    types = mm_token_type_ids if mm_token_type_ids is not None else mm_token_type_ids_of(ids, image_token_id, video_token_id)
    videos = _as_grids(video_grid_thw)
    videos = np.repeat(videos, videos[:, 0], axis=0)  # one run per temporal patch
    videos[:, 0] = 1
    grids = {IMAGE: _as_grids(image_grid_thw), VIDEO: videos}
    return _rope_index(ids, np.atleast_2d(types), grids, attention_mask, spatial_merge_size, lambda kind: 1)


def qwen2_5_vl_rope_index(input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None,
                          second_per_grid_ts=None, attention_mask=None, *, spatial_merge_size: int = 2,
                          tokens_per_second: int = 2, image_token_id: int = 151655,
                          video_token_id: int = 151656) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL `get_rope_index` (5.24 rule) -> (position_ids int64 [3, B, S], rope_deltas int64 [B]).

    Video temporal positions step by `tokens_per_second * second_per_grid_ts[i]` (float32, truncated);
    `second_per_grid_ts` defaults to 1 per video, as HF.
    """
    ids = np.atleast_2d(np.asarray(input_ids))
    types = mm_token_type_ids if mm_token_type_ids is not None else mm_token_type_ids_of(ids, image_token_id, video_token_id)
    videos = _as_grids(video_grid_thw)
    secs = np.ones(len(videos), np.float32) if second_per_grid_ts is None else np.asarray(second_per_grid_ts, np.float32).reshape(-1)
    sec_iter = iter(secs)

    def interval(kind):
        if kind == VIDEO:  # tokens_per_second (int) * float32 tensor -> float32
            return np.float32(np.float32(tokens_per_second) * next(sec_iter))
        return 1

    grids = {IMAGE: _as_grids(image_grid_thw), VIDEO: videos}
    return _rope_index(ids, np.atleast_2d(types), grids, attention_mask, spatial_merge_size, interval)


def qwen3_vl_prompt_positions(spec, input_ids, mm_token_type_ids, image_grids, video_grids, video):
    """The family's `rope_index` (model/families.py): one prompt [1, S] of `spec`'s model -> (positions int64
    [3, 1, S], rope delta int64 [1]); `video` (runtime/video.py VideoInputs or None) is not needed here."""
    return qwen3_vl_rope_index(input_ids, mm_token_type_ids, image_grids or None, video_grids or None,
                               **_token_kwargs(spec))


def qwen2_5_vl_prompt_positions(spec, input_ids, mm_token_type_ids, image_grids, video_grids, video):
    """As `qwen3_vl_prompt_positions`; video time steps from the video's `second_per_grid_ts`."""
    return qwen2_5_vl_rope_index(input_ids, mm_token_type_ids, image_grids or None, video_grids or None,
                                 second_per_grid_ts=[video.second_per_grid_ts] if video is not None else None,
                                 tokens_per_second=int(spec.vision.tokens_per_second), **_token_kwargs(spec))


def _token_kwargs(spec) -> dict:
    return dict(spatial_merge_size=spec.vision.spatial_merge_size, image_token_id=spec.image_token_id,
                video_token_id=spec.video_token_id)


mm_token_type_ids_of = mm_token_type_ids


def decode_position_ids(cache_len, rope_deltas) -> np.ndarray:
    """Positions of the next token when `cache_len` real (non-pad) tokens are cached: int64 [3, B, 1].

    All three axes get `cache_len + rope_deltas` (HF: `attention_mask.cumsum(-1) - 1 + rope_deltas` for the
    new token). `cache_len` is an int or int [B] (per row, when rows were padded differently).
    """
    deltas = np.asarray(rope_deltas, np.int64).reshape(-1)
    pos = np.asarray(cache_len, np.int64).reshape(-1) + deltas  # [B]
    return np.broadcast_to(pos[None, :, None], (3, len(deltas), 1)).copy()
