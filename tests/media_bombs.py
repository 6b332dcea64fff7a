"""Image bombs for the tests of issue 14: small files whose headers promise huge images.

`BOMB_MESSAGE` is what runtime/media_limits.py answers for the tiny Qwen3-VL checkpoint's image processor
(max_pixels 16777216, export/demo_checkpoint.py): 4 x 16777216 = 67108864 pixels at most.
"""
from __future__ import annotations

import struct
import zlib

BOMB_MESSAGE = ("image {name} has more than 67108864 pixels (4 x the max_pixels of this model's image processor); "
                "downscale it")


def png_bomb(width: int, height: int) -> bytes:
    """A valid RGB PNG of black pixels, compressed row by row (never whole in memory): ~1/1000 of 3*w*h bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row = zlib.compressobj(9), bytes(1 + 3 * width)  # filter byte 0 + RGB
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
