"""Tests for rawdiff_infer.io: decoding inputs, refusing bad ones, DNG / TIFF / npy writers, Bayer helpers."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import logging
import os
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageCms

from rawdiff_infer.camera import CAMERAS, CFA_PATTERNS, Camera
from rawdiff_infer.io import (
    SUPPORTED_INPUT_SUFFIXES,
    DecodedImage,
    ImageError,
    atomic_write,
    demosaic_bilinear,
    is_supported_image,
    mosaic,
    read_image,
    render_srgb_preview,
    write_dng,
    write_npy,
    write_tiff,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")
PHOTOS = SHARED / "photos"
RAWS = SHARED / "raw"
DATA = Path(__file__).parent / "data"
HAVE_IMAGECODECS = importlib.util.find_spec("imagecodecs") is not None

needs_shared = pytest.mark.skipif(not PHOTOS.is_dir(), reason="shared/data/photos not available")


# ---------------------------------------------------------------------------------------------- helpers

def smooth_rgb(h: int, w: int, *, dtype=np.uint8, seed: int = 0) -> np.ndarray:
    """A smooth colourful test picture (JPEG-friendly), values spanning most of the range."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    ph = rng.uniform(0, 2 * np.pi, 3)
    img = np.stack([0.5 + 0.4 * np.sin(2 * np.pi * (x / w + y / (2 * h)) + ph[c]) for c in range(3)], -1)
    top = 255 if dtype == np.uint8 else 65535
    return np.rint(img * top).astype(dtype)


def smooth_linear(h: int, w: int, *, seed: int = 0) -> np.ndarray:
    """Float32 H x W x 3 in [0.05, 0.95], smooth but not separable, different per channel."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    a, b, c = rng.uniform(0.5, 2.0, 3)
    chans = [0.5 + 0.45 * np.sin(a * x / w * 3 + b * y / h * 2 + k) * np.cos(c * y / h + k / 2) for k in range(3)]
    return np.stack(chans, -1).astype(np.float32)


def png16_bytes(arr: np.ndarray, *, orientation: int | None = None) -> bytes:
    """Minimal 16-bit RGB / RGBA PNG encoder (filter 0, optional eXIf orientation): Pillow cannot write
    16-bit colour PNGs."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    exif = b""
    if orientation is not None:
        e = Image.Exif()
        e[0x0112] = orientation
        exif = chunk(b"eXIf", e.tobytes())
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + exif + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


# Adobe RGB (1998) colorants, Bradford-adapted to D50 as stored in ICC profiles, and gamma 563/256.
ADOBE_RGB_D50 = np.array([[0.60974, 0.20528, 0.14919],
                          [0.31111, 0.62567, 0.06322],
                          [0.01947, 0.06087, 0.74457]])
ADOBE_GAMMA = 563 / 256


def adobe_rgb_icc() -> bytes:
    """Build a v2 matrix/TRC 'Adobe RGB (1998)'-like ICC profile by hand (no profile ships with Pillow)."""
    def s15(v: float) -> bytes:
        return struct.pack(">i", int(round(v * 65536)))

    def xyz(v) -> bytes:
        return b"XYZ \0\0\0\0" + b"".join(s15(c) for c in v)

    desc_text = b"Test Adobe RGB (1998)"
    desc = (b"desc\0\0\0\0" + struct.pack(">I", len(desc_text) + 1) + desc_text + b"\0"
            + struct.pack(">II", 0, 0) + struct.pack(">HB", 0, 0) + b"\0" * 67)
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, 563) + b"\0\0"
    tags = [
        (b"desc", desc),
        (b"wtpt", xyz((0.9642, 1.0, 0.8249))),
        (b"rXYZ", xyz(ADOBE_RGB_D50[:, 0])),
        (b"gXYZ", xyz(ADOBE_RGB_D50[:, 1])),
        (b"bXYZ", xyz(ADOBE_RGB_D50[:, 2])),
        (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve),
        (b"cprt", b"text\0\0\0\0no copyright, test data\0"),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (struct.pack(">I", size) + b"\0\0\0\0" + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + struct.pack(">6H", 2024, 1, 1, 0, 0, 0) + b"acsp" + b"\0" * 24 + struct.pack(">I", 0)
              + s15(0.9642) + s15(1.0) + s15(0.8249) + b"\0" * 48)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def srgb_encode(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0, 1)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055)


def adobe_to_srgb_expected(rgb8: np.ndarray) -> np.ndarray:
    """Reference maths: Adobe RGB code values -> XYZ(D50) -> sRGB (lcms's D50-adapted sRGB colorants)."""
    prof = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).profile
    srgb_d50 = np.array([prof.red_colorant[0], prof.green_colorant[0], prof.blue_colorant[0]]).T  # XYZ columns
    lin = (rgb8.astype(np.float64) / 255) ** ADOBE_GAMMA
    xyz = lin @ ADOBE_RGB_D50.T
    out = xyz @ np.linalg.inv(srgb_d50).T
    return srgb_encode(out) * 255


def orient_reference(a: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF orientation applied with Pillow's own transposes (the definition we must match)."""
    t = Image.Transpose
    op = {2: t.FLIP_LEFT_RIGHT, 3: t.ROTATE_180, 4: t.FLIP_TOP_BOTTOM, 5: t.TRANSPOSE, 6: t.ROTATE_270,
          7: t.TRANSVERSE, 8: t.ROTATE_90}.get(orientation)
    if op is None:
        return a
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(a[..., c])).transpose(op))
                     for c in range(a.shape[2])], -1)


def assert_one_line(exc: ImageError, path: Path | str, *phrases: str) -> None:
    msg = str(exc)
    assert "\n" not in msg and msg == msg.strip()
    assert msg.startswith(f"{os.fspath(path)}: "), msg
    for p in phrases:
        assert p in msg, msg


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------- decoding

def test_supported_suffixes():
    assert is_supported_image("a.JPG") and is_supported_image(Path("x/b.tiff")) and is_supported_image("c.webp")
    assert not is_supported_image("a.dng") and not is_supported_image("a.gpr") and not is_supported_image("a")
    assert {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"} <= SUPPORTED_INPUT_SUFFIXES


def test_png_8bit_exact(tmp_path):
    a = smooth_rgb(31, 45)
    Image.fromarray(a).save(tmp_path / "a.png")
    d = read_image(tmp_path / "a.png")
    assert isinstance(d, DecodedImage)
    assert d.pixels.dtype == np.uint8 and d.bit_depth == 8 and d.format == "PNG"
    assert d.pixels.flags["C_CONTIGUOUS"] and np.array_equal(d.pixels, a)
    assert d.warnings == () and d.exif_orientation == 1 and not d.icc_converted
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.bit_depth = 16  # type: ignore[misc]


def test_png_16bit_rgb(tmp_path):
    a = smooth_rgb(20, 33, dtype=np.uint16)
    (tmp_path / "a16.png").write_bytes(png16_bytes(a))
    d = read_image(tmp_path / "a16.png")
    if HAVE_IMAGECODECS:
        assert d.bit_depth == 16 and d.pixels.dtype == np.uint16 and np.array_equal(d.pixels, a)
        assert d.warnings == ()
    else:  # Pillow reduces 16-bit colour to 8 bits (it keeps the high byte)
        assert d.bit_depth == 8 and d.pixels.dtype == np.uint8
        assert np.abs(d.pixels.astype(int) - (a >> 8)).max() <= 1
        assert any("16-bit PNG reduced to 8 bits" in w for w in d.warnings)


def test_png_16bit_rgba_with_orientation(tmp_path):
    a = smooth_rgb(10, 14, dtype=np.uint16, seed=5)
    rgba = np.concatenate([a, np.full((10, 14, 1), 30000, np.uint16)], -1)
    (tmp_path / "a16.png").write_bytes(png16_bytes(rgba, orientation=8))
    d = read_image(tmp_path / "a16.png")
    assert d.exif_orientation == 8 and d.pixels.shape == (14, 10, 3)
    assert any("alpha" in w for w in d.warnings)
    if HAVE_IMAGECODECS:
        assert d.bit_depth == 16 and np.array_equal(d.pixels, orient_reference(a, 8))
    else:
        assert d.bit_depth == 8 and np.abs(d.pixels.astype(int) - orient_reference(a >> 8, 8)).max() <= 1


def test_png_16bit_rgb_falls_back_without_imagecodecs(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imagecodecs", None)  # makes `import imagecodecs` fail, as if absent
    a = smooth_rgb(12, 17, dtype=np.uint16)
    (tmp_path / "a16.png").write_bytes(png16_bytes(a))
    d = read_image(tmp_path / "a16.png")
    assert d.bit_depth == 8 and d.pixels.dtype == np.uint8 and d.pixels.shape == (12, 17, 3)
    assert np.abs(d.pixels.astype(int) - (a >> 8)).max() <= 1
    assert any("imagecodecs" in w for w in d.warnings)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_tiff_16bit_kept(tmp_path, compression):
    a = smooth_rgb(21, 34, dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", a, photometric="rgb", compression=compression)
    d = read_image(tmp_path / "a.tif")
    assert d.bit_depth == 16 and d.pixels.dtype == np.uint16 and d.format == "TIFF"
    assert np.array_equal(d.pixels, a) and d.warnings == ()


def test_tiff_16bit_lzw_fixture():
    """A 16-bit LZW TIFF (as Photoshop / Lightroom write): tifffile needs imagecodecs for LZW."""
    path = DATA / "rgb16_lzw.tif"
    h, w = 12, 16
    y, x = np.mgrid[0:h, 0:w]
    expected = np.stack([x * 4000 + y, y * 5000 + x, (x + y) * 2000], -1).astype(np.uint16)
    d = read_image(path)
    if HAVE_IMAGECODECS:
        assert d.bit_depth == 16 and np.array_equal(d.pixels, expected) and d.warnings == ()
    else:
        assert d.bit_depth == 8 and np.abs(d.pixels.astype(int) - (expected >> 8)).max() <= 1
        assert any("read at 8 bits" in w for w in d.warnings)


def test_tiff_8bit_lzw_via_pillow(tmp_path):
    a = smooth_rgb(19, 23)
    Image.fromarray(a).save(tmp_path / "a.tif", compression="tiff_lzw")
    d = read_image(tmp_path / "a.tif")
    assert d.bit_depth == 8 and np.array_equal(d.pixels, a)


def test_jpeg(tmp_path):
    a = smooth_rgb(40, 64)
    Image.fromarray(a).save(tmp_path / "a.jpg", quality=95)
    d = read_image(tmp_path / "a.jpg")
    assert d.format == "JPEG" and d.pixels.shape == (40, 64, 3) and d.pixels.dtype == np.uint8
    assert np.abs(d.pixels.astype(int) - a).mean() < 3


def test_mpo_multi_picture_jpeg(tmp_path):
    a, b = smooth_rgb(16, 24, seed=1), smooth_rgb(16, 24, seed=2)
    Image.fromarray(a).save(tmp_path / "phone.jpg", format="MPO", save_all=True,
                            append_images=[Image.fromarray(b)], quality=95)
    assert Image.open(tmp_path / "phone.jpg").format == "MPO"
    d = read_image(tmp_path / "phone.jpg")
    with Image.open(tmp_path / "phone.jpg") as im:
        first = np.asarray(im.convert("RGB"))
    assert d.format == "JPEG" and np.array_equal(d.pixels, first)
    assert any("2 frames" in w for w in d.warnings)


@needs_shared
def test_real_photos():
    d = read_image(PHOTOS / "skimage_rocket.jpg")
    assert d.pixels.shape == (427, 640, 3) and d.bit_depth == 8
    d = read_image(PHOTOS / "kodim03.png")
    assert d.pixels.shape == (512, 768, 3) and d.pixels.std() > 10


def test_webp_lossless(tmp_path):
    a = smooth_rgb(22, 30)
    Image.fromarray(a).save(tmp_path / "a.webp", lossless=True)
    d = read_image(tmp_path / "a.webp")
    assert d.format == "WebP" and np.array_equal(d.pixels, a)


def test_grayscale_8_and_16_bit(tmp_path):
    g = smooth_rgb(10, 14)[..., 1]
    Image.fromarray(g).save(tmp_path / "g.png")
    d = read_image(tmp_path / "g.png")
    assert d.pixels.shape == (10, 14, 3) and d.bit_depth == 8
    assert all(np.array_equal(d.pixels[..., c], g) for c in range(3))
    g16 = smooth_rgb(10, 14, dtype=np.uint16)[..., 0]
    Image.fromarray(g16).save(tmp_path / "g16.png")  # mode I;16
    d = read_image(tmp_path / "g16.png")
    assert d.bit_depth == 16 and d.pixels.dtype == np.uint16
    assert all(np.array_equal(d.pixels[..., c], g16) for c in range(3))


def test_rgba_alpha_dropped_with_warning(tmp_path, caplog):
    a = smooth_rgb(9, 11)
    alpha = np.full((9, 11, 1), 128, np.uint8)
    Image.fromarray(np.concatenate([a, alpha], -1)).save(tmp_path / "a.png")
    with caplog.at_level(logging.WARNING, logger="rawdiff_infer.io"):
        d = read_image(tmp_path / "a.png")
    assert np.array_equal(d.pixels, a)
    assert any("alpha" in w for w in d.warnings)
    assert any("alpha" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_palette_and_la(tmp_path):
    a = smooth_rgb(16, 16)
    p = Image.fromarray(a).quantize(colors=32)
    p.save(tmp_path / "p.png")
    d = read_image(tmp_path / "p.png")
    assert np.array_equal(d.pixels, np.asarray(p.convert("RGB"))) and d.warnings == ()
    p.save(tmp_path / "pt.png", transparency=0)
    d = read_image(tmp_path / "pt.png")
    assert np.array_equal(d.pixels, np.asarray(p.convert("RGB"))) and any("alpha" in w for w in d.warnings)
    la = Image.merge("LA", [Image.fromarray(a[..., 0]), Image.fromarray(a[..., 1])])
    la.save(tmp_path / "la.png")
    d = read_image(tmp_path / "la.png")
    assert np.array_equal(d.pixels, np.repeat(a[..., :1], 3, -1)) and any("alpha" in w for w in d.warnings)


def test_cmyk_jpeg(tmp_path):
    a = smooth_rgb(24, 32)
    cmyk = Image.fromarray(a).convert("CMYK")
    cmyk.save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    d = read_image(tmp_path / "c.jpg")
    assert d.pixels.shape == (24, 32, 3) and np.abs(d.pixels.astype(int) - a).mean() < 4
    assert any("CMYK" in w for w in d.warnings)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_all_values_pillow_path(tmp_path, orientation):
    a = smooth_rgb(6, 10, seed=orientation)
    a[0, 0] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(tmp_path / "o.png", exif=exif.tobytes())
    d = read_image(tmp_path / "o.png")
    assert d.exif_orientation == orientation
    assert np.array_equal(d.pixels, orient_reference(a, orientation))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_all_values_16bit_tiff_path(tmp_path, orientation):
    a = smooth_rgb(6, 10, dtype=np.uint16, seed=orientation)
    tifffile.imwrite(tmp_path / "o.tif", a, photometric="rgb", extratags=[(274, "H", 1, (orientation,), True)])
    d = read_image(tmp_path / "o.tif")
    assert d.bit_depth == 16 and d.exif_orientation == orientation
    assert np.array_equal(d.pixels, orient_reference(a, orientation))


def test_jpeg_orientation_6_rotates_clockwise(tmp_path):
    h, w = 40, 64
    a = np.full((h, w, 3), 30, np.uint8)
    a[:16, :16] = (250, 20, 20)  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "o6.jpg", quality=95, exif=exif.tobytes())
    d = read_image(tmp_path / "o6.jpg")
    assert d.exif_orientation == 6 and d.pixels.shape == (w, h, 3)  # portrait now
    # rotating 90 degrees clockwise moves the stored top-left corner to the displayed top-right
    assert d.pixels[4, h - 5, 0] > 200 and d.pixels[4, 4, 0] < 80 and d.pixels[w - 5, h - 5, 0] < 80


def test_icc_adobe_rgb_converted_to_srgb(tmp_path):
    icc = adobe_rgb_icc()
    assert ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))).strip() \
        == "Test Adobe RGB (1998)"
    colours = np.array([[200, 120, 60], [128, 128, 128], [60, 170, 200], [230, 40, 90]], np.uint8)
    a = np.repeat(np.repeat(colours[None], 4, 0), 4, 1)  # 4 x 16 patches
    Image.fromarray(a).save(tmp_path / "adobe.png", icc_profile=icc)
    d = read_image(tmp_path / "adobe.png")
    assert d.icc_converted and d.bit_depth == 8
    expected = adobe_to_srgb_expected(a)
    assert np.abs(d.pixels.astype(float) - expected).max() <= 2.0
    assert np.abs(d.pixels.astype(int) - a).max() >= 10  # the conversion really changed the colours


def test_icc_16bit_tiff_converted_at_8_bits(tmp_path):
    a16 = np.zeros((4, 4, 3), np.uint16)
    a16[:] = (200 * 257, 120 * 257, 60 * 257)
    tifffile.imwrite(tmp_path / "adobe16.tif", a16, photometric="rgb", iccprofile=adobe_rgb_icc())
    d = read_image(tmp_path / "adobe16.tif")
    assert d.icc_converted and d.bit_depth == 8
    assert np.abs(d.pixels[0, 0] - adobe_to_srgb_expected(np.array([[[200, 120, 60]]]))[0, 0]).max() <= 2.0
    assert any("at 8 bits" in w for w in d.warnings)


def test_icc_srgb_profile_left_alone(tmp_path):
    a = smooth_rgb(8, 8)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(a).save(tmp_path / "s.png", icc_profile=srgb)
    d = read_image(tmp_path / "s.png")
    assert not d.icc_converted and np.array_equal(d.pixels, a) and d.warnings == ()


@pytest.mark.parametrize("profile", ["garbage", "lab"])
def test_icc_failure_keeps_pixels_with_warning(tmp_path, profile):
    a = smooth_rgb(8, 8)
    icc = b"not an icc profile at all" * 8 if profile == "garbage" else \
        ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()  # a Lab profile on RGB data
    Image.fromarray(a).save(tmp_path / "bad_icc.png", icc_profile=icc)
    d = read_image(tmp_path / "bad_icc.png")
    assert not d.icc_converted and np.array_equal(d.pixels, a)
    assert any("ICC" in w for w in d.warnings)


def test_decompression_bomb_guard(tmp_path, monkeypatch):
    Image.fromarray(smooth_rgb(100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ImageError) as ei:
        read_image(tmp_path / "big.png", max_pixels=5000)
    assert_one_line(ei.value, tmp_path / "big.png", "--max-pixels", "10000")
    assert read_image(tmp_path / "big.png", max_pixels=10000).pixels.shape == (100, 100, 3)
    # Pillow's global limit is the default, and a larger max_pixels lifts it (Pillow itself would raise
    # DecompressionBombError above 2 * MAX_IMAGE_PIXELS).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError) as ei:
        read_image(tmp_path / "big.png")
    assert_one_line(ei.value, tmp_path / "big.png", "--max-pixels")
    assert read_image(tmp_path / "big.png", max_pixels=20000).pixels.shape == (100, 100, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored
    with pytest.raises(ValueError):
        read_image(tmp_path / "big.png", max_pixels=0)


# ---------------------------------------------------------------------------------------------- bad inputs

def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    cases: dict[str, tuple[Path, tuple[str, ...]]] = {}
    cases["missing"] = (tmp_path / "nope.jpg", ("no such file",))
    (tmp_path / "empty.jpg").write_bytes(b"")
    cases["zero-byte"] = (tmp_path / "empty.jpg", ("empty",))
    (tmp_path / "notes.jpg").write_text("these are my holiday notes, not a picture\n")
    cases["text named .jpg"] = (tmp_path / "notes.jpg", ("not an image",))
    (tmp_path / "adir.png").mkdir()
    cases["directory"] = (tmp_path / "adir.png", ("directory",))
    Image.new("RGB", (4, 4)).save(tmp_path / "a.gif")
    cases["gif"] = (tmp_path / "a.gif", ("unsupported image format GIF",))
    data = png16_bytes(smooth_rgb(120, 160, dtype=np.uint16))
    (tmp_path / "half16.png").write_bytes(data[: len(data) // 2])
    cases["truncated 16-bit PNG"] = (tmp_path / "half16.png", ("truncated PNG data",))
    for comp in (None, "zlib"):
        tifffile.imwrite(tmp_path / "full.tif", smooth_rgb(120, 160, dtype=np.uint16), photometric="rgb",
                         compression=comp)
        data = (tmp_path / "full.tif").read_bytes()
        (tmp_path / f"half16_{comp}.tif").write_bytes(data[: len(data) // 2])
        cases[f"truncated 16-bit TIFF {comp}"] = (tmp_path / f"half16_{comp}.tif", ("truncated TIFF data",))
    tifffile.imwrite(tmp_path / "full8z.tif", smooth_rgb(120, 160), photometric="rgb", compression="zlib")
    data = (tmp_path / "full8z.tif").read_bytes()
    (tmp_path / "half8z.tif").write_bytes(data[: len(data) // 2])
    cases["truncated 8-bit TIFF"] = (tmp_path / "half8z.tif", ("truncated TIFF data",))
    Image.fromarray(smooth_rgb(120, 160)).save(tmp_path / "full8.tif", compression="tiff_lzw")
    data = (tmp_path / "full8.tif").read_bytes()
    (tmp_path / "half8.tif").write_bytes(data[: len(data) // 2])
    # Pillow writes the IFD after the pixel data: half the file has no IFD left, only the header
    cases["truncated 8-bit LZW TIFF"] = (tmp_path / "half8.tif", ("truncated or corrupt TIFF header",))
    if PHOTOS.is_dir():
        jpg = (PHOTOS / "skimage_rocket.jpg").read_bytes()
        (tmp_path / "half.jpg").write_bytes(jpg[: len(jpg) // 2])
        cases["truncated JPEG"] = (tmp_path / "half.jpg", ("truncated JPEG data",))
        png = (PHOTOS / "kodim03.png").read_bytes()
        (tmp_path / "half.png").write_bytes(png[: len(png) // 2])
        cases["truncated PNG"] = (tmp_path / "half.png", ("truncated PNG data",))
        (tmp_path / "head.png").write_bytes(png[:40])
        cases["PNG header only"] = (tmp_path / "head.png", ("PNG",))
    if RAWS.is_dir():
        raw_phrase = ("camera RAW files are not accepted as input",)
        cases["GoPro GPR"] = (RAWS / "gopro_hero6_GOPR0024_unsupported_by_rawpy.GPR", raw_phrase)
        cases["Canon DNG"] = (RAWS / "canon_eos550d_magiclantern_colorchart.dng", raw_phrase)
        shutil.copy(RAWS / "lg_h815_linearraw_lossy_600x338.dng", tmp_path / "disguised.tif")
        cases["DNG renamed .tif"] = (tmp_path / "disguised.tif", raw_phrase)
    return cases


BAD_CASES = ["missing", "zero-byte", "text named .jpg", "directory", "gif", "truncated JPEG", "truncated PNG",
             "PNG header only", "truncated 16-bit PNG", "truncated 16-bit TIFF None", "truncated 16-bit TIFF zlib",
             "truncated 8-bit TIFF", "truncated 8-bit LZW TIFF", "GoPro GPR", "Canon DNG", "DNG renamed .tif"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_inputs_raise_image_error(tmp_path, case, capfd):
    cases = _bad_inputs(tmp_path)
    if case not in cases:
        pytest.skip("shared data not available")
    path, phrases = cases[case]
    capfd.readouterr()
    with pytest.raises(ImageError) as ei:
        read_image(path)
    assert_one_line(ei.value, path, *phrases)
    assert capfd.readouterr().err == ""  # no decoder noise (e.g. libtiff) on stderr either


def test_our_own_dng_is_refused_even_renamed(tmp_path):
    write_dng(tmp_path / "x.dng", smooth_linear(8, 8), camera=CAMERAS["nikon-d700"])
    os.replace(tmp_path / "x.dng", tmp_path / "x.tiff")
    with pytest.raises(ImageError) as ei:
        read_image(tmp_path / "x.tiff")
    assert_one_line(ei.value, tmp_path / "x.tiff", "camera RAW")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    Image.fromarray(smooth_rgb(4, 4)).save(tmp_path / "locked.png")
    os.chmod(tmp_path / "locked.png", 0)
    try:
        with pytest.raises(ImageError) as ei:
            read_image(tmp_path / "locked.png")
        assert_one_line(ei.value, tmp_path / "locked.png", "permission denied")
    finally:
        os.chmod(tmp_path / "locked.png", 0o644)


# ---------------------------------------------------------------------------------------------- Bayer helpers

@pytest.mark.parametrize("pattern", sorted(CFA_PATTERNS))
def test_mosaic_picks_the_pattern_colours(pattern):
    img = np.zeros((4, 6, 3), np.float32)
    for c in range(3):
        img[..., c] = c + 1
    m = mosaic(img, pattern)
    cells = CFA_PATTERNS[pattern]
    assert m.shape == (4, 6) and m.dtype == np.float32
    for y in range(4):
        for x in range(6):
            assert m[y, x] == cells[(y % 2) * 2 + (x % 2)] + 1


@pytest.mark.parametrize("pattern", sorted(CFA_PATTERNS))
def test_demosaic_bilinear(pattern):
    h, w = 13, 18
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    planar = np.stack([2 * x + y, 3 * y - x + 50, x + y + 7], -1).astype(np.float32)  # affine per channel
    m = mosaic(planar, pattern)
    out = demosaic_bilinear(m, pattern)
    assert out.shape == (h, w, 3) and out.dtype == np.float32
    assert np.array_equal(mosaic(out, pattern), m)  # measured samples kept exactly
    # bilinear interpolation reproduces an affine image exactly away from the border
    np.testing.assert_allclose(out[1:-1, 1:-1], planar[1:-1, 1:-1], atol=1e-4)
    const = demosaic_bilinear(np.full((5, 7), 0.25, np.float32), pattern)
    np.testing.assert_allclose(const, 0.25, atol=1e-7)  # borders too
    with pytest.raises(ValueError):
        demosaic_bilinear(np.zeros((1, 5)), pattern)


def test_bayer_helpers_reject_bad_patterns():
    with pytest.raises(ValueError):
        mosaic(np.zeros((2, 2, 3)), "RGBW")
    with pytest.raises(ValueError):
        mosaic(np.zeros((2, 2)), "RGGB")
    img = np.arange(12).reshape(2, 2, 3)
    assert np.array_equal(mosaic(img, (2, 1, 1, 0)), mosaic(img, "BGGR"))


# ---------------------------------------------------------------------------------------------- DNG

def _camera(pattern: str, *, odd: bool) -> Camera:
    base = CAMERAS["canon-eos-5d"] if odd else CAMERAS["nikon-d700"]  # black 128 / 0
    return dataclasses.replace(base, cfa_pattern=pattern)


@pytest.mark.parametrize("size", [(37, 50), (64, 48)], ids=["37x50", "64x48"])
@pytest.mark.parametrize("pattern", sorted(CFA_PATTERNS))
def test_dng_round_trip_with_rawpy(tmp_path, pattern, size):
    rawpy = pytest.importorskip("rawpy")
    h, w = size
    cam = _camera(pattern, odd=h % 2 == 1)
    lin = smooth_linear(h, w, seed=h + w)
    path = tmp_path / "out.dng"
    written = write_dng(path, lin, camera=cam)
    assert written.dtype == np.uint16 and written.shape == (h, w)
    expected = np.rint(cam.black_level + mosaic(lin, pattern).astype(np.float64)
                       * (cam.white_level - cam.black_level)).astype(np.uint16)
    assert np.array_equal(written, expected)
    with rawpy.imread(str(path)) as raw:
        assert np.array_equal(raw.raw_image_visible, written)
        colour = raw.raw_pattern.copy()
        colour[colour == 3] = 1  # LibRaw calls the second green 3
        assert colour.ravel().tolist() == list(CFA_PATTERNS[pattern])
        assert raw.color_desc == b"RGBG"
        assert list(raw.black_level_per_channel) == [cam.black_level] * 4
        assert raw.white_level == cam.white_level
        np.testing.assert_allclose(raw.camera_whitebalance[:3], 1.0, atol=1e-6)
        np.testing.assert_allclose(raw.rgb_xyz_matrix[:3].ravel(), cam.color_matrix, atol=1e-5)
        assert raw.sizes.flip == 0
        out = raw.postprocess(use_camera_wb=True, no_auto_bright=True, output_color=rawpy.ColorSpace.raw,
                              gamma=(1, 1), output_bps=16, user_flip=0,
                              adjust_maximum_thr=0.0)  # else LibRaw takes the data maximum as white
    assert out.shape == (h, w, 3)
    got = out[2:-2, 2:-2].astype(np.float64) / 65535
    ref = lin[2:-2, 2:-2].astype(np.float64)
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.999
    np.testing.assert_allclose(got.reshape(-1, 3).mean(0) / ref.reshape(-1, 3).mean(0), 1.0, atol=0.01)


def test_dng_grey_renders_grey_and_matches_our_preview(tmp_path):
    rawpy = pytest.importorskip("rawpy")
    cam = CAMERAS["canon-eos-5d"]
    grey = np.full((24, 32, 3), 0.18, np.float32)
    write_dng(tmp_path / "grey.dng", grey, camera=cam)
    with rawpy.imread(str(tmp_path / "grey.dng")) as raw:
        srgb = raw.postprocess(use_camera_wb=True, no_auto_bright=True, gamma=(2.4, 12.92), output_bps=16,
                                  adjust_maximum_thr=0.0)
    mean = srgb.reshape(-1, 3).astype(np.float64).mean(0)
    np.testing.assert_allclose(mean / mean[1], 1.0, atol=0.01)  # neutral: R = G = B
    assert abs(mean[1] / 65535 - srgb_encode(np.array(0.18))) < 0.01  # and exposure kept
    # Our own preview rendering follows the same maths as LibRaw's, on a colourful image too.
    lin = smooth_linear(40, 56, seed=3) * 0.8
    write_dng(tmp_path / "c.dng", lin, camera=cam)
    with rawpy.imread(str(tmp_path / "c.dng")) as raw:
        srgb8 = raw.postprocess(use_camera_wb=True, no_auto_bright=True, gamma=(2.4, 12.92), output_bps=8,
                                  adjust_maximum_thr=0.0)
    ours = render_srgb_preview(lin, camera=cam, max_side=100)
    assert np.abs(srgb8[2:-2, 2:-2].astype(int) - ours[2:-2, 2:-2]).max() <= 2


def test_dng_structure_and_tags(tmp_path):
    rawpy = pytest.importorskip("rawpy")
    cam = CAMERAS["nikon-d700"]
    lin = smooth_linear(300, 420)
    written = write_dng(tmp_path / "t.dng", lin, camera=cam, orientation=6, software="rawdiff 0.1",
                        description="unit test é")
    with tifffile.TiffFile(tmp_path / "t.dng") as tif:
        ifd0 = tif.pages[0]
        tags = {t.code: t.value for t in ifd0.tags.values()}
        assert tags[254] == 1 and ifd0.shape == (150, 210, 3)  # 2x box-downsampled: long side <= 256
        assert ifd0.dtype == np.uint8 and int(ifd0.photometric) == 2
        assert tuple(tags[50706]) == (1, 4, 0, 0) and tuple(tags[50707]) == (1, 1, 0, 0)
        assert tags[271] == cam.make and tags[272] == cam.model and tags[50708] == cam.unique_model
        assert tags[274] == 6 and tags[305] == "rawdiff 0.1" and tags[270] == "unit test \\xe9"
        assert tags[50778] == 21 and tuple(tags[50728]) == (1, 1, 1, 1, 1, 1)
        assert len(ifd0.subifds) == 1
        tif.filehandle.seek(ifd0.subifds[0])
        sub = tifffile.TiffPage(tif, index=(0, 0))
        stags = {t.code: t.value for t in sub.tags.values()}
        assert stags[254] == 0 and int(sub.photometric) == 32803 and sub.bitspersample == 16
        assert tuple(stags[33421]) == (2, 2) and tuple(stags[33422]) == CFA_PATTERNS[cam.cfa_pattern]
        assert tuple(stags[50710]) == (0, 1, 2) and stags[50711] == 1 and tuple(stags[50713]) == (1, 1)
        assert np.array_equal(sub.asarray(), written)
    with rawpy.imread(str(tmp_path / "t.dng")) as raw:
        assert raw.sizes.flip == 6  # LibRaw's code for EXIF orientation 6 (90 degrees clockwise)
        thumb = raw.extract_thumb()
        assert thumb.format == rawpy.ThumbFormat.BITMAP and thumb.data.shape == ifd0.shape


@pytest.mark.parametrize("orientation,flip", [(1, 0), (3, 3), (6, 6), (8, 5)])
def test_dng_orientation_reaches_libraw(tmp_path, orientation, flip):
    rawpy = pytest.importorskip("rawpy")
    write_dng(tmp_path / "o.dng", smooth_linear(24, 30), camera=CAMERAS["nikon-d700"], orientation=orientation)
    with rawpy.imread(str(tmp_path / "o.dng")) as raw:
        assert raw.sizes.flip == flip


def test_dng_too_small_for_libraw_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="rawdiff_infer.io"):
        write_dng(tmp_path / "s.dng", smooth_linear(21, 40), camera=CAMERAS["nikon-d700"])
    assert any("22 pixels" in r.getMessage() for r in caplog.records)
    rawpy = pytest.importorskip("rawpy")
    with pytest.raises(rawpy.LibRawFileUnsupportedError):  # the reason for the warning
        rawpy.imread(str(tmp_path / "s.dng"))


def test_dng_preview_from_caller_srgb(tmp_path):
    srgb = smooth_rgb(64, 96)
    write_dng(tmp_path / "p.dng", smooth_linear(64, 96), camera=CAMERAS["nikon-d700"], preview_srgb=srgb,
              preview_max_side=48)
    with tifffile.TiffFile(tmp_path / "p.dng") as tif:
        prev = tif.pages[0].asarray()
    assert prev.shape == (32, 48, 3)
    ref = srgb.reshape(32, 2, 48, 2, 3).mean(axis=(1, 3))
    assert np.abs(prev.astype(float) - ref).max() <= 1.0
    with pytest.raises(ValueError):
        write_dng(tmp_path / "q.dng", smooth_linear(64, 96), camera=CAMERAS["nikon-d700"],
                  preview_srgb=srgb[:10])
    assert not (tmp_path / "q.dng").exists() and no_temp_files(tmp_path)


def test_dng_clips_out_of_range(tmp_path):
    lin = smooth_linear(6, 8)
    lin[0, 0] = (-0.5, 2.0, 1.5)
    cam = CAMERAS["canon-eos-5d"]
    written = write_dng(tmp_path / "c.dng", lin, camera=cam)
    assert written.min() >= cam.black_level and written.max() <= cam.white_level


# ---------------------------------------------------------------------------------------------- TIFF / npy

def test_tiff_round_trip(tmp_path):
    a = smooth_linear(33, 47)
    a[0, 0] = (0.0, 1.0, 0.5)
    written = write_tiff(tmp_path / "o.tiff", a)
    back = tifffile.imread(tmp_path / "o.tiff")
    assert back.dtype == np.uint16 and back.shape == (33, 47, 3) and np.array_equal(back, written)
    assert np.abs(back / 65535.0 - a).max() <= 1 / 65535
    with tifffile.TiffFile(tmp_path / "o.tiff") as tif:
        assert int(tif.pages[0].photometric) == 2 and tif.pages[0].bitspersample == 16
    d = read_image(tmp_path / "o.tiff")  # and our reader keeps its 16 bits
    assert d.bit_depth == 16 and np.array_equal(d.pixels, back)
    write_tiff(tmp_path / "u.tiff", a, compression="none")
    assert np.array_equal(tifffile.imread(tmp_path / "u.tiff"), back)


def test_npy_round_trip(tmp_path):
    a = smooth_linear(17, 29).astype(np.float64)
    write_npy(tmp_path / "o.npy", a)
    back = np.load(tmp_path / "o.npy", allow_pickle=False)
    assert back.dtype == np.float32 and back.shape == (17, 29, 3)
    assert np.abs(back - a).max() <= 1 / 65535


# ---------------------------------------------------------------------------------------------- atomic writes

BAD_ARRAYS = {
    "nan": lambda: np.where(np.arange(6 * 8 * 3).reshape(6, 8, 3) == 7, np.nan, 0.5).astype(np.float32),
    "inf": lambda: np.full((6, 8, 3), np.inf, np.float32),
    "shape": lambda: np.zeros((6, 8), np.float32),
    "channels": lambda: np.zeros((6, 8, 4), np.float32),
    "dtype": lambda: np.zeros((6, 8, 3), np.uint8),
}
WRITERS = {
    "dng": lambda p, a: write_dng(p, a, camera=CAMERAS["nikon-d700"]),
    "tiff": write_tiff,
    "npy": write_npy,
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("bad", sorted(BAD_ARRAYS))
def test_bad_array_leaves_existing_file_untouched(tmp_path, writer, bad):
    target = tmp_path / f"out.{writer}"
    target.write_bytes(b"previous good output")
    with pytest.raises(ValueError):
        WRITERS[writer](target, BAD_ARRAYS[bad]())
    assert target.read_bytes() == b"previous good output"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_parent_is_a_file(tmp_path, writer):
    (tmp_path / "plain").write_bytes(b"x")
    with pytest.raises(OSError):
        WRITERS[writer](tmp_path / "plain" / "out.bin", smooth_linear(4, 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


def test_atomic_write_failure_midway_removes_temp(tmp_path):
    target = tmp_path / "o.dng"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_write(target) as f:
            f.write(b"new partial data" * 1000)
            temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
            assert len(temps) == 1 and temps[0].name.startswith(".o.dng.")
            raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"old" and no_temp_files(tmp_path)


def test_atomic_write_failure_at_rename_removes_temp(tmp_path):
    target = tmp_path / "late"
    with pytest.raises(OSError):
        with atomic_write(target) as f:
            f.write(b"complete data")
            target.mkdir()  # the rename onto a (now) directory fails at the very end
            (target / "keep").write_bytes(b"k")
    assert target.is_dir() and no_temp_files(tmp_path)


def test_atomic_write_success_and_permissions(tmp_path):
    target = tmp_path / "ok.bin"
    target.write_bytes(b"old")
    old_umask = os.umask(0o022)
    try:
        with atomic_write(target, overwrite=True) as f:
            f.write(b"new")
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new" and no_temp_files(tmp_path)
    if os.name == "posix":
        assert target.stat().st_mode & 0o777 == 0o644
    with pytest.raises(IsADirectoryError):
        with atomic_write(tmp_path) as f:
            f.write(b"x")
    with pytest.raises(IsADirectoryError):
        write_npy(tmp_path, smooth_linear(2, 2))


def test_dng_baseline_exposure(tmp_path: Path) -> None:
    """The camera's rendering gain travels as DNG BaselineExposure, and the preview is rendered with it."""
    import dataclasses

    cam = dataclasses.replace(CAMERAS["nikon-d700"], baseline_exposure=1.0)
    lin = np.full((32, 48, 3), 0.1, np.float32)
    write_dng(tmp_path / "b.dng", lin, camera=cam)
    write_dng(tmp_path / "z.dng", lin, camera=CAMERAS["nikon-d700"])
    with tifffile.TiffFile(tmp_path / "b.dng") as tf:
        num, den = tf.pages[0].tags[50730].value
        assert num / den == pytest.approx(1.0)
    bright = render_srgb_preview(lin, camera=cam)
    plain = render_srgb_preview(lin, camera=CAMERAS["nikon-d700"])
    assert bright.mean() > plain.mean() + 20
    rawpy = pytest.importorskip("rawpy")
    with rawpy.imread(str(tmp_path / "b.dng")) as r:  # still a valid DNG for LibRaw
        assert np.array_equal(r.raw_image_visible, rawpy.imread(str(tmp_path / "z.dng")).raw_image_visible)
