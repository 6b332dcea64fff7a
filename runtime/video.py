"""Video inputs: frame sampling, resizing and patchify as HF's Qwen3-VL / Qwen2-VL video processors (5.24).

A video is a directory of frame images (sorted by file name; `frames_fps` says how fast they were taken,
default 24 = HF's fallback when a video has no fps metadata) or a video file decoded with PyAV when it is
installed.

Qwen3-VL (`Qwen3VLVideoProcessor` + `Qwen3VLProcessor`):
- sample `n = clamp(int(total / video_fps * fps), min_frames, min(max_frames, total))` frames at
  `linspace(0, total-1, n).round()`;
- one `smart_resize` for the whole clip (limits apply to `round(n/Tp)*Tp * h * w`; sides < factor upscaled);
- rescale+normalize fused as HF's torchvision backend does: `(x - mean*255) / (std*255)` in float32;
- pad to a multiple of Tp by repeating the last frame; patchify as images;
- timestamps per temporal patch: `(idx[2k]/fps + idx[2k+1]/fps) / 2` (indices padded like the frames).

Qwen2.5-VL (`Qwen2VLVideoProcessor`): per-frame `smart_resize` with the image limits,
`sample_frames` rule of Qwen2-VL, `second_per_grid_ts = Tp / sampled_fps`.

Frame resizing is HF's: its video processors resize the uint8 frames with torchvision's antialiased bicubic
(`tvF.resize(..., BICUBIC, antialias=True)` -> torch's uint8 `_upsample_bicubic2d_aa` kernel), not PIL's.
`resize.resize_bicubic_aa` ports that kernel to numpy: float64 Keys-cubic weights (a = -0.5) quantized to int16 with
torch's precision rule, a width pass then a height pass in integers, each rounded and clamped to uint8; it is
bitwise equal to torchvision (tests/test_video_vs_hf.py). PIL's bicubic is not: its 22-bit weights move ~0.5%
of values by 1-2 levels, and Pillow 13 runs the height pass first when a frame is widened and shortened, which
clamps differently (up to 26 levels on a third of the values on noise frames). Images use the same port (preprocess.py), as
HF's default (torchvision) image processor does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from qwen_vl_trt.model.errors import ImageError, VideoError

from . import media_guard
from .preprocess import ImageProcessorConfig, fused_normalize, patchify, read_json
from .preprocess import smart_resize as image_smart_resize
from .resize import resize_bicubic_aa

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_FRAMES_FPS = 24.0  # HF's fallback when a video carries no fps metadata


@dataclass(frozen=True)
class VideoProcessorConfig:
    """video_preprocessor_config.json (Qwen3-VL); Qwen2.5-VL releases ship none and use the image limits."""

    image: ImageProcessorConfig  # pixel limits here are for the whole clip (Qwen3-VL) or per frame (Qwen2.5-VL)
    fps: float
    min_frames: int
    max_frames: int

    @classmethod
    def from_dir(cls, directory: str | Path) -> "VideoProcessorConfig":
        d = Path(directory)
        path = d / "video_preprocessor_config.json"
        raw = read_json(path) if path.exists() else read_json(d / "preprocessor_config.json")
        return cls(image=ImageProcessorConfig.from_dict(raw), fps=float(raw.get("fps", 2)),
                   min_frames=int(raw.get("min_frames", 4)), max_frames=int(raw.get("max_frames", 768)))


@dataclass(frozen=True)
class VideoInputs:
    """pixel_values float32 [T, C*Tp*P*P]; grid_thw (t, h, w); per-temporal-patch data for the prompt."""

    pixel_values: np.ndarray
    grid_thw: tuple[int, int, int]
    frame_indices: np.ndarray  # int64 [n_sampled], indices into the source frames
    video_fps: float  # fps of the source frames
    timestamps: tuple[float, ...]  # Qwen3-VL: seconds per temporal patch (len == grid_t)
    second_per_grid_ts: float  # Qwen2.5-VL: seconds per temporal patch (Tp / sampled fps)


class FrameSource:
    """All frames of a video: `total` frames at `fps`; `read(indices)` -> list of RGB PIL images."""

    def __init__(self, path: str | Path, frames_fps: float | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise VideoError(f"video not found: {self.path}; check the path")
        if self.path.is_dir():
            self._files = sorted(f for f in self.path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not self._files:
                raise VideoError(f"frame directory {self.path} holds no images; put the frames there as PNG/JPEG files")
            self.total, self.fps, self._frames = len(self._files), float(frames_fps or DEFAULT_FRAMES_FPS), None
        else:
            self._frames, fps = _decode_with_pyav(self.path)
            self.total, self.fps = len(self._frames), float(frames_fps or fps)

    def read(self, indices: np.ndarray) -> list[Image.Image]:
        if self._frames is not None:
            return [self._frames[int(i)] for i in indices]
        try:
            return [media_guard.pool().decode(self._files[int(i)]) for i in indices]  # bounded, in a worker
        except ImageError as e:
            raise VideoError(f"bad frame in {self.path}: {e}") from None


def _decode_with_pyav(path: Path) -> tuple[list[Image.Image], float]:
    try:
        import av  # optional dependency
    except ImportError:
        raise VideoError(f"cannot decode {path.name}: PyAV is not installed; pip install av, "
                         "or pass a directory of frame images") from None
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = [f.to_image().convert("RGB") for f in container.decode(stream)]
            fps = float(stream.average_rate) if stream.average_rate else DEFAULT_FRAMES_FPS
    except (av.error.FFmpegError, IndexError, OSError) as e:
        raise VideoError(f"cannot decode video {path}: {e}; re-encode it as H.264 MP4 or pass a frame directory") from None
    if not frames:
        raise VideoError(f"video {path} has no frames; pass a video with at least one frame")
    return frames, fps


def qwen3_sample_indices(total: int, video_fps: float, fps: float, min_frames: int, max_frames: int) -> np.ndarray:
    """`Qwen3VLVideoProcessor.sample_frames` with metadata fps and target `fps` -> int64 indices."""
    num = int(total / video_fps * fps)
    num = min(max(num, min_frames), max_frames, total)
    return np.linspace(0, total - 1, num).round().astype(np.int64)


def qwen2_sample_indices(total: int, video_fps: float, fps: float, min_frames: int, max_frames: int,
                         temporal_patch_size: int) -> np.ndarray:
    """`Qwen2VLVideoProcessor.sample_frames` with metadata fps and target `fps` -> int64 indices."""
    tp = temporal_patch_size
    max_frames = math.floor(min(max_frames, total) / tp) * tp
    num = min(max(total / video_fps * fps, min_frames), max_frames, total)
    num = math.floor(num / tp) * tp
    if num <= 0 or num > total:
        raise VideoError(f"video has {total} frames, too few to sample {tp}; pass a longer video")
    # torch.arange(0, total, total / num) in float32, then .int(): the step is computed in double.
    return (np.arange(num, dtype=np.float64) * (total / num)).astype(np.float32).astype(np.int64)


def qwen3_video_smart_resize(num_frames: int, height: int, width: int, temporal_factor: int, factor: int,
                             min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen3-VL video `smart_resize`: limits apply to the whole clip `t' * h' * w'`."""
    if num_frames < temporal_factor:
        raise VideoError(f"video has {num_frames} sampled frames, fewer than {temporal_factor}; pass a longer video")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise VideoError(f"video frames {width}x{height} have aspect ratio > 200; crop them to at most 200:1")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def calculate_timestamps(indices: np.ndarray, video_fps: float, temporal_patch_size: int) -> tuple[float, ...]:
    """`Qwen3VLProcessor._calculate_timestamps`: mean time of the first/last frame of each temporal patch."""
    idx = [int(i) for i in indices]
    if len(idx) % temporal_patch_size:
        idx.extend(idx[-1] for _ in range(temporal_patch_size - len(idx) % temporal_patch_size))
    secs = [i / video_fps for i in idx]
    return tuple((secs[i] + secs[i + temporal_patch_size - 1]) / 2 for i in range(0, len(secs), temporal_patch_size))


def frames_to_array(frames: list[Image.Image], height: int, width: int) -> np.ndarray:
    """RGB PIL frames -> uint8 [F, 3, height, width], resized as HF's video processors do when not already that size."""
    sizes = {f.size for f in frames}
    if len(sizes) != 1:
        raise VideoError(f"video frames differ in size ({sorted(sizes)}); pass frames of one size")
    out = np.empty((len(frames), 3, height, width), np.uint8)
    for i, f in enumerate(frames):  # frame by frame: only the resized clip is held as an array
        chw = np.asarray(f.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)  # [3, H, W]
        out[i] = resize_bicubic_aa(chw[None], height, width)[0]
    return out  # [F, 3, height, width]


def preprocess_video_qwen3(path: str | Path, cfg: VideoProcessorConfig, frames_fps: float | None = None,
                           fps: float | None = None) -> VideoInputs:
    """Qwen3-VL video -> VideoInputs (pixel_values [T, patch_dim] float32, grid, timestamps per temporal patch)."""
    src = FrameSource(path, frames_fps)
    indices = qwen3_sample_indices(src.total, src.fps, cfg.fps if fps is None else fps, cfg.min_frames, cfg.max_frames)
    frames = src.read(indices)
    return qwen3_video_from_frames(frames, indices, src.fps, cfg)


def qwen3_video_from_frames(frames: list[Image.Image], indices: np.ndarray, video_fps: float,
                            cfg: VideoProcessorConfig) -> VideoInputs:
    """Already-sampled RGB frames (+ their source indices and fps) -> VideoInputs, Qwen3-VL rules."""
    ic = cfg.image
    width, height = frames[0].size
    h, w = qwen3_video_smart_resize(len(frames), height, width, ic.temporal_patch_size, ic.factor,
                                    ic.min_pixels, ic.max_pixels)
    pixels = fused_normalize(frames_to_array(frames, h, w), ic)
    pixel_values, grid = patchify(pixels, ic.patch_size, ic.merge_size, ic.temporal_patch_size)
    stamps = calculate_timestamps(indices, video_fps, ic.temporal_patch_size)
    return VideoInputs(pixel_values, grid, np.asarray(indices, np.int64), video_fps, stamps,
                       ic.temporal_patch_size / video_fps)


def preprocess_video_qwen2_5(path: str | Path, cfg: VideoProcessorConfig, frames_fps: float | None = None,
                             fps: float | None = None) -> VideoInputs:
    """Qwen2.5-VL video -> VideoInputs; `second_per_grid_ts = Tp / sampled_fps` drives the MRoPE time axis."""
    src = FrameSource(path, frames_fps)
    ic = cfg.image
    indices = qwen2_sample_indices(src.total, src.fps, cfg.fps if fps is None else fps, cfg.min_frames,
                                   cfg.max_frames, ic.temporal_patch_size)
    frames = src.read(indices)
    return qwen2_5_video_from_frames(frames, indices, src.fps, src.total, cfg)


def qwen2_5_video_from_frames(frames: list[Image.Image], indices: np.ndarray, video_fps: float, total: int,
                              cfg: VideoProcessorConfig) -> VideoInputs:
    """Already-sampled RGB frames -> VideoInputs, Qwen2.5-VL rules (per-frame smart_resize, image limits)."""
    ic = cfg.image
    width, height = frames[0].size
    try:
        h, w = image_smart_resize(height, width, ic.factor, ic.min_pixels, ic.max_pixels)
    except ImageError as e:
        raise VideoError(f"video frames: {e}") from None
    pixels = fused_normalize(frames_to_array(frames, h, w), ic)
    pixel_values, grid = patchify(pixels, ic.patch_size, ic.merge_size, ic.temporal_patch_size)
    sampled_fps = len(indices) / total * video_fps
    stamps = calculate_timestamps(indices, video_fps, ic.temporal_patch_size)
    return VideoInputs(pixel_values, grid, np.asarray(indices, np.int64), video_fps, stamps,
                       ic.temporal_patch_size / sampled_fps)
