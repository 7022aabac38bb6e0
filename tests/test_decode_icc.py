"""ICC profiles are judged by what they do, not by their name: a linear profile named "... sRGB" is converted, an
sRGB profile under another name is left alone (its pixels exact)."""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from rawdiff_infer.io import read_image

#: sRGB's colorants adapted to D50 (Bradford), as ICC profiles store them (columns: red, green, blue XYZ)
SRGB_D50 = np.array([[0.43607, 0.38515, 0.14307],
                     [0.22249, 0.71687, 0.06061],
                     [0.01392, 0.09708, 0.71410]])


D50_WHITE = (0.9642, 1.0, 0.8249)


def _srgb_curve(n: int = 1024) -> bytes:
    x = np.linspace(0.0, 1.0, n)
    y = np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    return b"curv\0\0\0\0" + struct.pack(">I", n) + b"".join(struct.pack(">H", int(round(v * 65535))) for v in y)


def _gamma_curve(gamma: float) -> bytes:
    return b"curv\0\0\0\0" + struct.pack(">IH", 1, int(round(gamma * 256))) + b"\0\0"


def icc_profile(name: str, curve: bytes, colorants: np.ndarray = SRGB_D50) -> bytes:
    """A v2 matrix/TRC RGB profile built by hand (Pillow creates only its built-in ones)."""
    def s15(v: float) -> bytes:
        return struct.pack(">i", int(round(v * 65536)))

    def xyz(v) -> bytes:
        return b"XYZ \0\0\0\0" + b"".join(s15(c) for c in v)

    text = name.encode()
    desc = (b"desc\0\0\0\0" + struct.pack(">I", len(text) + 1) + text + b"\0" + struct.pack(">II", 0, 0)
            + struct.pack(">HB", 0, 0) + b"\0" * 67)
    tags = {b"desc": desc, b"wtpt": xyz(D50_WHITE), b"rXYZ": xyz(colorants[:, 0]), b"gXYZ": xyz(colorants[:, 1]),
            b"bXYZ": xyz(colorants[:, 2]), b"rTRC": curve, b"gTRC": curve, b"bTRC": curve,
            b"cprt": b"text\0\0\0\0test data\0"}
    blobs = [data + bytes(-len(data) % 4) for data in tags.values()]  # each tag 4-byte aligned
    starts = list(itertools.accumulate([len(b) for b in blobs], initial=128 + 4 + 12 * len(tags)))
    directory = b"".join(sig + struct.pack(">II", at, len(b)) for sig, at, b in zip(tags, starts, blobs))
    header = bytearray(128)  # ICC.1 7.2: size, version 2.1, display class, RGB data, XYZ connection, D50
    struct.pack_into(">I", header, 0, starts[-1])
    struct.pack_into(">I", header, 8, 0x02100000)
    header[12:24], header[36:40], header[68:80] = b"mntrRGB XYZ ", b"acsp", xyz(D50_WHITE)[8:]
    return bytes(header) + struct.pack(">I", len(tags)) + directory + b"".join(blobs)


def _photo() -> np.ndarray:
    y, x = np.mgrid[0:16, 0:32]
    return np.stack([x * 8, y * 16, (x + y) * 5], -1).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
def test_linear_profile_named_srgb_is_converted(tmp_path: Path, fmt: str) -> None:
    icc = icc_profile("Linear sRGB (scene-referred)", _gamma_curve(1.0))
    assert "sRGB" in ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(__import__("io").BytesIO(icc)))
    a = _photo()
    path = tmp_path / f"linear.{fmt.lower()}"
    Image.fromarray(a).save(path, fmt, icc_profile=icc, **({"lossless": True} if fmt == "WEBP" else {}))
    d = read_image(path)
    assert d.icc_converted
    # linear values shown as sRGB: mid grey 0.5 linear is 188 in sRGB; the dark end lifts the most
    lin = a.astype(np.float64) / 255
    expected = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055) * 255
    assert np.abs(d.pixels.astype(np.float64) - expected).max() <= 2.5


def test_linear_profile_named_srgb_in_a_jpeg_is_converted(tmp_path: Path) -> None:
    a = np.full((16, 16, 3), 128, np.uint8)
    Image.fromarray(a).save(tmp_path / "l.jpg", quality=95, icc_profile=icc_profile("sRGB linear", _gamma_curve(1.0)))
    d = read_image(tmp_path / "l.jpg")
    assert d.icc_converted and abs(int(d.pixels.mean()) - 188) <= 2  # 0.502 linear is 188 in sRGB


@pytest.mark.parametrize("name", ["Camera RGB", "sRGB IEC61966-2.1"])
def test_srgb_profile_by_content_is_left_alone(tmp_path: Path, name: str) -> None:
    """sRGB's colorants and curve (as a 1024-entry table) under any name: the pixels stay exactly as stored."""
    a = _photo()
    Image.fromarray(a).save(tmp_path / "s.png", icc_profile=icc_profile(name, _srgb_curve()))
    d = read_image(tmp_path / "s.png")
    assert not d.icc_converted and np.array_equal(d.pixels, a) and d.warnings == ()


def test_16bit_srgb_profile_keeps_16_bits(tmp_path: Path) -> None:
    """An sRGB profile (by content) on a 16-bit TIFF is no reason to convert at 8 bits."""
    import tifffile

    a = (_photo().astype(np.uint16) * 257) + 3
    tifffile.imwrite(tmp_path / "s16.tif", a, photometric="rgb", iccprofile=icc_profile("Camera RGB", _srgb_curve()))
    d = read_image(tmp_path / "s16.tif")
    assert d.bit_depth == 16 and not d.icc_converted and np.array_equal(d.pixels, a)
