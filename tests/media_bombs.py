"""Hostile images for the tests of issues 14 and 21, made by concatenating bytes (milliseconds, no slow encoder).

Issue 14: small files whose headers promise huge images (`png_bomb`). `BOMB_MESSAGE` is what
runtime/media_limits.py answers for the tiny Qwen3-VL checkpoint's image processor (max_pixels 16777216,
export/demo_checkpoint.py): 4 x 16777216 = 67108864 pixels at most.

Issue 21: files whose headers are ordinary but whose parse is slow or heavy in PIL (times measured in-process
with Pillow 13 on the 2-core test machine while it was loaded, so noisy):
- `jpeg_app1_flood(3_000_000)`: 64x64 JPEG after 3 million empty APP1 segments, 12 MB (the issue: 13.5 s,
  +430 MiB in `Image.open`, which parses every segment in Python); `11_000_000`: 44 MB, 58.7 MB as base64;
- `jpeg_scan_flood(60_000)`: 2016x2016 progressive JPEG whose last scan header is repeated 60,000 times with a few
  bytes of entropy data each, 0.9 MB (the issue: 39.5 s of libjpeg CPU);
- `png_chunk_flood(1_000_000)`: 1024x1024 PNG after 1 million empty private chunks, 12 MB (6.5 s); at 1024x1024
  its bytes per pixel are ordinary, so only the chunk count gives it away;
- `gif_comment_flood(3_000_000)`: 64x64 GIF after 3 million empty comment extensions, 9 MB (1.8 s here; PIL reads
  each block in Python before the first frame);
- `bmp_rle_flood(4_000_000)`: 64x64 8-bit RLE BMP whose data starts with 4 million end-of-line escapes that
  move nothing, 8 MB (PIL's RLE decoder is Python, two bytes at a time: ~2.5 s here).
"""
from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

BOMB_MESSAGE = ("image {name} has more than 67108864 pixels (4 x the max_pixels of this model's image processor); "
                "downscale it")


def png_chunk(kind: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid RGB PNG of black pixels, compressed row by row (never whole in memory): ~1/1000 of 3*w*h bytes."""
    z, row = zlib.compressobj(9), bytes(1 + 3 * width)  # filter byte 0 + RGB
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND")


def _encoded(fmt: str, size: tuple[int, int], mode: str = "RGB", **options) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (90, 140, 200) if mode == "RGB" else 1).save(buf, fmt, **options)
    return buf.getvalue()


def jpeg_app1_flood(segments: int) -> bytes:
    """A 64x64 JPEG with `segments` empty APP1 segments (FF E1, length 2) right after its SOI marker."""
    jpeg = _encoded("JPEG", (64, 64))
    return jpeg[:2] + b"\xff\xe1\x00\x02" * segments + jpeg[2:]


def jpeg_scan_flood(scans: int, side: int = 2016) -> bytes:
    """A side x side progressive JPEG whose last scan (SOS header + 5 zero bytes of entropy data) is repeated
    `scans` more times before EOI."""
    jpeg = _encoded("JPEG", (side, side), progressive=True, quality=90)
    sos = jpeg.rfind(b"\xff\xda")
    (length,) = struct.unpack_from(">H", jpeg, sos + 2)
    scan = jpeg[sos:sos + 2 + length] + bytes(5)
    return jpeg[:-2] + scan * scans + jpeg[-2:]


def png_chunk_flood(chunks: int, side: int = 1024) -> bytes:
    """A side x side PNG with `chunks` empty private ancillary chunks (`prVt`) between IHDR and IDAT."""
    png = _encoded("PNG", (side, side))
    after_ihdr = 8 + 25  # signature + IHDR chunk (13 data bytes + 12)
    return png[:after_ihdr] + png_chunk(b"prVt") * chunks + png[after_ihdr:]


def gif_comment_flood(comments: int) -> bytes:
    """A 64x64 GIF with `comments` empty comment extensions (21 FE 00) before its first image."""
    gif = _encoded("GIF", (64, 64), mode="P")
    flags = gif[10]
    after_palette = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # header + screen descriptor + palette
    return gif[:after_palette] + b"\x21\xfe\x00" * comments + gif[after_palette:]


def bmp_rle_flood(escapes: int, side: int = 64) -> bytes:
    """A side x side 8-bit RLE BMP (BI_RLE8) whose pixel data starts with `escapes` end-of-line escapes (00 00)
    that end no line (at the start of a row they move nothing), then one run of 1 per pixel."""
    data = b"\x00\x00" * escapes + (b"\x01\x05" * side + b"\x00\x00") * side + b"\x00\x01"  # end of bitmap
    palette = bytes(4 * 256)
    offset = 14 + 40 + len(palette)
    file_header = b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset)
    info_header = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 8, 1, len(data), 2835, 2835, 256, 0)
    return file_header + info_header + palette + data
