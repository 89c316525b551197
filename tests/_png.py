"""PNG files written by hand, for what Pillow will not write: a bomb's header, Adam7 interlacing, pixel data that
ends early."""
from __future__ import annotations

import struct
import zlib

import numpy as np

from atop_serve.png import ADAM7, SIGNATURE


def png_file(width: int, height: int, raw: bytes, colour_type: int = 2, interlaced: bool = False) -> bytes:
    """8-bit PNG bytes: IHDR, one IDAT holding ``raw`` (filtered rows) zlib-compressed, IEND; valid CRCs."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, int(interlaced))
    return SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels (a decompression bomb's header) with no real data."""
    return png_file(width, height, b"")


def passes(pixels: np.ndarray, interlaced: bool) -> list[np.ndarray]:
    """The sub-images a PNG stores, in order: Adam7's seven passes, or the image."""
    return [pixels[y0::dy, x0::dx] for x0, y0, dx, dy in ADAM7] if interlaced else [pixels]


def png_rgb(pixels: np.ndarray, interlaced: bool = False, keep_bytes: int | None = None) -> bytes:
    """An RGB PNG of ``pixels`` (H, W, 3) uint8, filter 0 on every row; its zlib stream complete and clean but
    holding only the first ``keep_bytes`` of the pixel data when given."""
    raw = b"".join(b"\x00" + row.tobytes() for p in passes(pixels, interlaced) if p.size for row in p)
    h, w = pixels.shape[:2]
    return png_file(w, h, raw[:keep_bytes], interlaced=interlaced)
