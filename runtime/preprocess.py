"""Image preprocessing: a numpy + PIL port of HF's default Qwen2-VL image processor (transformers 5.24).

With torchvision installed, `AutoProcessor` / `AutoImageProcessor.from_pretrained` on the released Qwen3-VL and
Qwen2.5-VL configs pick `Qwen2VLImageProcessor` (the torchvision backend), not `Qwen2VLImageProcessorPil`; we
match that default. Steps, each the same operation on the same dtype, so `pixel_values` are bitwise equal:

1. `load_image(path)`: `ImageOps.exif_transpose` then `convert("RGB")` (HF decodes a path with torchvision /
   torchcodec `decode_image(mode=RGB, apply_exif_orientation=True)`: alpha and a palette/tRNS colour key
   dropped, not composited; for the PNG, JPEG and WebP files tested the decoded pixels are the same; HF cannot
   decode BMP paths this way, we can). A PIL image that still has alpha when it
   reaches `preprocess_image` is composited on white: the torchvision backend hands PIL inputs to the same
   `convert_to_rgb` as the PIL backend (HF behaves differently for the two routes; we follow each).
2. `smart_resize` (round-half-even Python `round`), then torchvision's antialiased bicubic resize of the uint8
   RGB image (`resize.resize_bicubic_aa`, a numpy port of torch's uint8 kernel). HF's PIL backend would use
   PIL's bicubic here: 1-2 levels apart on some values, more when one side grows and the other shrinks.
3. rescale + normalize fused as the torchvision backend does: `(x - mean/r) / (std/r)` in float32 (the PIL
   backend's `x * r` in float64 then `(x - mean) / std` differs in the last bits).
4. `patchify`: rows ordered `(t, h/m, w/m, m, m)` (merge-block major), each row `(C, Tp, P, P)`;
   an image is one frame repeated `Tp` times.
Images take a faster route to the same bits (`patchify_image`): uint8 pixels to patch order, then step 3 by a
per-channel table of the 256 levels.

No torch (rule G10).
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from qwen_vl_trt.model.errors import ArtifactError, ImageError
from .image_file import IMAGE_FORMATS, load_image  # noqa: F401 (re-exported: the in-process decode)
from .resize import resize_bicubic_aa

# `Qwen2VLImageProcessor` class defaults (used by HF when preprocessor_config.json lacks a key).
_HF_DEFAULTS = {
    "shortest_edge": 56 * 56,
    "longest_edge": 28 * 28 * 1280,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "rescale_factor": 1 / 255,
}
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The fields of preprocessor_config.json that decide `pixel_values` (pixels counts are per image)."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float = 1 / 255

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this (`patch_size * merge_size`: 32 Qwen3-VL, 28 Qwen2.5-VL)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_dict(cls, raw: dict) -> "ImageProcessorConfig":
        """HF precedence: `size` {shortest_edge, longest_edge}, overridden by `min_pixels`/`max_pixels`."""
        size = dict(raw.get("size") or {})
        min_pixels = raw.get("min_pixels", size.get("shortest_edge", size.get("min_pixels", _HF_DEFAULTS["shortest_edge"])))
        max_pixels = raw.get("max_pixels", size.get("longest_edge", size.get("max_pixels", _HF_DEFAULTS["longest_edge"])))
        pick = lambda key: raw.get(key, _HF_DEFAULTS[key])  # noqa: E731
        return cls(
            min_pixels=int(min_pixels), max_pixels=int(max_pixels),
            patch_size=int(pick("patch_size")), temporal_patch_size=int(pick("temporal_patch_size")),
            merge_size=int(pick("merge_size")),
            image_mean=tuple(float(v) for v in pick("image_mean")),
            image_std=tuple(float(v) for v in pick("image_std")),
            rescale_factor=float(pick("rescale_factor")),
        )

    @classmethod
    def from_dir(cls, directory: str | Path, filename: str = "preprocessor_config.json") -> "ImageProcessorConfig":
        return cls.from_dict(read_json(Path(directory) / filename))


def read_json(path: Path) -> dict:
    """Read a JSON config; ArtifactError (one line) when it is missing or does not parse."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing; copy it from the original checkpoint") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); restore it from the original checkpoint") from None


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """HF's `smart_resize` (images / Qwen2.5-VL frames): sides multiples of `factor`, area in [min, max].

    `round` is Python's half-to-even (80/32 = 2.5 -> 2), exactly as HF. Aspect ratio > 200 -> ImageError.
    """
    if min(height, width) <= 0:
        raise ImageError(f"image has an empty side ({width}x{height}); pass a non-empty image")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(f"image {width}x{height} has aspect ratio {ratio:.1f} > {MAX_ASPECT_RATIO}; "
                         f"crop or pad it to at most {MAX_ASPECT_RATIO}:1")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(img: Image.Image) -> Image.Image:
    """HF `convert_to_rgb` (both backends, PIL input): transparency is composited onto white, everything else `convert("RGB")`."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_rgb(img: Image.Image, height: int, width: int) -> np.ndarray:
    """uint8 RGB image -> uint8 [3, height, width], resized as HF's torchvision backend (`resize_bicubic_aa`)."""
    chw = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)  # [3, H, W]
    return resize_bicubic_aa(chw[None], height, width)[0]


def fused_normalize(x: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """HF torchvision backend `rescale_and_normalize` (fused): (x - mean/r) / (std/r) in float32; channels on
    axis -3 ([C, H, W] or [F, C, H, W])."""
    inv = np.float32(1.0 / cfg.rescale_factor)
    mean = (np.asarray(cfg.image_mean, np.float32) * inv)[:, None, None]
    std = (np.asarray(cfg.image_std, np.float32) * inv)[:, None, None]
    return (x.astype(np.float32) - mean) / std


def patchify(frames: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """[F, C, H, W] float32 -> ([T, C*Tp*P*P] float32, (grid_t, grid_h, grid_w)).

    Frames are padded to a multiple of `temporal_patch_size` by repeating the last one (HF video and image
    processors; an image is F=1). Rows are ordered (t, h/m, w/m, m, m); each row is (C, Tp, P, P).
    """
    pad = -frames.shape[0] % temporal_patch_size
    if pad:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
    n_frames, channels, height, width = frames.shape
    gt, gh, gw = n_frames // temporal_patch_size, height // patch_size, width // patch_size
    m, p, tp = merge_size, patch_size, temporal_patch_size
    x = frames.reshape(gt, tp, channels, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, gh/m, gw/m, m, m, C, Tp, P, P]
    return np.ascontiguousarray(x).reshape(gt * gh * gw, channels * tp * p * p), (gt, gh, gw)  # [T, C*Tp*P*P]


@functools.lru_cache(maxsize=8)
def normalize_table(cfg: ImageProcessorConfig) -> np.ndarray:
    """float32 [3, 256]: `fused_normalize` of each uint8 level, per channel. The step maps each value on its
    own, so looking the levels up in this table gives exactly (bit for bit) what computing it does."""
    levels = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256))  # [C, 1, 256]
    return np.ascontiguousarray(fused_normalize(levels, cfg).reshape(3, 256))


def patchify_image(chw: np.ndarray, cfg: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 [3, H, W] -> (`patchify(fused_normalize(chw)[None])`, bit for bit, and its grid), moving a quarter
    of the bytes: the uint8 pixels go to patch order first, are normalized by table lookup, and the one frame is
    written Tp times (HF repeats an image to the temporal patch size)."""
    channels, height, width = chw.shape
    m, p, tp = cfg.merge_size, cfg.patch_size, cfg.temporal_patch_size
    gh, gw = height // p, width // p
    blocks = chw.reshape(channels, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    u8 = np.ascontiguousarray(blocks).reshape(gh * gw, channels, p * p)  # [T, C, P*P], merge-block order
    table = normalize_table(cfg)
    frame = np.empty(u8.shape, np.float32)
    for c in range(channels):
        frame[:, c] = np.take(table[c], u8[:, c])
    out = np.empty((gh * gw, channels, tp, p * p), np.float32)  # [T, C, Tp, P*P]
    out[...] = frame[:, :, None]
    return out.reshape(gh * gw, channels * tp * p * p), (1, gh, gw)  # [T, C*Tp*P*P]


def preprocess_image(img: Image.Image, cfg: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One PIL image -> (pixel_values float32 [T, C*Tp*P*P], grid_thw (1, h, w)); T = h*w patches."""
    rgb = to_rgb(img)
    height, width = smart_resize(rgb.height, rgb.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return patchify_image(resize_rgb(rgb, height, width), cfg)  # uint8 [3, H, W] in


def preprocess_images(images: list[Image.Image], cfg: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Several images -> (pixel_values float32 [sum T_i, patch_dim], image_grid_thw int64 [n, 3]), HF order."""
    if not images:
        return np.zeros((0, cfg.patch_dim), np.float32), np.zeros((0, 3), np.int64)
    outs = [preprocess_image(img, cfg) for img in images]
    return np.concatenate([o[0] for o in outs], axis=0), np.asarray([o[1] for o in outs], dtype=np.int64)
