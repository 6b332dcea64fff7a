"""Structure checks of JPEG and PNG bytes that refuse parser floods before any decoder sees them (issue 21).

PIL parses a JPEG's marker segments and a PNG's chunks in Python, one at a time: 3 million empty APP1 segments
(12 MB) took 13.5 s in `Image.open`, 1 million empty private PNG chunks (12 MB) 6.5 s, and libjpeg decodes a
2016x2016 progressive JPEG padded with 60,000 repeated scans (0.9 MB) in 40 s. runtime/media_guard.py bounds
every decode in time and memory whatever the bytes; these checks answer the known floods at once, with a message
that says what is wrong, and cost microseconds to milliseconds (a bounded walk, and a C-speed search).
Each rule is exact (it counts what the format defines) and far above what encoders write:

- JPEG (ITU T.81 B.1): at most `MAX_JPEG_SEGMENTS` marker segments before the first scan (libjpeg, Pillow and
  cameras write under 30: APP0/APP1 EXIF/XMP/APP2 ICC in at most 255 chunks/DQT/DHT/SOF); at most
  `MAX_JPEG_SCANS` start-of-scan markers in the file (libjpeg's progressive default has 10, one per
  spectral band and bit; `FF DA` cannot occur in entropy-coded data, where a 0xFF byte is followed by 0x00 or
  a restart marker, so counting the two bytes counts scans, plus those of an EXIF thumbnail);
- PNG (ISO 15948 5.3): at most `MAX_PNG_CHUNKS_BASE` + one per `MIN_PNG_BYTES_PER_CHUNK` bytes of file (libpng
  writes 8 KiB IDAT chunks, Pillow 64 KiB);
- both: the file is at most `MAX_BYTES_PER_PIXEL` bytes a pixel of its header size + `METADATA_BYTES`
  (16-bit RGBA is 8 bytes a pixel uncompressed; ICC/EXIF/XMP metadata fits in 4 MiB).

Other formats (GIF, WebP, BMP, TIFF) rely on the decode guard's bounds alone.
"""
from __future__ import annotations

import itertools
import re
import struct

from qwen_vl_trt.model.errors import ImageError

MAX_JPEG_SEGMENTS = 1000
MAX_JPEG_SCANS = 256
MAX_PNG_CHUNKS_BASE = 256
MIN_PNG_BYTES_PER_CHUNK = 4096
MAX_BYTES_PER_PIXEL = 8
METADATA_BYTES = 4 << 20

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_SOS = re.compile(rb"\xff\xda")
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD9)}  # TEM, RST0-7, SOI: no length field


def precheck(data, name: str) -> None:
    """ImageError if `data` (bytes or an mmap of the file) is a JPEG or PNG over the limits of the module
    docstring; any other bytes pass (the decoder judges them)."""
    if data[:2] == b"\xff\xd8":
        _check_jpeg(data, name)
    elif data[:8] == PNG_SIGNATURE:
        _check_png(data, name)


def _check_jpeg(data, name: str) -> None:
    pos, segments, size = 2, 0, None
    while pos + 4 <= len(data) and segments <= MAX_JPEG_SEGMENTS:
        if data[pos] != 0xFF:
            return  # not a marker where one must be: the decoder reports the corrupt file
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        segments += 1
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _JPEG_SOF and pos + 9 <= len(data):
            height, width = struct.unpack_from(">HH", data, pos + 5)
            size = (width, height)
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            break
        pos += 2 + length
    if segments > MAX_JPEG_SEGMENTS:
        raise ImageError(f"image {name} is a JPEG with more than {MAX_JPEG_SEGMENTS} marker segments before its "
                         "image data (encoders write under 30); re-encode it")
    if _count(data, _JPEG_SOS, MAX_JPEG_SCANS + 1) > MAX_JPEG_SCANS:
        raise ImageError(f"image {name} is a JPEG with more than {MAX_JPEG_SCANS} scans (encoders write about 10); "
                         "re-encode it")
    if size is not None:
        _check_bytes_per_pixel(len(data), size, name)


def _count(data, pattern: re.Pattern, most: int) -> int:
    """Matches of `pattern` in `data` (bytes or an mmap, which has no `count`), counted up to `most` (the
    search runs in C; the 2-byte `bytes.find` is twice as slow on 0xFF-dense floods)."""
    return sum(1 for _ in itertools.islice(pattern.finditer(data), most))


def _check_png(data, name: str) -> None:
    most = MAX_PNG_CHUNKS_BASE + len(data) // MIN_PNG_BYTES_PER_CHUNK
    pos, chunks = len(PNG_SIGNATURE), 0
    while pos + 8 <= len(data):
        chunks += 1
        if chunks > most:
            raise ImageError(f"image {name} is a PNG with more than {most} chunks (at most {MAX_PNG_CHUNKS_BASE} "
                             f"+ one per {MIN_PNG_BYTES_PER_CHUNK} bytes of file); re-encode it")
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IHDR" and pos + 16 <= len(data):
            width, height = struct.unpack_from(">II", data, pos + 8)
            _check_bytes_per_pixel(len(data), (width, height), name)
        if kind == b"IEND":
            return
        pos += 12 + length  # length, type, data, CRC


def _check_bytes_per_pixel(nbytes: int, size: tuple[int, int], name: str) -> None:
    width, height = size
    most = MAX_BYTES_PER_PIXEL * width * height + METADATA_BYTES
    if nbytes > most:
        raise ImageError(f"image {name} has {nbytes} bytes for {width}x{height} pixels (at most "
                         f"{MAX_BYTES_PER_PIXEL} bytes a pixel + {METADATA_BYTES >> 20} MiB of metadata); re-encode it")
