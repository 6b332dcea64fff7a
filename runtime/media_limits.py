"""Image sizes checked from the file header, before any pixel is decoded (server, `trt-run` and Triton alike).

PIL's `Image.open` reads only the header (width, height, mode) and decodes on `load()`
(https://pillow.readthedocs.io/en/stable/reference/Image.html#PIL.Image.open), so a 99 KB PNG of 9000x9000
pixels costs a millisecond here instead of a 243 MB buffer and seconds of resizing. The header is read in a
decode worker (runtime/media_guard.py), as the pixels are later: a header can be slow to parse too.
`check_images` runs on every image of a request, before any of them is decoded:

- a source image may hold at most `source_pixel_limit(cfg)` pixels: `SOURCE_PIXELS_PER_MAX_PIXELS` times the
  image processor's `max_pixels` (what `smart_resize` shrinks it to), never less than `MIN_SOURCE_PIXEL_LIMIT`
  (a small `max_pixels` must not refuse ordinary photos);
- its resized patch count (`smart_resize` of the header size; EXIF rotation swaps the sides, not the area)
  must fit the artifacts' `max_patches`, and its frames `max_frames` (an image is one temporal patch);
- the vision tokens of all images (patches / merge²) plus two marker tokens each must fit `max_seq`.

`set_decompression_bomb_limit` makes PIL's own check (`Image.MAX_IMAGE_PIXELS`: a DecompressionBombWarning
above it, an error above twice it, both at `Image.open`) use the same number: the error also guards media
decoded without going through here (video frames).
"""
from __future__ import annotations

import warnings

from PIL import Image

from qwen_vl_trt.model.errors import ImageError, PromptTooLong

from . import media_guard
from .preprocess import ImageProcessorConfig, smart_resize

SOURCE_PIXELS_PER_MAX_PIXELS = 4  # at most a 2x downscale per side is thrown away
MIN_SOURCE_PIXEL_LIMIT = 4096 * 4096  # = Qwen3-VL's released max_pixels (preprocessor_config.json)
MARKERS_PER_IMAGE = 2  # <|vision_start|> ... <|vision_end|> around each image's pad tokens


def source_pixel_limit(cfg: ImageProcessorConfig) -> int:
    """Most pixels (width * height) an image may have before it is decoded."""
    return max(SOURCE_PIXELS_PER_MAX_PIXELS * cfg.max_pixels, MIN_SOURCE_PIXEL_LIMIT)


def set_decompression_bomb_limit(cfg: ImageProcessorConfig) -> None:
    """PIL's process-wide limit from the same number (it refuses above twice it). Its warning above the limit is
    silenced: such an image is refused here with a message, and `trt-run` prints one `error:` line only."""
    Image.MAX_IMAGE_PIXELS = source_pixel_limit(cfg)
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def header_size(source, name: str, limit: int) -> tuple[int, int]:
    """(width, height) of an image file path or encoded bytes, from its header only, read in a decode worker
    (runtime/media_guard.py: bounded in time and memory). ImageError if the header is not one of the accepted
    formats; (0, 0) for a missing / directory / empty path (`load_image`'s messages say which)."""
    try:
        return media_guard.pool().probe(source, name)
    except media_guard.OverPixelLimit:  # PIL's check at open: over twice `set_decompression_bomb_limit`'s number
        raise too_many_pixels(name, limit) from None


def image_patches(size: tuple[int, int], name: str, cfg: ImageProcessorConfig, limits) -> int:
    """Vision patches an image of header `size` (width, height) will need; ImageError / PromptTooLong if it
    is over the source pixel limit or the artifacts' max_patches."""
    width, height = size
    if width * height > source_pixel_limit(cfg):
        raise too_many_pixels(name, source_pixel_limit(cfg))
    h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    patches = (h // cfg.patch_size) * (w // cfg.patch_size)
    if patches > limits.max_patches:
        raise too_many_patches(name, patches, limits.max_patches)
    return patches


def too_many_pixels(name: str, limit: int) -> ImageError:
    return ImageError(f"image {name} has more than {limit} pixels ({SOURCE_PIXELS_PER_MAX_PIXELS} x the max_pixels of "
                      "this model's image processor); downscale it")


def too_many_patches(name: str, patches: int, max_patches: int) -> PromptTooLong:
    return PromptTooLong(f"{name} needs {patches} vision patches, artifacts allow at most {max_patches} per vision "
                         "call: re-export with a larger --max-patches or pass a smaller image")


def check_images(images, names, cfg: ImageProcessorConfig, limits) -> int:
    """Every image's header against the limits (module docstring) -> the images' vision + marker tokens."""
    tokens = 0
    merge = cfg.merge_size * cfg.merge_size
    for source, name in zip(images, names):
        size = header_size(source, name, source_pixel_limit(cfg))
        if size == (0, 0):
            continue
        tokens += image_patches(size, name, cfg, limits) // merge + MARKERS_PER_IMAGE
        if tokens > limits.max_seq:
            raise PromptTooLong(f"the images need at least {tokens} prompt tokens, artifacts allow at most "
                                f"{limits.max_seq}: send fewer or smaller images or re-export with a larger --max-seq")
    return tokens
