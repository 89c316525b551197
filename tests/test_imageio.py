"""Decoding uploads (atop_serve.imageio): every accepted format and mode, EXIF rotation, resize policy and each
rejection (empty, foreign, truncated, too many pixels). Pure functions: no server, no torch."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from atop_serve import imageio
from atop_serve.errors import CorruptImage, EmptyImage, ImageError, ImageTooLarge, NotAnImage

from ._png import png_header_only, png_rgb

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pattern() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def smooth(size=32) -> np.ndarray:
    """A smooth colour ramp: survives lossy codecs almost unchanged."""
    y, x = np.mgrid[0:size, 0:size] * (255 // (size - 1))
    return np.stack([x, y, 255 - x], -1).astype(np.uint8)


# ------------------------------------------------------------------------------------------ formats
@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {}),
                                    ("TIFF", {"compression": "tiff_deflate"})])
def test_lossless_formats_round_trip(pattern, fmt, kw):
    out = imageio.decode(encode(Image.fromarray(pattern), fmt, **kw))
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    assert np.array_equal(out, pattern)


@pytest.mark.parametrize("fmt,kw,tol", [("JPEG", {"quality": 95}, 6), ("WEBP", {"quality": 90}, 8), ("GIF", {}, 12),
                                        ("TIFF", {"compression": "jpeg"}, 8)])
def test_lossy_formats_close(fmt, kw, tol):
    ref = smooth()
    out = imageio.decode(encode(Image.fromarray(ref), fmt, **kw))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - ref).mean() < tol


def test_gif_first_frame():
    frames = [Image.new("RGB", (32, 32), RED), Image.new("RGB", (32, 32), BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert tuple(imageio.decode(data)[16, 16]) == RED


def test_multipage_tiff_first_page():
    pages = [Image.new("RGB", (32, 32), BLUE), Image.new("RGB", (32, 32), RED)]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert tuple(imageio.decode(data)[0, 0]) == BLUE


def test_camera_mpo_is_read_as_jpeg():
    frames = [Image.new("RGB", (32, 32), RED), Image.new("RGB", (32, 32), BLUE)]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert np.abs(imageio.decode(data)[16, 16].astype(int) - RED).max() <= 2


# ------------------------------------------------------------------------------------------ modes
def test_grey_modes():
    for mode in ("L", "1"):
        img = Image.new(mode, (32, 32), 255 if mode == "L" else 1)
        assert tuple(imageio.decode(encode(img, "PNG"))[0, 0]) == WHITE
    grey = Image.new("L", (32, 32), 77)
    assert tuple(imageio.decode(encode(grey, "PNG"))[5, 5]) == (77, 77, 77)


def test_rgba_composited_on_white():
    a = np.zeros((32, 32, 4), np.uint8)
    a[:, :16] = (255, 0, 0, 255)     # opaque red
    a[:, 16:24] = (0, 0, 0, 0)       # transparent black -> white
    a[:, 24:] = (0, 0, 0, 128)       # half-transparent black -> mid grey
    out = imageio.decode(encode(Image.fromarray(a, "RGBA"), "PNG"))
    assert tuple(out[0, 0]) == RED
    assert tuple(out[0, 20]) == WHITE
    assert np.abs(out[0, 28].astype(int) - 127).max() <= 1


def test_la_and_webp_alpha():
    la = Image.merge("LA", (Image.new("L", (32, 32), 0), Image.new("L", (32, 32), 0)))
    assert tuple(imageio.decode(encode(la, "PNG"))[3, 3]) == WHITE
    rgba = Image.new("RGBA", (32, 32), (0, 0, 255, 0))
    assert tuple(imageio.decode(encode(rgba, "WEBP", lossless=True))[3, 3]) == WHITE


def test_palette_with_transparency():
    p = Image.new("P", (32, 32), 0)
    p.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    p.paste(1, (16, 0, 32, 32))
    data = encode(p, "PNG", transparency=1)  # palette index 1 (blue) is transparent
    out = imageio.decode(data)
    assert tuple(out[0, 0]) == RED and tuple(out[0, 20]) == WHITE
    gif = encode(p, "GIF", transparency=1)
    assert tuple(imageio.decode(gif)[0, 20]) == WHITE


def test_cmyk():
    img = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # red in CMYK
    for fmt in ("JPEG", "TIFF"):
        out = imageio.decode(encode(img, fmt))
        assert np.abs(out[16, 16].astype(int) - RED).max() <= 3, fmt


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_grey(fmt):
    a = np.full((32, 32), 65535, np.uint16)
    a[:, :16] = 32768
    out = imageio.decode(encode(Image.fromarray(a), fmt))
    assert tuple(out[0, 20]) == WHITE
    assert np.abs(out[0, 0].astype(int) - 128).max() <= 1


def test_float_and_int32_images():
    f = Image.fromarray(np.full((32, 32), 0.5, np.float32))
    assert np.abs(imageio.decode(encode(f, "TIFF"))[0, 0].astype(int) - 128).max() <= 1
    i = Image.fromarray(np.full((32, 32), 65535, np.int32))
    assert tuple(imageio.decode(encode(i, "TIFF"))[0, 0]) == WHITE


# ------------------------------------------------------------------------------------------ geometry
def _red_left_blue_right(w=40, h=20) -> Image.Image:
    img = Image.new("RGB", (w, h), BLUE)
    img.paste(RED, (0, 0, w // 2, h))
    return img


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_orientation_applied(fmt):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left half ends up on top
    out = imageio.decode(encode(_red_left_blue_right(), fmt, exif=exif.tobytes()))
    assert np.abs(out[2, 2].astype(int) - RED).max() < 40
    assert np.abs(out[29, 2].astype(int) - BLUE).max() < 40
    plain = imageio.decode(encode(_red_left_blue_right(), fmt))
    assert np.abs(plain[2, 29].astype(int) - BLUE).max() < 40  # without EXIF: left red, right blue


def test_resize_whole_image_no_crop():
    out = imageio.decode(encode(_red_left_blue_right(100, 50), "PNG"))
    assert out.shape == (32, 32, 3)
    assert tuple(out[16, 2]) == RED and tuple(out[16, 29]) == BLUE  # squashed, both halves kept


def test_downscale_is_antialiased():
    checker = (np.indices((512, 512)).sum(0) % 2 * 255).astype(np.uint8)  # 1-px checkerboard
    out = imageio.decode(encode(Image.fromarray(checker), "PNG")).astype(int)
    assert np.abs(out - 127.5).max() <= 3  # aliasing would leave black/white patterns


def test_large_jpeg_photo_decodes_fast_path():
    photo = Image.fromarray(smooth(32)).resize((2400, 1600), Image.Resampling.BILINEAR)
    out = imageio.decode(encode(photo, "JPEG", quality=90))
    ref = np.asarray(Image.fromarray(smooth(32)).resize((32, 32)))
    assert out.shape == (32, 32, 3) and np.abs(out.astype(int) - ref).mean() < 12


def test_plan_counts_the_pixels_decoding_produces():
    """``plan`` (what the service's per-request budget counts): a PNG decodes whole, a large JPEG at the reduced DCT
    scale ``to_pixels`` then uses, and a second call (inside ``to_pixels``) changes nothing."""
    with imageio.open_image(encode(Image.new("RGB", (300, 200)), "PNG")) as img:
        assert imageio.plan(img, 32) == 300 * 200
    photo = encode(Image.fromarray(smooth(32)).resize((1024, 768)), "JPEG")
    with imageio.open_image(photo) as img:
        assert imageio.plan(img, 32) == (1024 // 8) * (768 // 8)  # 1/8 scale: still >= 2 x 32 on each side
        assert imageio.plan(img, 32) == 128 * 96 and imageio.to_pixels(img, 32).shape == (32, 32, 3)
    assert np.array_equal(imageio.decode(photo), imageio.to_pixels(imageio.open_image(photo), 32))
    with imageio.open_image(encode(Image.new("RGB", (300, 200)), "PNG")) as img, pytest.raises(ImageTooLarge):
        imageio.plan(img, 32, max_pixels=300 * 200 - 1)


# ------------------------------------------------------------------------------------------ rejections
def test_empty():
    with pytest.raises(EmptyImage):
        imageio.decode(b"")


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n"  # Pillow would run Ghostscript on it


@pytest.mark.parametrize("data", [b"hello world", b"%PDF-1.7\n...", EPS, b"\x00" * 1000])
def test_not_an_image(data):
    with pytest.raises(NotAnImage, match="PNG, JPEG"):
        imageio.decode(data)


def test_unlisted_format_refused():
    ppm = encode(Image.new("RGB", (32, 32)), "PPM")
    assert Image.open(io.BytesIO(ppm)).format == "PPM"  # Pillow reads it; the service does not
    with pytest.raises(NotAnImage):
        imageio.decode(ppm)


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("JPEG", {}), ("WEBP", {}), ("BMP", {}), ("GIF", {}), ("TIFF", {}),
                                    ("TIFF", {"compression": "tiff_deflate"})])
@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated(pattern, fmt, kw, keep):
    data = encode(Image.fromarray(pattern), fmt, **kw)
    with pytest.raises(CorruptImage, match="truncated|damaged"):
        imageio.decode(data[: int(len(data) * keep)])


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("PNG", {"optimize": True}), ("JPEG", {}), ("WEBP", {}),
                                    ("WEBP", {"lossless": True}), ("BMP", {}), ("GIF", {}), ("TIFF", {}),
                                    ("TIFF", {"compression": "tiff_deflate"}), ("TIFF", {"compression": "tiff_lzw"})])
def test_no_cut_of_a_file_is_read_as_other_pixels(pattern, fmt, kw):
    """Every prefix of a file (an upload cut short anywhere) is refused with an image error or, where only
    trailing bytes the pixels do not need are missing (PNG's IEND, GIF's trailer), decodes to the same pixels:
    never to an image with missing parts filled in."""
    data = encode(Image.fromarray(pattern), fmt, **kw)
    full = imageio.decode(data)
    same = []
    for keep in range(len(data)):
        try:
            out = imageio.decode(data[:keep])
        except ImageError:
            continue
        assert np.array_equal(out, full), (keep, len(data))
        same.append(keep)
    assert all(keep >= len(data) - 32 for keep in same), same


@pytest.mark.parametrize("interlaced", [False, True])
@pytest.mark.parametrize("w,h", [(13, 7), (9, 9), (1, 1), (5, 1), (1, 6)])
def test_png_whose_pixel_data_ends_early_is_refused(w, h, interlaced):
    """Every cut of the pixel data (a clean zlib stream shorter than the header declares) is refused: Pillow
    catches a cut inside a row, but fills the image with black after a cut at a row's end and says nothing;
    those are exactly the ones png.check_complete refuses. Complete files pass, black last rows included (the
    case the check inflates the stream for)."""
    from atop_serve import png

    rng = np.random.default_rng(w * h)
    pixels = rng.integers(1, 256, (h, w, 3), dtype=np.uint8)
    full = png_rgb(pixels, interlaced)
    with Image.open(io.BytesIO(full)) as im:  # the hand-written encoder is right: Pillow reads it back
        assert np.array_equal(np.asarray(im.convert("RGB")), pixels)
    raw = png.raw_size(w, h, 8, 2, interlaced)
    assert raw == len(zlib.decompress(full[full.index(b"IDAT") + 4:]))  # its one IDAT's stream, IEND ignored
    assert imageio.decode(full, size=w).shape == (w, w, 3)  # complete: accepted
    dark = pixels.copy()
    dark[-2:] = 0
    imageio.decode(png_rgb(dark, interlaced))  # black last rows, complete: accepted
    pillow_silent, ends_early = [], []
    for keep in range(raw):
        cut = png_rgb(pixels, interlaced, keep_bytes=keep)
        try:
            with Image.open(io.BytesIO(cut)) as im:
                im.load()
            pillow_silent.append(keep)
        except OSError:
            pass
        with pytest.raises(CorruptImage) as e:
            imageio.decode(cut)
        if "ends early" in str(e.value):
            ends_early.append(keep)
    assert ends_early == pillow_silent
    assert pillow_silent or (w * h == 1 or (h == 1 and not interlaced))  # the rows' ends inside the data


@pytest.mark.parametrize("mode,bits", [("1", None), ("L", None), ("L", 2), ("L", 4), ("P", None), ("P", 1),
                                       ("LA", None), ("RGB", None), ("RGBA", None), ("I;16", None)])
def test_complete_pngs_of_every_mode_pass_the_completeness_check(mode, bits):
    """No false alarm: Pillow-written PNGs of every mode and bit depth, black last rows included (the check then
    inflates the stream and counts it), decode."""
    rng = np.random.default_rng(7)
    for w, h in ((1, 1), (3, 2), (9, 5), (17, 13)):
        if mode == "I;16":
            img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
        elif mode in ("1", "L", "P"):
            img = Image.fromarray(rng.integers(0, 2 ** (bits or 8), (h, w), dtype=np.uint8)).convert(mode)
        else:
            img = Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8))
        img.paste(0 if len(img.getbands()) == 1 else (0,) * len(img.getbands()), (0, max(0, h - 2), w, h))
        assert imageio.decode(encode(img, "PNG", **({"bits": bits} if bits else {}))).shape == (32, 32, 3)


def test_png_completeness_is_checked_only_where_a_cut_would_show():
    """The second inflate runs only for a decoded image whose last written row is all zero: the last row, the
    last odd row with Adam7 (its seventh pass writes them last), any zero pixel of a one-row Adam7 image."""
    from atop_serve import png

    for mode, zero, one in (("L", 0, 1), ("RGB", (0, 0, 0), (0, 7, 0)), ("RGBA", (0, 0, 0, 0), (0, 0, 0, 1)),
                            ("I;16", 0, 1), ("P", 0, 1), ("1", 0, 1)):
        img = Image.new(mode, (5, 5), one)  # a zero channel is not a zero pixel
        assert not png.might_be_cut(img), mode
        img.paste(zero, (0, 4, 4, 5))
        assert not png.might_be_cut(img), mode  # one pixel of the last row is still written
        img.putpixel((4, 4), zero)
        assert png.might_be_cut(img), mode
    img = Image.new("L", (4, 5), 9)
    img.info["interlace"] = 1
    img.paste(0, (0, 4, 4, 5))
    assert not png.might_be_cut(img)  # with Adam7, row 4 is written before row 3
    img.paste(0, (0, 3, 4, 4))
    assert png.might_be_cut(img)
    row = Image.new("L", (5, 1), 9)
    row.info["interlace"] = 1
    assert not png.might_be_cut(row)
    row.putpixel((3, 0), 0)
    assert png.might_be_cut(row)


def test_too_many_pixels_checked_before_decoding():
    with pytest.raises(ImageTooLarge, match="MP"):
        imageio.decode(png_header_only(10_000, 6_000))  # 60 MP > 50 MP default (< Pillow's own 89 MP warning)
    with pytest.raises(ImageTooLarge):
        imageio.decode(encode(Image.new("RGB", (64, 64)), "PNG"), max_pixels=1000)


def test_pillow_bomb_error_is_too_large():
    # above twice Image.MAX_IMAGE_PIXELS Pillow itself refuses at open, whatever our own limit
    with pytest.raises(ImageTooLarge):
        imageio.decode(png_header_only(20_000, 20_000), max_pixels=10**12)


def test_real_compressed_bomb():
    bomb = encode(Image.new("1", (8000, 8000)), "PNG")  # 64 MP of zeros: a few kB on the wire
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLarge):
        imageio.decode(bomb)


def test_errors_carry_http_status():
    assert (EmptyImage.http_status, NotAnImage.http_status, CorruptImage.http_status, ImageTooLarge.http_status) == (
        400, 415, 422, 413)
    assert all(issubclass(e, ImageError) for e in (EmptyImage, NotAnImage, CorruptImage, ImageTooLarge))


def test_encode_png_round_trip(pattern):
    assert np.array_equal(imageio.decode(imageio.encode_png(pattern)), pattern)


# ------------------------------------------------------------------------------- damaged files, property-based
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


def _seed_files() -> list[bytes]:
    """Small files in every accepted format and several modes: what the mutations below start from."""
    img = Image.fromarray(smooth(24))
    rgba = img.convert("RGBA")
    rgba.putalpha(100)
    sixteen = Image.fromarray((np.asarray(img.convert("L"), dtype=np.uint16) * 257))
    return [encode(img, "PNG"), encode(rgba, "PNG"), encode(img.convert("P"), "PNG", transparency=0),
            encode(sixteen, "PNG"), encode(img, "JPEG"), encode(img, "JPEG", progressive=True),
            encode(img, "WEBP"), encode(rgba, "WEBP", lossless=True),
            encode(img, "GIF", save_all=True, append_images=[rgba.convert("RGB")]), encode(img, "BMP"),
            encode(img.convert("P"), "BMP"), encode(img, "TIFF"), encode(img, "TIFF", compression="tiff_deflate"),
            encode(img, "TIFF", compression="jpeg"), encode(sixteen, "TIFF")]


SEEDS = _seed_files()
_HUGE = [0, 1, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF]


def _size_field(data: bytes, value: int, which: int) -> bytes:
    """``data`` with one of its header's 24 (width, height) fields (16 or 32 bits, either byte order) set to
    ``value``, where it has one."""
    spots = [(i, f) for f in ("<H", ">H", "<I", ">I") for i in range(min(len(data), 512) - struct.calcsize(f))
             if struct.unpack_from(f, data, i)[0] == 24]
    if not spots:
        return data
    at, fmt = spots[which % len(spots)]
    return data[:at] + struct.pack(fmt, value & (0xFFFF if fmt[1] == "H" else 0xFFFFFFFF)) + data[at + struct.calcsize(fmt):]


@st.composite
def _damaged(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "duplicate", "size"]))
        if op == "flip":
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            data = data[:draw(st.integers(1, len(data)))]
        elif op == "duplicate":
            a = draw(st.integers(0, len(data) - 1))
            b = draw(st.integers(a, min(len(data), a + 256)))
            at = draw(st.integers(0, len(data)))
            data = data[:at] + data[a:b] * draw(st.integers(1, 3)) + data[at:]
        else:
            data = bytearray(_size_field(bytes(data), draw(st.sampled_from(_HUGE)), draw(st.integers(0, 50))))
    if data.startswith(b"\x89PNG") and draw(st.booleans()):  # valid chunk CRCs, so that the damage is read further
        data = bytearray(_png_fix_crcs(bytes(data)))
    return bytes(data)


def _png_fix_crcs(data: bytes) -> bytes:
    out, i = bytearray(data[:8]), 8
    while i + 12 <= len(data) and i + 12 + struct.unpack_from(">I", data, i)[0] <= len(data):
        n = struct.unpack_from(">I", data, i)[0]
        out += data[i:i + 8 + n] + struct.pack(">I", zlib.crc32(data[i + 4:i + 8 + n]))
        i += 12 + n
    return bytes(out + data[i:])


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(_damaged())
def test_damaged_files_give_an_image_or_an_image_error(data):
    """Bit flips, truncation, duplicated chunks, huge header sizes: a (32, 32, 3) uint8 array or one of the
    module's errors (mapped to 4xx), never another exception. The pixel limit is low here so that no example decodes
    a large image (the limit itself: test_too_many_pixels_checked_before_decoding)."""
    try:
        out = imageio.decode(data, max_pixels=1_000_000)
    except (EmptyImage, NotAnImage, CorruptImage, ImageTooLarge):
        return
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_sixteen_bit_conversion_memory():
    """16-bit and float images are rescaled in place: one float64 array (8 bytes a pixel), not four, so that a
    file under the pixel limit (50 MP: a few kB of zeros can declare it) does not cost gigabytes."""
    import tracemalloc

    img = Image.fromarray(np.full((1000, 1000), 40_000, dtype=np.uint16))
    tracemalloc.start()
    try:
        rgb = imageio.to_rgb(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (156, 156, 156)
    assert peak < 1.5 * 8 * img.width * img.height, peak
