"""Decode uploaded image files into the model's input: bytes -> uint8 RGB array (size, size, 3). No torch.

Policy (what users' photos go through, in order):
  1. formats: PNG, JPEG (and camera MPO), WebP, BMP, GIF, TIFF; only these decoders are ever tried, so exotic
     formats (EPS through Ghostscript, PSD, ...) are refused, not parsed. Multi-frame files: the first frame.
  2. size guard: the declared width x height must not exceed ``max_pixels`` (decompression bombs), checked
     from the header before any pixel is decoded; Pillow's own check (``Image.MAX_IMAGE_PIXELS``, an error
     above twice that) applies on top.
  3. JPEG: decoded at a reduced DCT scale when far larger than needed (``draft``): much faster on photos.
     ``plan`` does 2 and 3 and says how many pixels decoding will produce (the service's per-request budget).
  4. EXIF orientation is applied (``ImageOps.exif_transpose``); an unreadable EXIF block is ignored.
  5. colour: every mode becomes RGB. Transparency (RGBA, LA, P or L/RGB with a transparent colour) is
     composited on white; CMYK/YCbCr/L/1 convert as Pillow does; 16-bit integer images (I;16*, I) are
     scaled from [0, 65535], float images (F) from [0, 1].
  6. resize: the whole image to size x size (no crop: the aspect ratio is not kept), bicubic with
     antialiasing (``Image.Resampling.BICUBIC``, ``reducing_gap=3.0``); a size x size image is untouched.

A PNG whose pixel data ends early but cleanly, which Pillow would decode with black rows, is refused
(``png.check_complete``).

Every failure raises an :class:`~atop_serve.errors.ImageError` subclass: EmptyImage, NotAnImage,
CorruptImage (truncated or damaged) or ImageTooLarge.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from . import png
from .errors import CorruptImage, EmptyImage, ImageTooLarge, NotAnImage

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # JPEG also opens camera MPO files
FORMAT_NAMES = "PNG, JPEG, WebP, BMP, GIF or TIFF"
DEFAULT_MAX_PIXELS = 50_000_000  # 50 MP: above any common phone photo, far below memory trouble
RESAMPLE = Image.Resampling.BICUBIC
REDUCING_GAP = 3.0
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_MAGIC = (("PNG", b"\x89PNG\r\n\x1a\n"), ("JPEG", b"\xff\xd8\xff"), ("GIF", b"GIF87a"), ("GIF", b"GIF89a"),
          ("TIFF", b"II*\x00"), ("TIFF", b"MM\x00*"), ("TIFF", b"II+\x00"), ("TIFF", b"MM\x00+"), ("BMP", b"BM"))


def decode(data: bytes, size: int = 32, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An uploaded file's bytes -> uint8 RGB array (size, size, 3), following the module's policy."""
    with open_image(data) as img:
        return to_pixels(img, size, max_pixels)


def open_image(data: bytes) -> Image.Image:
    """An uploaded file's bytes -> a PIL image with only its header read (``img.size`` known, nothing decoded);
    ImageError subclasses say what is wrong. Pass it to ``to_pixels``."""
    if not data:
        raise EmptyImage("the uploaded file is empty")
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        fmt = sniff(data)
        if fmt:
            raise CorruptImage(f"the file starts like a {fmt} image but cannot be read: truncated or damaged") from None
        raise NotAnImage(f"the file is not an image in a format atop-serve reads ({FORMAT_NAMES})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning, if made an error
        raise ImageTooLarge(f"the image has too many pixels: {e}") from None
    except Exception as e:  # noqa: BLE001  (a damaged header can raise anything inside a decoder)
        raise CorruptImage(f"the image is truncated or damaged: {_reason(e)}") from None


def sniff(data: bytes) -> str | None:
    """The accepted format a file's first bytes announce (None if none): tells damaged from foreign files."""
    for fmt, magic in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def to_pixels(img: Image.Image, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An opened image (``open_image``) -> uint8 RGB (size, size, 3): the module's policy (limit, orientation,
    colour, resize)."""
    plan(img, size, max_pixels)
    source = img.fp  # load() lets go of it
    try:
        img.load()
    except Exception as e:  # noqa: BLE001
        raise CorruptImage(f"the image is truncated or damaged: {_reason(e)}") from None
    if isinstance(source, io.BytesIO):  # open_image's: the upload's bytes, read without a copy
        png.check_complete(img, source.getbuffer)
    try:
        if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001  (orientation is metadata: a broken EXIF block must not reject the photo)
        pass
    try:
        rgb = to_rgb(img)
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), RESAMPLE, reducing_gap=REDUCING_GAP)
        return np.asarray(rgb, dtype=np.uint8).copy()
    except Exception as e:  # noqa: BLE001
        raise CorruptImage(f"the image cannot be converted to RGB: {_reason(e)}") from None


def plan(img: Image.Image, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Check an opened image (``open_image``) against ``max_pixels`` and choose how it decodes (a JPEG far larger
    than needed at a reduced DCT scale) -> the pixels decoding it will produce: what a per-request budget counts.
    Nothing is decoded; ``to_pixels`` calls it too (a second call changes nothing)."""
    w, h = img.size
    if w * h > max_pixels:
        raise ImageTooLarge(f"the image is {w}x{h} ({w * h / 1e6:.1f} MP); the limit is {max_pixels / 1e6:g} MP")
    if img.format in ("JPEG", "MPO"):
        img.draft(None, (2 * size, 2 * size))  # DCT-domain downscale, still >= 2x the target; sets img.size
    w, h = img.size
    return w * h


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: transparency composited on white, 16-bit and float images rescaled."""
    mode = img.mode
    if mode in _SIXTEEN_BIT or mode == "F":  # in place: one float array, not four (a 50 MP image: 400 MB each)
        a = np.asarray(img, dtype=np.float64)
        a *= 255.0 if mode == "F" else 255.0 / 65535.0
        return Image.fromarray(np.clip(np.rint(a, out=a), 0, 255, out=a).astype(np.uint8)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 array (H, W, 3) -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _reason(e: Exception) -> str:
    return str(e) or type(e).__name__
