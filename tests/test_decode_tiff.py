"""TIFF sample formats and layouts in ``read_image``: what is decoded (pixels checked against what was written),
what is refused (the message's words checked). Every file is generated here with tifffile and numpy."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile

from rawdiff_infer.io import ImageError, read_image

FLOAT_NOTE = "floating-point samples taken as sRGB-encoded values in [0, 1]"


# ---------------------------------------------------------------------------------------------- helpers

def ramp(h: int, w: int, c: int, *, seed: int = 0) -> np.ndarray:
    """Float64 H x W x C in [0, 1], every value distinct-ish, corners 0 and 1 included."""
    rng = np.random.default_rng(seed)
    a = rng.random((h, w, c))
    a.flat[0], a.flat[-1] = 0.0, 1.0
    return a


def write(tmp_path: Path, data: np.ndarray, name: str = "t.tif", **kw) -> Path:
    path = tmp_path / name
    tifffile.imwrite(path, data, **kw)
    return path


def patch_ifd0(path: Path, code: int, *, value: int | None = None, count: int | None = None) -> None:
    """Overwrite the value (SHORT / LONG, stored inline) or the count of tag ``code`` in IFD0 of a classic TIFF."""
    d = bytearray(path.read_bytes())
    bo = "<" if d[:2] == b"II" else ">"
    off = struct.unpack(bo + "I", d[4:8])[0]
    (n,) = struct.unpack(bo + "H", d[off:off + 2])
    for k in range(n):
        e = off + 2 + 12 * k
        tag, typ = struct.unpack(bo + "HH", d[e:e + 4])
        if tag != code:
            continue
        if count is not None:
            d[e + 4:e + 8] = struct.pack(bo + "I", count)
        if value is not None:
            d[e + 8:e + 12] = struct.pack(bo + "HH", value, 0) if typ == 3 else struct.pack(bo + "I", value)
        path.write_bytes(bytes(d))
        return
    raise KeyError(code)


def refused(path: Path, *phrases: str) -> str:
    """read_image must raise ImageError with a one-line message naming the file and holding ``phrases``."""
    with pytest.raises(ImageError) as ei:
        read_image(path)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"{os.fspath(path)}: "), msg
    for p in phrases:
        assert p in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------- float

@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_rgb_taken_as_unit_range(tmp_path, dtype):
    a = ramp(9, 13, 3).astype(dtype)
    d = read_image(write(tmp_path, a, photometric="rgb"))
    expected = np.rint(a.astype(np.float64) * 65535).astype(np.uint16)
    assert d.bit_depth == 16 and d.pixels.dtype == np.uint16 and d.format == "TIFF"
    assert np.abs(d.pixels.astype(int) - expected).max() <= 1  # float32 arithmetic: at most one code off
    assert d.pixels[0, 0, 0] == 0 and d.pixels[-1, -1, -1] == 65535
    assert any(FLOAT_NOTE in w for w in d.warnings)
    assert not any("clipped" in w for w in d.warnings)


def test_float_grey_compressed_with_predictor(tmp_path):
    g = ramp(10, 12, 1)[..., 0].astype(np.float32)
    d = read_image(write(tmp_path, g, photometric="minisblack", compression="zlib", predictor=True))
    expected = np.rint(g.astype(np.float64) * 65535).astype(np.uint16)
    assert d.pixels.shape == (10, 12, 3) and all(np.array_equal(d.pixels[..., c], expected) for c in range(3))


def test_float_outside_unit_range_clipped_with_note(tmp_path):
    a = np.linspace(-0.5, 1.5, 4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    d = read_image(write(tmp_path, a, photometric="rgb"))
    assert np.array_equal(d.pixels, np.rint(np.clip(a, 0, 1) * 65535).astype(np.uint16))
    outside = int(((a < 0) | (a > 1)).sum())
    assert any(f"{outside} of 60 floating-point samples outside [0, 1]" in w and "clipped" in w for w in d.warnings)


@pytest.mark.parametrize("case", ["all NaN", "one NaN", "+inf", "-inf"])
def test_float_nan_or_inf_refused(tmp_path, case, capfd):
    a = ramp(6, 7, 3).astype(np.float32)
    if case == "all NaN":
        a[:] = np.nan
    elif case == "one NaN":
        a[2, 3, 1] = np.nan
    else:
        a[0, 0, 0] = np.inf if case == "+inf" else -np.inf
    path = write(tmp_path, a, photometric="rgb")
    msg = refused(path, "floating-point image holds", "refused")
    assert ("NaN" in msg) and ("infinite" in msg)
    if case == "all NaN":
        assert "126 NaN" in msg
    assert capfd.readouterr().err == ""  # no numpy "invalid value" warning either


# ---------------------------------------------------------------------------------------------- unsigned

@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_wide_unsigned_rescaled_full_range(tmp_path, dtype):
    top = np.iinfo(dtype).max
    a = np.zeros((3, 4, 3), dtype)
    a[0, 0] = (0, top, top // 2 + 1)
    a[1, 1] = (top // 65535 * 1000, 1, top - 1)  # code 1000 / 65535 of the range
    d = read_image(write(tmp_path, a, photometric="rgb"))
    assert d.bit_depth == 16
    assert tuple(d.pixels[0, 0]) == (0, 65535, 32768)  # full range: not clipped at 65535 raw
    assert tuple(d.pixels[1, 1]) == (1000, 0, 65535)
    bits = np.dtype(dtype).itemsize * 8
    assert any(f"{bits}-bit unsigned integer samples rescaled to 16 bits" in w for w in d.warnings)


def test_12bit_stretched_to_16(tmp_path):
    a = np.array([[[0, 1, 2048], [4095, 100, 3000]]], np.uint16)
    d = read_image(write(tmp_path, a, photometric="rgb", bitspersample=12))
    expected = (a.astype(np.uint32) * 65535 + 2047) // 4095
    assert d.bit_depth == 16 and np.array_equal(d.pixels, expected) and d.warnings == ()


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_low_bit_grey_stretched_to_8(tmp_path, bits):
    g = (np.arange(6 * 16).reshape(6, 16) % (1 << bits)).astype(np.uint8)
    data = g.astype(bool) if bits == 1 else g
    kw = {} if bits == 1 else {"bitspersample": bits}
    d = read_image(write(tmp_path, data, photometric="minisblack", **kw))
    expected = (g.astype(int) * 255 // ((1 << bits) - 1)).astype(np.uint8)
    assert d.bit_depth == 8 and np.array_equal(d.pixels[..., 0], expected)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_min_is_white_inverted(tmp_path, dtype):
    g = (ramp(5, 6, 1)[..., 0] * np.iinfo(dtype).max).astype(dtype)
    d = read_image(write(tmp_path, g, photometric="miniswhite"))
    assert np.array_equal(d.pixels[..., 1], np.iinfo(dtype).max - g)


# ---------------------------------------------------------------------------------------------- refused formats

@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32])
def test_signed_integers_refused(tmp_path, dtype):
    a = (ramp(4, 5, 3) * 100).astype(dtype)
    bits = np.dtype(dtype).itemsize * 8
    refused(write(tmp_path, a, photometric="rgb"), f"{bits}-bit signed integer TIFF samples",
            "no standard meaning for a photo")


def test_complex_refused(tmp_path):
    refused(write(tmp_path, ramp(4, 5, 3).astype(np.complex64), photometric="rgb"),
            "complex floating-point TIFF samples are not supported")


@pytest.mark.parametrize("code,mode", [(4, "transparency mask"), (9, "ICCLab"), (10, "ITULab"),
                                       (32844, "LogL"), (32845, "LogLuv"), (51177, "depth map"),
                                       (12345, "unknown")])
def test_other_photometric_modes_refused_by_name(tmp_path, code, mode):
    path = write(tmp_path, (ramp(4, 5, 1)[..., 0] * 255).astype(np.uint8), photometric="minisblack")
    patch_ifd0(path, 262, value=code)
    refused(path, f"photometric interpretation {mode}", f"({code})", "is not supported")


@pytest.mark.parametrize("mode", ["ycbcr", "cielab"])
def test_16bit_ycbcr_and_cielab_refused(tmp_path, mode):
    a = (ramp(8, 8, 3) * 65535).astype(np.uint16)
    kw = {"subsampling": (1, 1)} if mode == "ycbcr" else {}
    refused(write(tmp_path, a, photometric=mode, **kw), "16-bit", {"ycbcr": "YCbCr", "cielab": "CIELab"}[mode],
            "convert it to RGB")


def test_separated_inks_other_than_cmyk_refused(tmp_path):
    data = (ramp(4, 5, 4) * 255).astype(np.uint8)
    refused(write(tmp_path, data, photometric="separated", extratags=[(332, "H", 1, 2, True)]),
            "InkSet 2", "inks other than CMYK")


def test_too_many_and_too_few_samples_refused(tmp_path):
    path = write(tmp_path, (ramp(4, 5, 3) * 255).astype(np.uint8), photometric="rgb")
    patch_ifd0(path, 277, value=100)
    refused(path, "100 samples per pixel")
    patch_ifd0(path, 277, value=1)
    refused(path, "malformed TIFF", "RGB needs 3 samples per pixel")


def test_zero_width_refused(tmp_path):
    path = write(tmp_path, (ramp(4, 5, 3) * 255).astype(np.uint8), photometric="rgb")
    patch_ifd0(path, 256, value=0)
    refused(path)  # tifffile or Pillow reject it: one line either way


# ---------------------------------------------------------------------------------------------- extra samples

@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_rgb_plus_two_unspecified_samples_keeps_colour(tmp_path, dtype):
    a = ramp(6, 7, 5)
    data = a.astype(np.float32) if dtype == np.float32 else (a * np.iinfo(dtype).max).astype(dtype)
    d = read_image(write(tmp_path, data, photometric="rgb", extrasamples=[0, 0]))
    rgb = data[..., :3]
    expected = np.rint(rgb.astype(np.float64) * 65535).astype(np.uint16) if dtype == np.float32 else rgb
    assert np.abs(d.pixels.astype(int) - expected).max() <= (1 if dtype == np.float32 else 0)
    assert any("2 extra samples per pixel dropped (kept the 3 RGB samples)" in w for w in d.warnings)
    assert not any("alpha" in w for w in d.warnings)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("extra", [1, 2], ids=["associated", "unassociated"])
def test_rgba_alpha_dropped(tmp_path, dtype, extra):
    """Alpha is dropped; associated (premultiplied) colours are divided by alpha first (Pillow does so for 8-bit
    RGBa, the tifffile path for deeper samples), so both kinds give the straight colours."""
    top = np.iinfo(dtype).max
    straight = ramp(6, 7, 3)
    alpha = np.linspace(0.5, 1.0, 42).reshape(6, 7, 1)
    colour = straight * alpha if extra == 1 else straight
    data = np.rint(np.concatenate([colour, alpha], -1) * top).astype(dtype)
    d = read_image(write(tmp_path, data, photometric="rgb", extrasamples=[extra]))
    expected = np.rint(straight * top) if extra == 1 else data[..., :3]
    assert np.abs(d.pixels.astype(float) - expected).max() <= (0 if extra == 2 else 2.5)
    assert any("alpha channel dropped" in w for w in d.warnings)
    assert not any("extra sample" in w for w in d.warnings)


def test_rgb_plus_one_unspecified_sample_via_pillow_noted(tmp_path):
    data = (ramp(6, 7, 4) * 255).astype(np.uint8)
    d = read_image(write(tmp_path, data, photometric="rgb", extrasamples=[0]))
    assert d.bit_depth == 8 and np.array_equal(d.pixels, data[..., :3])
    assert any("1 extra sample per pixel dropped" in w for w in d.warnings)


def test_grey_alpha_and_extra(tmp_path):
    data = (ramp(5, 6, 3) * 65535).astype(np.uint16)
    d = read_image(write(tmp_path, data, photometric="minisblack", extrasamples=[2, 0]))
    assert all(np.array_equal(d.pixels[..., c], data[..., 0]) for c in range(3))
    assert any("alpha channel dropped" in w for w in d.warnings)
    assert any("1 extra sample per pixel dropped (kept the 1 MinIsBlack sample)" in w for w in d.warnings)


# ---------------------------------------------------------------------------------------------- layouts

LAYOUTS = {
    "planar": {"planarconfig": "separate"},
    "tiled": {"tile": (16, 16)},
    "tiled-zlib": {"tile": (16, 16), "compression": "zlib"},
    "big-endian": {"byteorder": ">"},
    "bigtiff": {"bigtiff": True},
    "bigtiff-big-endian-planar": {"bigtiff": True, "byteorder": ">", "planarconfig": "separate"},
}


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layouts_decode_exactly(tmp_path, layout, dtype):
    a = (ramp(37, 45, 3, seed=3) * np.iinfo(dtype).max).astype(dtype)
    data = np.moveaxis(a, -1, 0) if LAYOUTS[layout].get("planarconfig") == "separate" else a
    d = read_image(write(tmp_path, data, photometric="rgb", **LAYOUTS[layout]))
    assert d.bit_depth == np.dtype(dtype).itemsize * 8 and np.array_equal(d.pixels, a)
    assert d.warnings == ()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_multipage_first_page_with_note(tmp_path, dtype):
    pages = [ramp(6, 8, 3, seed=s) for s in range(3)]
    if dtype != np.float32:
        pages = [(p * np.iinfo(dtype).max).astype(dtype) for p in pages]
    else:
        pages = [p.astype(np.float32) for p in pages]
    with tifffile.TiffWriter(tmp_path / "m.tif") as w:
        for p in pages:
            w.write(p, photometric="rgb")
    d = read_image(tmp_path / "m.tif")
    first = pages[0] if dtype != np.float32 else np.rint(pages[0].astype(np.float64) * 65535).astype(np.uint16)
    assert np.abs(d.pixels.astype(int) - first).max() <= (1 if dtype == np.float32 else 0)
    assert any("3 frames/pages: using the first" in w for w in d.warnings)


def test_volumetric_first_slice_with_note(tmp_path):
    vol = (ramp(12, 10, 3) * 65535).astype(np.uint16).reshape(3, 4, 10, 3)
    d = read_image(write(tmp_path, vol, photometric="rgb", volumetric=True))
    assert np.array_equal(d.pixels, vol[0])
    assert any("volumetric TIFF (ImageDepth 3): using the first slice" in w for w in d.warnings)


def test_palette_16bit_looked_up(tmp_path):
    idx = (np.arange(20, dtype=np.uint16) * 3000).reshape(4, 5)
    cmap = np.stack([np.arange(65536), 65535 - np.arange(65536), np.full(65536, 1234)]).astype(np.uint16)
    d = read_image(write(tmp_path, idx, photometric="palette", colormap=cmap))
    assert d.bit_depth == 16 and np.array_equal(d.pixels, np.moveaxis(cmap[:, idx], 0, -1))


def test_palette_index_beyond_colour_map_refused(tmp_path):
    idx = (np.arange(20, dtype=np.uint16) * 1000).reshape(4, 5)
    path = write(tmp_path, idx, photometric="palette", colormap=np.zeros((3, 65536), np.uint16))
    patch_ifd0(path, 320, count=3 * 256)  # the colour map now has 256 entries
    refused(path, "palette index 19000 beyond the 256-entry colour map")


def test_cmyk_16bit_naive(tmp_path):
    cmyk = (ramp(5, 6, 4) * 65535).astype(np.uint16)
    d = read_image(write(tmp_path, cmyk, photometric="separated"))
    c, k = cmyk[..., :3].astype(np.int64), cmyk[..., 3:].astype(np.int64)
    expected = ((65535 - c) * (65535 - k) + 32767) // 65535
    assert d.bit_depth == 16 and np.array_equal(d.pixels, expected)
    assert any("CMYK converted to RGB without a colour profile" in w for w in d.warnings)


def test_16bit_rgb_orientation_and_icc_tags_of_the_wrong_type_ignored(tmp_path):
    a = (ramp(4, 6, 3) * 65535).astype(np.uint16)
    path = write(tmp_path, a, photometric="rgb", extratags=[(274, "s", 0, "sideways", True)])
    d = read_image(path)
    assert np.array_equal(d.pixels, a) and d.exif_orientation == 1
    assert any("orientation" in w for w in d.warnings)


# ---------------------------------------------------------------------------------------------- codecs

@pytest.mark.parametrize("compression", ["webp", "jpegxl", "zstd", "lzma", "png"])
def test_tiff_compressed_with_codecs_pillow_may_lack(tmp_path, compression):
    """A WebP-compressed TIFF (Pillow's libtiff has no WebP codec: 'decoder error -2') is a good input: tifffile
    decodes it with imagecodecs. Lossless settings, so the pixels come back exactly."""
    pytest.importorskip("imagecodecs")
    a = (ramp(24, 40, 3, seed=3) * 255).round().astype(np.uint8)
    kw = {"compressionargs": {"lossless": True}} if compression in ("webp", "jpegxl") else {}
    p = write(tmp_path, a, photometric="rgb", compression=compression, **kw)
    d = read_image(p)
    assert d.bit_depth == 8 and d.format == "TIFF" and np.array_equal(d.pixels, a), d.warnings


def test_tiff_codec_missing_everywhere_is_named_not_called_corrupt(tmp_path):
    """A compression neither tifffile (imagecodecs) nor Pillow's libtiff can decode: the message names the codec
    (JBIG, 34661) and what to do, instead of 'corrupt TIFF data'."""
    from rawdiff_infer.io import decode

    code = 34661  # JBIG: in the TIFF registry; no codec in imagecodecs, none in Pillow's libtiff without jbigkit
    if code in tifffile.TIFF.DECOMPRESSORS or decode._LIBTIFF.decodes(code):
        pytest.skip("this installation can decode JBIG")
    p = write(tmp_path, (ramp(8, 8, 3) * 255).astype(np.uint8), photometric="rgb")
    patch_ifd0(p, 259, value=code)
    msg = refused(p, "JBIG (34661)", "cannot be decoded here")
    assert "corrupt" not in msg
