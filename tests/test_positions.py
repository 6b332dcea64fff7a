"""MRoPE positions (runtime/positions.py) and vision host inputs (runtime/vision_inputs.py) against HF.

References: HF's `Qwen3VLModel.get_rope_index`, `Qwen2_5_VLModel.get_rope_index` and
`Qwen3VLModel.compute_3d_position_ids` (called on a stand-in `self`, tests/hf_processor.py) and
`transformers.vision_utils`. Prompts are built by HF's `Qwen3VLProcessor` from real images/frames.
"""
from __future__ import annotations

import functools
import types

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import vision_utils as vu

import hf_processor as H
from qwen_vl_trt.export.demo_checkpoint import make_checkpoint
from qwen_vl_trt.runtime import positions as P
from qwen_vl_trt.runtime import vision_inputs as VI

IMAGE_ID, VIDEO_ID = 151655, 151656


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("positions_ckpt"), "qwen3_vl")


@pytest.fixture(scope="module")
def processor(ckpt):
    return H.qwen3_processor(ckpt)


def _hf_inputs(processor, n_images=0, video=None, text="Describe.", sizes=((120, 160), (70, 300))):
    """HF processor output (numpy) for one user turn with images and/or a video (frames of a kept size)."""
    from transformers.video_utils import VideoMetadata

    rng = np.random.default_rng(0)
    content = [{"type": "image"} for _ in range(n_images)]
    if video is not None:
        content.append({"type": "video"})
    content.append({"type": "text", "text": text})
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)
    kwargs = {}
    if n_images:
        kwargs["images"] = [Image.fromarray(rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8))
                            for i in range(n_images)]
    if video is not None:
        n, fps, h, w = video
        kwargs["videos"] = [rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)]
        kwargs["video_metadata"] = [VideoMetadata(total_num_frames=n, fps=fps)]
        kwargs["cap_pixels_per_frame"] = False
    return processor(text=[prompt], return_tensors="np", **kwargs)


CASES = {
    "text_only": dict(),
    "image": dict(n_images=1),
    "two_images": dict(n_images=2),
    "video": dict(video=(9, 4.0, 64, 96)),
    "image_video": dict(n_images=1, video=(13, 3.0, 96, 64)),
    "three_images_wide": dict(n_images=3, sizes=((30, 900), (500, 40), (64, 64))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_qwen3_rope_index_matches_hf(processor, case):
    out = _hf_inputs(processor, **CASES[case])
    args = (out["input_ids"], out["mm_token_type_ids"], out.get("image_grid_thw"), out.get("video_grid_thw"))
    ref_pos, ref_deltas = H.qwen3_get_rope_index(*args)
    pos, deltas = P.qwen3_vl_rope_index(*args)
    assert pos.dtype == np.int64 and deltas.dtype == np.int64 and pos.shape == (3, *out["input_ids"].shape)
    assert np.array_equal(pos, ref_pos)
    assert np.array_equal(deltas, ref_deltas.reshape(-1))
    # mm_token_type_ids derived from the pad ids gives the same answer
    pos2, deltas2 = P.qwen3_vl_rope_index(out["input_ids"], None, *args[2:])
    assert np.array_equal(pos2, ref_pos) and np.array_equal(deltas2, deltas)


def _pad_batch(rows, side):
    """Batch unequal rows (ids, types) with pad id 151643, left or right; returns ids, types, mask."""
    length = max(len(r[0]) for r in rows)
    ids = np.full((len(rows), length), 151643, np.int64)
    types_ = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for b, (row_ids, row_types) in enumerate(rows):
        sl = slice(length - len(row_ids), length) if side == "left" else slice(0, len(row_ids))
        ids[b, sl], types_[b, sl], mask[b, sl] = row_ids, row_types, 1
    return ids, types_, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_qwen3_rope_index_padded_batch_matches_hf(processor, side):
    a = _hf_inputs(processor, n_images=2)
    b = _hf_inputs(processor, text="Hi")
    c = _hf_inputs(processor, n_images=1, video=(9, 4.0, 64, 96), text="What is shown in the image and the video?")
    rows = [(o["input_ids"][0], o["mm_token_type_ids"][0]) for o in (a, b, c)]
    ids, types_, mask = _pad_batch(rows, side)
    images = np.concatenate([a["image_grid_thw"], c["image_grid_thw"]])
    videos = c["video_grid_thw"]
    ref_pos, ref_deltas = H.qwen3_get_rope_index(ids, types_, images, videos, mask)
    pos, deltas = P.qwen3_vl_rope_index(ids, types_, images, videos, mask)
    assert np.array_equal(pos, ref_pos) and np.array_equal(deltas, ref_deltas.reshape(-1))


def test_decode_position_ids_match_hf(processor):
    """Next-token positions after prefill (+ k decoded tokens) vs HF `compute_3d_position_ids` with a cache."""
    from transformers import Qwen3VLModel

    a = _hf_inputs(processor, n_images=1)
    b = _hf_inputs(processor, text="Hello there, a longer text-only prompt.")
    ids, types_, mask = _pad_batch([(o["input_ids"][0], o["mm_token_type_ids"][0]) for o in (a, b)], "left")
    _, deltas = P.qwen3_vl_rope_index(ids, types_, a["image_grid_thw"], None, mask)
    fake = types.SimpleNamespace(rope_deltas=torch.as_tensor(deltas).view(-1, 1))
    fake.get_rope_index = functools.partial(Qwen3VLModel.get_rope_index, fake)
    for k in range(3):  # k tokens already decoded
        full_mask = np.concatenate([mask, np.ones((2, k + 1), np.int64)], axis=1)
        cache_len = ids.shape[1] + k
        cache = types.SimpleNamespace(get_seq_length=lambda n=cache_len: n)
        ref = Qwen3VLModel.compute_3d_position_ids(
            fake, input_ids=torch.zeros(2, 1, dtype=torch.long), inputs_embeds=torch.zeros(2, 1, 8),
            image_grid_thw=torch.as_tensor(a["image_grid_thw"]), attention_mask=torch.as_tensor(full_mask),
            cache=cache, mm_token_type_ids=torch.zeros(2, 1, dtype=torch.long))
        ours = P.decode_position_ids(full_mask[:, :-1].sum(axis=1), deltas)
        assert ours.dtype == np.int64 and ours.shape == (3, 2, 1)
        assert np.array_equal(ours, ref[..., -1:].numpy())
    # unpadded single row: cache length == number of cached tokens
    assert np.array_equal(P.decode_position_ids(10, np.array([-5])), np.full((3, 1, 1), 5))


def _qwen2_5_row(segments):
    """Token ids/types for text runs (int lengths) and vision runs (('image'|'video', grid))."""
    ids, kinds = [], []
    for seg in segments:
        if isinstance(seg, int):
            ids += [100 + i for i in range(seg)]
            kinds += [0] * seg
        else:
            kind, (t, h, w) = seg
            n = t * h * w // 4
            ids += [IMAGE_ID if kind == "image" else VIDEO_ID] * n
            kinds += [1 if kind == "image" else 2] * n
    return np.asarray(ids), np.asarray(kinds)


def test_qwen2_5_rope_index_matches_hf():
    video_long = (3, 22, 26)  # time extent 2*8*... > spatial: the 5.x rule differs from 4.57 here
    cases = [
        ([5, ("image", (1, 8, 12)), 7], [[1, 8, 12]], None, None),
        ([4, ("video", video_long), 6], None, [video_long], [4.0]),  # fps 0.5 -> interval 8
        ([3, ("video", (4, 4, 6)), 2, ("image", (1, 6, 4)), 3, ("video", (2, 8, 8)), 1], [[1, 6, 4]],
         [[4, 4, 6], [2, 8, 8]], [2 / 3, 0.5]),  # fractional: tokens_per_second * s in float32, truncated
        ([4, ("video", (5, 4, 4)), 2], None, [[5, 4, 4]], None),  # second_per_grid_ts defaults to 1
        ([9], None, None, None),
    ]
    for segments, images, videos, secs in cases:
        ids, kinds = _qwen2_5_row(segments)
        ref_pos, ref_deltas = H.qwen2_5_get_rope_index(ids[None], kinds[None], images, videos, secs)
        pos, deltas = P.qwen2_5_vl_rope_index(ids[None], kinds[None], images, videos, secs)
        assert np.array_equal(pos, ref_pos), segments
        assert np.array_equal(deltas, ref_deltas.reshape(-1))


def test_qwen2_5_rope_index_padded_batch_matches_hf():
    r1 = _qwen2_5_row([3, ("video", (3, 8, 8)), 4])
    r2 = _qwen2_5_row([2, ("image", (1, 4, 4)), 1, ("video", (2, 4, 8)), 5])
    ids, types_, mask = _pad_batch([r1, r2], "left")
    args = (ids, types_, [[1, 4, 4]], [[3, 8, 8], [2, 4, 8]], [1.5, 0.4], mask)
    ref_pos, ref_deltas = H.qwen2_5_get_rope_index(*args)
    pos, deltas = P.qwen2_5_vl_rope_index(*args)
    assert np.array_equal(pos, ref_pos) and np.array_equal(deltas, ref_deltas.reshape(-1))


# ---------------------------------------------------------------- vision host inputs

GRIDS = [
    [[1, 2, 2]], [[1, 14, 20]], [[1, 20, 14]], [[2, 4, 6]], [[5, 8, 12]], [[1, 96, 128]],
    [[1, 14, 20], [1, 8, 8]], [[1, 4, 4], [3, 6, 10], [1, 2, 200]], [[1, 48, 48], [1, 50, 46]],
]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "_".join("x".join(map(str, r)) for r in g))
def test_vision_inputs_match_hf(grid):
    g = torch.tensor(grid)
    cu = VI.cu_seqlens(grid)
    assert cu.dtype == np.int32 and np.array_equal(cu, vu.get_vision_cu_seqlens(g).numpy())
    assert VI.max_seqlen(grid) == int((g[:, 1] * g[:, 2]).max())
    rot = VI.rotary_pos_ids(grid, 2)
    ref_rot = vu.get_vision_position_ids(g, 2).numpy()
    assert rot.dtype == np.int64 and rot.shape == ref_rot.shape and np.array_equal(rot, ref_rot)
    idx, w = VI.pos_embed_interpolation(grid, 48, 2)
    ref_idx, ref_w = vu.get_vision_interpolation_indices_and_weights(
        g, 48, mode="bilinear", align_corners=True, spatial_merge_size=2)
    assert idx.dtype == np.int64 and w.dtype == np.float32 and idx.shape == (int(g.prod(1).sum()), 4)
    assert np.array_equal(idx, ref_idx.numpy())
    assert np.array_equal(w, ref_w.numpy())  # bitwise: same float32 ops


@pytest.mark.parametrize("grid", GRIDS + [[[1, 16, 16]], [[2, 34, 50], [1, 6, 2]]],
                         ids=lambda g: "_".join("x".join(map(str, r)) for r in g))
def test_window_index_matches_hf(grid):
    g = torch.tensor(grid)
    win, cu = VI.window_index(grid, 2, 112, 14)
    ref_win, ref_cu = vu.get_vision_window_index(g, 2, 112, 14)
    assert win.dtype == np.int64 and cu.dtype == np.int32
    assert np.array_equal(win, ref_win.numpy()) and np.array_equal(cu, ref_cu.numpy())
