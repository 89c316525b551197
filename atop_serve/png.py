"""A PNG whose pixel data ends early: found, since Pillow does not. No torch.

A PNG's pixels are one zlib stream (the IDAT chunks) of filtered rows. When that stream is cut short but ends
cleanly (a crafted file, or a broken encoder), Pillow decodes what is there, leaves the remaining rows black
and raises nothing: the model would classify a partly black image as if it were the upload. Telling that
apart needs the stream's decompressed length, which costs a second inflate, so ``check_complete`` looks only
where the symptom is (``might_be_cut``): rows are written in order, so a stream that ended early always leaves
the last row it writes all zero.
"""
from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

from .errors import CorruptImage

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHUNK = 1 << 20
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
# Adam7: (x0, y0, dx, dy) of each of the seven passes
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def raw_size(width: int, height: int, bit_depth: int, colour_type: int, interlaced: bool) -> int:
    """Bytes the IDAT stream of a complete image decompresses to: each row of each pass, plus its filter byte."""
    bits = bit_depth * CHANNELS[colour_type]

    def rows(w: int, h: int) -> int:
        return h * (1 + (w * bits + 7) // 8) if w and h else 0

    if not interlaced:
        return rows(width, height)
    return sum(rows((width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy) for x0, y0, dx, dy in ADAM7)  # 0 if empty


def might_be_cut(img: Image.Image) -> bool:
    """Whether a decoded PNG shows the symptom of a cut (cheap: one row). Pixel data that ends early leaves the
    last row the stream writes unwritten, so all zero: the image's last row, or with Adam7 interlacing its last
    odd row (the seventh pass writes every odd row, last); a one-row interlaced image: any zero pixel."""
    w, h = img.size
    interlaced = img.info.get("interlace") == 1
    y = h - 1 if not interlaced or h == 1 or h % 2 == 0 else h - 2
    row = np.asarray(img.crop((0, y, w, y + 1)))
    zero = (row == 0) if row.ndim == 2 else (row == 0).all(axis=-1)
    return bool(zero.any() if interlaced and h == 1 else zero.all())


def check_complete(img: Image.Image, read: Callable[[], bytes | memoryview]) -> None:
    """Raise CorruptImage if ``img``, a decoded image, is a PNG with less pixel data than its header declares.
    ``read()`` gives the file's bytes (or a buffer of them); it is called, and the stream inflated again, only
    when ``might_be_cut(img)``. Other formats and animated PNGs (their frames are other chunks) pass unchecked."""
    if img.format != "PNG" or getattr(img, "is_animated", False) or not might_be_cut(img):
        return
    data = read()
    header, idat = None, []
    view, pos = memoryview(data), len(SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IHDR" and header is None:  # the first, as Pillow reads it
            header = data[pos + 8:pos + 8 + length]
        elif kind == b"IDAT":
            idat.append(view[pos + 8:pos + 8 + length])
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or len(header) < 13 or not idat:
        return  # Pillow read it, so its header was sound; nothing more to compare here
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header[:13])
    if colour not in CHANNELS:
        return
    expected = raw_size(width, height, depth, colour, interlace == 1)
    try:
        got = inflated_size(idat, expected)
    except zlib.error:
        return  # a damaged stream is Pillow's to report, and it did not: leave its reading as it is
    if got < expected:
        raise CorruptImage(f"the PNG's pixel data ends early: {got:,} of the {expected:,} bytes its "
                           f"{width}x{height} header declares (the missing rows would read as zeros: black)")


def inflated_size(pieces, limit: int) -> int:
    """Bytes the zlib stream made of ``pieces`` (bytes-likes, in order) decompresses to, counted up to ``limit``:
    a megabyte of output at a time, from input slices of at most a megabyte, so that neither the output nor
    copies of the input are ever held whole."""
    inflater, got = zlib.decompressobj(), 0
    for piece in pieces:
        for at in range(0, len(piece), CHUNK):
            pending = piece[at:at + CHUNK]
            while pending and got < limit and not inflater.eof:
                got += len(inflater.decompress(pending, min(CHUNK, limit - got)))
                pending = inflater.unconsumed_tail
            if got >= limit or inflater.eof:
                return got
    while got < limit and not inflater.eof:  # output still held after the last input
        out = inflater.decompress(b"", min(CHUNK, limit - got))
        if not out:
            break
        got += len(out)
    return got
