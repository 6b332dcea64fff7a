"""Encoded image (a file path or bytes) -> its header size, or the decoded RGB PIL image. PIL only (no numpy), so
that the decode worker (runtime/decode_worker.py) starts small; everything else calls these through the guard of
runtime/media_guard.py, which runs them in that worker with a time and memory bound.

`load_image` is the decode step of runtime/preprocess.py (its docstring says how it matches HF).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

from PIL import Image, ImageOps, UnidentifiedImageError

from qwen_vl_trt.model.errors import ImageError

# The decoders PIL may use: the formats of video.IMAGE_SUFFIXES. Others (EPS runs Ghostscript, ...) are refused
# unopened (`Image.open(formats=...)`).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def is_bytes(source) -> bool:
    return isinstance(source, (bytes, bytearray, memoryview))


def header_size(source, name: str) -> tuple[int, int]:
    """(width, height) of an image file path or encoded bytes, from its header only (PIL's `Image.open` parses
    the header and decodes on `load()`). (0, 0) for a missing / directory / empty path: `load_image` says which.
    PIL's `Image.DecompressionBombError` (over twice `Image.MAX_IMAGE_PIXELS`) goes to the caller; any other
    unreadable header is an ImageError."""
    if is_bytes(source):
        source = io.BytesIO(bytes(source))
    elif not Path(source).is_file() or Path(source).stat().st_size == 0:
        return 0, 0
    try:
        with Image.open(source, formats=IMAGE_FORMATS) as img:
            return img.size
    except UnidentifiedImageError:
        raise ImageError(f"cannot read image {name}: not a supported image format; convert it to PNG or JPEG") from None
    except (OSError, ValueError, SyntaxError):
        raise ImageError(f"cannot read image {name}: file is corrupt or truncated; re-export it as PNG or "
                         "JPEG") from None


def load_image(path: str | Path | bytes, name: str | None = None,
               on_header: Callable[[tuple[int, int]], None] | None = None) -> Image.Image:
    """Open an image file (or encoded image bytes, e.g. from a server request) as an RGB PIL image, EXIF
    orientation applied, like HF's `load_image(path)`. `name` is what error messages call bytes input;
    `on_header(size)` is called once the header is read, before the pixels are decoded.

    Raises ImageError for a missing, empty, corrupt or unsupported file.
    """
    if is_bytes(path):
        p, source = name or "<image bytes>", io.BytesIO(bytes(path))
        if not len(path):
            raise ImageError(f"image {p} is empty; pass a valid PNG, JPEG or WebP image")
    else:
        p = source = Path(path)
        if not p.exists():
            raise ImageError(f"image not found: {p}; check the path")
        if p.is_dir():
            raise ImageError(f"image path is a directory: {p}; pass an image file (PNG, JPEG, WebP, ...)")
        if p.stat().st_size == 0:
            raise ImageError(f"image file is empty: {p}; pass a valid PNG, JPEG or WebP image")
    try:
        with Image.open(source, formats=IMAGE_FORMATS) as img:
            if on_header is not None:
                on_header(img.size)
            img.load()  # decode now: a truncated/corrupt file fails here, not later
            img = ImageOps.exif_transpose(img)
            rgb = img.convert("RGB")
            # PIL keeps a tRNS colour key as info["transparency"], which `to_rgb` would composite on white;
            # HF decodes a path to plain RGB (`decode_image(mode=RGB)`), so the key goes.
            rgb.info.pop("transparency", None)
            return rgb
    except Image.DecompressionBombError:
        raise ImageError(f"image {p} is too large to decode safely (over {Image.MAX_IMAGE_PIXELS} pixels); "
                         "downscale it first") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot read image {p}: not a supported image format; convert it to PNG or JPEG") from None
    except (OSError, ValueError, SyntaxError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"cannot read image {p}: file is corrupt or truncated ({msg}); re-export it as PNG or JPEG") from None
