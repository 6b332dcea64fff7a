"""runtime/video.py against HF's real video processors, torchvision resize included, on frames that need resizing.

Reference: transformers' `Qwen3VLVideoProcessor` and `Qwen2VLVideoProcessor` (Qwen2.5-VL's) exactly as shipped
(tests/hf_processor.py `real_*`: torchvision backend, nothing replaced), and its `Qwen3VLProcessor` /
`Qwen2_5_VLProcessor` for the prompt. HF gets the uint8 frames as arrays with `VideoMetadata(total, fps)`; our
side reads the same frames back from a PNG frame directory, as `trt-run --video DIR --frames-fps` does.

Each case checks: sampled frame indices, `video_grid_thw`, `pixel_values_videos`, the Qwen3-VL per-temporal-patch
timestamps (vs HF's `_calculate_timestamps`) or the Qwen2.5-VL `second_per_grid_ts` (from HF's processor output),
and `input_ids` / `mm_token_type_ids` from HF's processor on the chat template's text.

Tolerance: pixel_values are compared exactly (max |diff| == 0, asserted and measured). HF resizes video frames
with torchvision `resize(BICUBIC, antialias=True)` on uint8 tensors, i.e. torch's uint8 `_upsample_bicubic2d_aa`
kernel (int16 fixed-point weights, a width pass rounded to uint8, then a height pass); runtime/video.py
`resize_bicubic_aa` ports that kernel to numpy, and normalize/patchify were already the same float32 ops.
`test_pil_bicubic_is_not_hf` keeps the reason on record: the PIL bicubic resize used before differs from HF.

torchvision is required (collection fails without it, never a skip): scripts/setup.sh installs torch 2.14.1
with torchvision 0.29.1, a pair that imports together.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

try:
    import torchvision  # noqa: F401  HF's video processors resize with it
except Exception as e:  # ImportError, or a torchvision built for another torch
    raise ImportError("tests/test_video_vs_hf.py needs torchvision importable beside torch (HF's video processors "
                      "resize with it): run scripts/setup.sh (torch==2.14.1 torchvision==0.29.1)") from e

import hf_processor as H
from qwen_vl_trt.runtime import preprocess as pp
from qwen_vl_trt.runtime import prompt as P
from qwen_vl_trt.runtime import video as V


def _write_frames(directory, n, h, w, seed):
    """Random RGB frames (noise: every resize rounding decision shows) as PNGs; returns uint8 [n, h, w, 3]."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    directory.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(directory / f"{i:04d}.png")
    return frames


def _config_dir(tmp_path, ckpt, name, overrides):
    """A copy of the checkpoint's processor config with `overrides`: both sides read the same JSON."""
    d = tmp_path / "cfg"
    d.mkdir()
    raw = {**json.loads((ckpt / name).read_text()), **overrides}
    (d / name).write_text(json.dumps(raw))
    return d


def _assert_pixels_exact(ours, ref):
    assert ours.dtype == np.float32 and ref.dtype == np.float32 and ours.shape == ref.shape
    assert float(np.abs(ours - ref).max()) == 0.0 and np.array_equal(ours, ref)


# name: (frames, frames_fps, height, width, video_preprocessor_config overrides). Resized size in the comment.
QWEN3_CASES = {
    "down_4f": (9, 4.0, 70, 101, {}),  # -> 64x96
    "height_only_7f_padded": (7, 2.0, 120, 160, {}),  # -> 128x160; 7 frames: the last is repeated
    "wide_min_frames": (30, 24.0, 240, 426, {}),  # int(2.5) = 2 -> min_frames 4; 240/32 = 7.5 -> 8 (half-even)
    "tall_11f_padded": (11, 2.0, 426, 240, {}),  # -> 416x256
    "thin_side_upscaled_5f": (5, 1.0, 17, 300, {}),  # side < 32: first scaled to 32x564, then 32x576
    "max_frames_9": (300, 30.0, 48, 80, {"max_frames": 9}),  # 20 -> 9 sampled (odd); 80/32 = 2.5 -> 64
    "fps_1_ntsc": (60, 29.97, 90, 160, {"fps": 1.0}),  # int(2.002) -> min 4; timestamps at 29.97 fps
    "min_frames_6": (30, 24.0, 100, 100, {"min_frames": 6}),  # -> 96x96
    "clip_budget_720p": (8, 4.0, 720, 1280, {"size": {"shortest_edge": 4096, "longest_edge": 64 * 64 * 8}}),  # -> 64x96
}


@pytest.mark.parametrize("name", list(QWEN3_CASES))
def test_qwen3_video_matches_hf(tmp_path, qwen3_vl_ckpt, name):
    from transformers import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    n, fps, h, w, overrides = QWEN3_CASES[name]
    frames = _write_frames(tmp_path / "frames", n, h, w, seed=n * 1000 + h)
    cfg_dir = _config_dir(tmp_path, qwen3_vl_ckpt, "video_preprocessor_config.json", overrides)
    ours = V.preprocess_video_qwen3(tmp_path / "frames", V.VideoProcessorConfig.from_dir(cfg_dir), frames_fps=fps)
    hf = H.real_qwen3_video_processor(cfg_dir)
    ref = hf(videos=[frames], video_metadata=[VideoMetadata(total_num_frames=n, fps=fps)], return_tensors="np",
             return_metadata=True, cap_pixels_per_frame=False)
    indices = ref["video_metadata"][0].frames_indices
    assert np.array_equal(ours.frame_indices, indices)
    assert tuple(ref["video_grid_thw"][0].tolist()) == ours.grid_thw
    assert (ours.grid_thw[1] * 16, ours.grid_thw[2] * 16) != (h, w)  # the frames really were resized
    _assert_pixels_exact(ours.pixel_values, ref["pixel_values_videos"])
    stamps = Qwen3VLProcessor._calculate_timestamps(None, indices, fps, 2)
    assert ours.timestamps == tuple(stamps) and len(stamps) == ours.grid_thw[0]

    processor = H.qwen3_processor(qwen3_vl_ckpt, video_processor=hf)
    messages = P.build_messages("What happens?", video=True)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = processor(text=[text], videos=[frames], video_metadata=[VideoMetadata(total_num_frames=n, fps=fps)],
                     return_tensors="np", cap_pixels_per_frame=False)
    built = P.build_prompt(P.Tokenizer(qwen3_vl_ckpt), messages, video_grids=[ours.grid_thw],
                           video_timestamps=[ours.timestamps])
    assert np.array_equal(built.input_ids, full["input_ids"][0])
    assert np.array_equal(built.mm_token_type_ids, full["mm_token_type_ids"][0])
    assert np.array_equal(ours.pixel_values, full["pixel_values_videos"])


# name: (frames, frames_fps, height, width, preprocessor_config overrides). Per-frame limits (Qwen2.5-VL).
QWEN2_5_CASES = {
    "both_sides_4f": (12, 6.0, 50, 90, {}),  # -> 56x84
    "tall_6f": (7, 2.0, 100, 57, {}),  # 7 -> 6 sampled (a multiple of 2); -> 112x56
    "strip_min_frames": (40, 24.0, 30, 500, {}),  # 3.3 -> min 4; -> 28x504
    "max_pixels_vga": (9, 3.0, 480, 640, {"max_pixels": 28 * 28 * 64}),  # -> 168x252
}


@pytest.mark.parametrize("name", list(QWEN2_5_CASES))
def test_qwen2_5_video_matches_hf(tmp_path, qwen2_5_vl_ckpt, name):
    from transformers.video_utils import VideoMetadata

    n, fps, h, w, overrides = QWEN2_5_CASES[name]
    frames = _write_frames(tmp_path / "frames", n, h, w, seed=n * 1000 + h)
    cfg_dir = _config_dir(tmp_path, qwen2_5_vl_ckpt, "preprocessor_config.json", overrides)
    cfg = V.VideoProcessorConfig.from_dir(cfg_dir)
    ours = V.preprocess_video_qwen2_5(tmp_path / "frames", cfg, frames_fps=fps)
    hf = H.real_qwen2_video_processor(H._config_kwargs(cfg_dir / "preprocessor_config.json"))
    call = dict(video_metadata=[VideoMetadata(total_num_frames=n, fps=fps)], do_sample_frames=True, fps=cfg.fps,
                return_tensors="np", cap_pixels_per_frame=False)
    ref = hf(videos=[frames], return_metadata=True, **call)
    assert np.array_equal(ours.frame_indices, np.asarray(ref["video_metadata"][0].frames_indices))
    assert tuple(ref["video_grid_thw"][0].tolist()) == ours.grid_thw
    assert (ours.grid_thw[1] * 14, ours.grid_thw[2] * 14) != (h, w)
    _assert_pixels_exact(ours.pixel_values, ref["pixel_values_videos"])

    processor = H.qwen2_5_processor(qwen2_5_vl_ckpt, video_processor=hf)
    messages = P.build_messages("What happens?", video=True)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = processor(text=[text], videos=[frames], **call)
    assert list(full["second_per_grid_ts"]) == [ours.second_per_grid_ts]
    built = P.build_prompt(P.Tokenizer(qwen2_5_vl_ckpt), messages, video_grids=[ours.grid_thw], family="qwen2_5_vl")
    assert np.array_equal(built.input_ids, full["input_ids"][0])
    assert np.array_equal(built.mm_token_type_ids, full["mm_token_type_ids"][0])


def test_qwen2_5_odd_unsampled_frames_pad_like_hf(qwen2_5_vl_ckpt):
    """HF's Qwen2-VL class default `do_sample_frames=False` keeps all 5 frames: the 5th is repeated (grid_t 3)."""
    from transformers.video_utils import VideoMetadata

    frames = np.random.default_rng(5).integers(0, 256, (5, 45, 70, 3), dtype=np.uint8)
    cfg = V.VideoProcessorConfig.from_dir(qwen2_5_vl_ckpt)
    ours = V.qwen2_5_video_from_frames([Image.fromarray(f) for f in frames], np.arange(5), 10.0, 5, cfg)
    hf = H.real_qwen2_video_processor(H._config_kwargs(qwen2_5_vl_ckpt / "preprocessor_config.json"))
    ref = hf(videos=[frames], video_metadata=[VideoMetadata(total_num_frames=5, fps=10.0)], return_tensors="np",
             cap_pixels_per_frame=False)
    assert ours.grid_thw == tuple(ref["video_grid_thw"][0].tolist()) == (3, 4, 4)  # 45x70 -> 56x56 (2.5 -> 2)
    _assert_pixels_exact(ours.pixel_values, ref["pixel_values_videos"])


@pytest.mark.parametrize("height,width", [(240, 426), (426, 240)])
def test_pil_bicubic_is_not_hf(qwen3_vl_ckpt, height, width):
    """Why the port exists: PIL's bicubic resize (runtime/video.py before) is not what HF's video processor computes.

    Measured with Pillow 13.0 on these noise frames: 240x426 -> 256x416 differs by up to 2 uint8 levels (0.0157 in
    pixel_values) on 0.4% of values (22-bit vs int16 weights); 426x240 -> 416x256 by up to 22 levels (0.173) on
    32%, because Pillow then resizes the height first and torchvision always the width first."""
    from transformers.video_utils import VideoMetadata

    frames = np.random.default_rng(0).integers(0, 256, (4, height, width, 3), dtype=np.uint8)
    hf = H.real_qwen3_video_processor(qwen3_vl_ckpt)
    ref = hf(videos=[frames], video_metadata=[VideoMetadata(total_num_frames=4, fps=2.0)], return_tensors="np",
             cap_pixels_per_frame=False)
    cfg = V.VideoProcessorConfig.from_dir(qwen3_vl_ckpt).image
    _, gh, gw = tuple(ref["video_grid_thw"][0].tolist())
    pil = np.stack([np.asarray(Image.fromarray(f).resize((gw * 16, gh * 16), Image.Resampling.BICUBIC))
                    for f in frames]).transpose(0, 3, 1, 2)  # [F, 3, H, W]
    pil_values, grid = pp.patchify(V.fused_normalize(pil, cfg), cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)
    assert grid == tuple(ref["video_grid_thw"][0].tolist())
    assert np.abs(pil_values - ref["pixel_values_videos"]).max() > 0
    ours = V.frames_to_array([Image.fromarray(f) for f in frames], gh * 16, gw * 16)
    assert np.array_equal(pp.patchify(V.fused_normalize(ours, cfg), 16, 2, 2)[0], ref["pixel_values_videos"])


def _resize_sweep(seed: int, n: int) -> list[str]:
    """`resize_bicubic_aa` vs torchvision on `n` random (H, W) -> (h, w), up and down, one axis or both."""
    import torch
    from torchvision.transforms.v2 import functional as tvF

    rng = np.random.default_rng(seed)
    bad = []
    for i in range(n):
        src = [int(v) for v in rng.integers(2, 400, 2)]
        dst = [int(v) for v in rng.integers(8, 400, 2)]
        if i % 4 == 1:
            dst[0] = src[0]  # width only
        elif i % 4 == 2:
            dst[1] = src[1]  # height only
        x = rng.integers(0, 256, (2, 3, *src), dtype=np.uint8)
        ref = tvF.resize(torch.from_numpy(x), dst, interpolation=tvF.InterpolationMode.BICUBIC, antialias=True).numpy()
        out = V.resize_bicubic_aa(x, *dst)
        if not np.array_equal(out, ref):
            bad.append(f"{src}->{dst}: {int(np.abs(out.astype(int) - ref).max())}")
    return bad


def test_resize_kernel_matches_torchvision():
    bad = _resize_sweep(seed=0, n=120)
    assert not bad, bad
    big = np.random.default_rng(1).integers(0, 256, (1, 3, 1080, 1920), dtype=np.uint8)  # large ratios: many taps
    import torch
    from torchvision.transforms.v2 import functional as tvF

    for dst in [(64, 96), (448, 800), (1088, 1920)]:
        ref = tvF.resize(torch.from_numpy(big), list(dst), interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        assert np.array_equal(V.resize_bicubic_aa(big, *dst), ref.numpy()), dst


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_resize_kernel_matches_torchvision_on_other_cpu_paths(capability):
    """torch picks its uint8 kernel by CPU (AVX2 code, or the generic loop); both give these bytes."""
    code = ("import sys, test_video_vs_hf as T, torch; "
            "print(torch.backends.cpu.get_cpu_capability()); print(T._resize_sweep(seed=2, n=40))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                       cwd=os.path.dirname(__file__))
    assert r.returncode == 0, r.stderr[-2000:]
    cap, bad = r.stdout.strip().splitlines()[-2:]
    assert cap == capability.upper() and bad == "[]", (cap, bad)
