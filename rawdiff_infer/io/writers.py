"""RAW output: DNG / 16-bit TIFF / ``.npy`` writers (see the package docstring).

Every writer goes through ``fsio.atomic_write``: never a partial file, and an existing file (one that appeared
while the data were computed included) is replaced only with ``overwrite=True``; otherwise
``fsio.OutputExistsError`` is raised and the existing file is untouched."""

from __future__ import annotations

import logging
import os
from typing import Literal

import numpy as np
import tifffile
from PIL import Image

from ..bayer import mosaic, pattern_indices
from ..camera import SRGB_TO_XYZ, Camera
from ..fsio import atomic_write

__all__ = ["write_dng", "write_tiff", "write_npy", "render_srgb_preview"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

_PHOTOMETRIC_CFA = 32803

#: LibRaw (like dcraw) refuses RAW images narrower or lower than this (checked with rawpy 0.28).
_LIBRAW_MIN_SIDE = 22


def _check_rgb_float(a: np.ndarray, what: str, *, min_size: int = 1) -> np.ndarray:
    """Validate an H x W x 3 finite float array; return it as float32 (C-contiguous)."""
    a = np.asarray(a)
    if a.ndim != 3 or a.shape[2] != 3 or a.shape[0] < min_size or a.shape[1] < min_size:
        raise ValueError(f"{what} must be H x W x 3 with H, W >= {min_size}; got shape {a.shape}")
    if a.dtype.kind != "f":
        raise ValueError(f"{what} must be a floating-point array in [0, 1]; got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return a


def _ascii(text: str) -> str:
    """TIFF ASCII tags must be 7-bit: escape anything else."""
    return text.encode("ascii", "backslashreplace").decode("ascii")


def _rationals(values: tuple[float, ...] | list[float], denominator: int = 1_000_000) -> tuple[int, ...]:
    """Floats -> flat (numerator, denominator, ...) for TIFF (S)RATIONAL tags."""
    return tuple(v for x in values for v in (int(round(float(x) * denominator)), denominator))


def _camera_to_srgb(camera: Camera) -> np.ndarray:
    """3 x 3 matrix from white-balanced camera RGB to linear sRGB, as LibRaw computes it for our DNGs.

    The DNG has AsShotNeutral = (1, 1, 1): camera (1, 1, 1) is white. With cam_xyz = ColorMatrix1 (XYZ D65 ->
    camera), LibRaw forms cam_rgb = cam_xyz @ srgb_to_xyz, normalises its rows to sum 1, and inverts it, so
    white-balanced (1, 1, 1) maps to sRGB (1, 1, 1).
    """
    cam_xyz = np.array(camera.color_matrix, dtype=np.float64).reshape(3, 3)
    cam_rgb = cam_xyz @ np.asarray(SRGB_TO_XYZ)
    cam_rgb = cam_rgb / cam_rgb.sum(axis=1, keepdims=True)
    return np.linalg.inv(cam_rgb)


def _srgb_encode(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1.0 / 2.4) - 0.055)


def render_srgb_preview(linear: np.ndarray, *, camera: Camera, max_side: int = 256) -> np.ndarray:
    """A small sRGB rendering of white-balanced linear camera RGB: uint8 h x w x 3, long side <= ``max_side``.

    Box-downsampled by an integer factor, brightened by the camera's ``baseline_exposure`` (as a DNG reader
    that honours BaselineExposure does), converted with the camera matrix as LibRaw does for the DNG we write
    (see ``_camera_to_srgb``), sRGB-encoded.
    """
    lin = _check_rgb_float(linear, "linear")
    factor = max(1, -(-max(lin.shape[:2]) // max_side))
    h, w = lin.shape[0] // factor, lin.shape[1] // factor
    if factor > 1 and h > 0 and w > 0:
        lin = lin[: h * factor, : w * factor].reshape(h, factor, w, factor, 3).mean(axis=(1, 3))
    rgb = (lin.astype(np.float64) * 2.0 ** camera.baseline_exposure) @ _camera_to_srgb(camera).T
    return np.ascontiguousarray(np.rint(_srgb_encode(rgb) * 255.0).astype(np.uint8))


def _preview_from_srgb(srgb: np.ndarray, shape: tuple[int, int], max_side: int) -> np.ndarray:
    """Caller's sRGB image (uint8, uint16 or float [0, 1]; same layout as the RAW) -> uint8 thumbnail."""
    a = np.asarray(srgb)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"preview_srgb must be H x W x 3; got shape {a.shape}")
    if a.shape[:2] != shape:
        raise ValueError(f"preview_srgb is {a.shape[1]}x{a.shape[0]} but the RAW is {shape[1]}x{shape[0]}")
    if a.dtype == np.uint8:
        a8 = a
    elif a.dtype == np.uint16:
        a8 = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ValueError("preview_srgb contains NaN or infinite values")
        a8 = np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise ValueError(f"preview_srgb must be uint8, uint16 or float; got dtype {a.dtype}")
    img = Image.fromarray(np.ascontiguousarray(a8))
    img.thumbnail((max_side, max_side), Image.Resampling.BOX)
    return np.ascontiguousarray(np.asarray(img.convert("RGB")))


def write_dng(path: PathLike, linear: np.ndarray, *, camera: Camera, orientation: int = 1,
              preview_srgb: np.ndarray | None = None, software: str = "rawdiff",
              description: str | None = None, preview_max_side: int = 256, overwrite: bool = False) -> np.ndarray:
    """Write linear camera RGB as a Bayer DNG (DNG 1.4, uncompressed 16-bit CFA) that raw converters read.

    Layout (Adobe DNG Converter's, the one DNG recommends): IFD0 is an 8-bit sRGB preview
    (NewSubFileType = 1, long side <= ``preview_max_side``) carrying the DNG-wide tags (DNGVersion, Make,
    Model, UniqueCameraModel, ColorMatrix1, CalibrationIlluminant1, AsShotNeutral, Orientation, Software,
    ImageDescription); its SubIFD is the raw mosaic (NewSubFileType = 0, PhotometricInterpretation = CFA)
    with CFARepeatPatternDim, CFAPattern, CFAPlaneColor, CFALayout, BlackLevelRepeatDim, BlackLevel,
    WhiteLevel.

    Args:
        path: output file (conventionally ``.dng``), written atomically.
        linear: H x W x 3 float, white-balanced camera RGB in [0, 1] (values outside are clipped; NaN / inf
            raise ValueError). H, W >= 2; LibRaw opens only H, W >= 22 (a warning is logged below that).
        camera: colour matrix, black / white levels and CFA pattern of the camera the RAW imitates.
        orientation: EXIF/TIFF orientation (1..8) of the stored pixels (1 = stored upright).
        preview_srgb: optional sRGB image with the same H x W as ``linear`` (uint8, uint16 or float [0, 1]),
            e.g. the input photo, for the embedded preview; by default one is rendered from ``linear``.
        software, description: Software and ImageDescription tags (non-ASCII characters are escaped).
        preview_max_side: long side of the preview in pixels (>= 1).
        overwrite: replace an existing ``path``; otherwise ``OutputExistsError`` if it exists when the file is
            complete.

    Returns:
        The uint16 H x W mosaic written: ``round(black + clip(linear, 0, 1) * (white - black))`` sampled
        with ``camera.cfa_pattern`` (see ``mosaic``).
    """
    lin = _check_rgb_float(linear, "linear", min_size=2)
    if not 1 <= int(orientation) <= 8:
        raise ValueError(f"orientation must be 1..8, got {orientation}")
    if preview_max_side < 1:
        raise ValueError(f"preview_max_side must be >= 1, got {preview_max_side}")
    if min(lin.shape[:2]) < _LIBRAW_MIN_SIDE:
        logger.warning("%s: a %dx%d RAW is below %d pixels on a side: LibRaw-based converters (rawpy, dcraw, "
                       "darktable's fallback) refuse to open it", os.fspath(path), lin.shape[1], lin.shape[0],
                       _LIBRAW_MIN_SIDE)
    black, white = int(camera.black_level), int(camera.white_level)
    cfa = pattern_indices(camera.cfa_pattern)
    raw = np.rint(black + np.clip(mosaic(lin, camera.cfa_pattern), 0.0, 1.0).astype(np.float64)
                  * (white - black)).astype(np.uint16)
    if preview_srgb is not None:
        preview = _preview_from_srgb(preview_srgb, lin.shape[:2], preview_max_side)
    else:
        preview = render_srgb_preview(lin, camera=camera, max_side=preview_max_side)
    if description is None:
        description = f"RAW reconstructed from an sRGB image by {software}"

    ifd0_tags, raw_tags = _dng_tags(camera, int(orientation), cfa)
    with atomic_write(path, overwrite=overwrite) as f, tifffile.TiffWriter(f) as tw:
        tw.write(preview, photometric="rgb", subfiletype=1, subifds=1, software=_ascii(software),
                 description=_ascii(description), metadata=None, extratags=ifd0_tags)
        tw.write(raw, photometric=_PHOTOMETRIC_CFA, subfiletype=0, software=False, metadata=None,
                 extratags=raw_tags)
    logger.info("wrote %s: %dx%d %s DNG (%s, black %d, white %d)", os.fspath(path), raw.shape[1],
                raw.shape[0], camera.cfa_pattern, camera.unique_model, black, white)
    return raw


def _dng_tags(camera: Camera, orientation: int, cfa: np.ndarray) -> tuple[list, list]:
    """(IFD0 tags: the DNG-wide ones; raw SubIFD tags: the CFA layout and levels), as tifffile extratags."""
    black, white = int(camera.black_level), int(camera.white_level)
    dt = tifffile.DATATYPE
    ifd0_tags = [
        (50706, dt.BYTE, 4, (1, 4, 0, 0), True),            # DNGVersion
        (50707, dt.BYTE, 4, (1, 1, 0, 0), True),            # DNGBackwardVersion
        (271, dt.ASCII, 0, _ascii(camera.make), True),      # Make
        (272, dt.ASCII, 0, _ascii(camera.model), True),     # Model
        (274, dt.SHORT, 1, (int(orientation),), True),      # Orientation
        (50708, dt.ASCII, 0, _ascii(camera.unique_model), True),  # UniqueCameraModel
        (50721, dt.SRATIONAL, 9, _rationals(camera.color_matrix), True),  # ColorMatrix1 (XYZ -> camera)
        (50778, dt.SHORT, 1, (int(camera.illuminant),), True),   # CalibrationIlluminant1
        (50728, dt.RATIONAL, 3, (1, 1, 1, 1, 1, 1), True),  # AsShotNeutral: already white-balanced
        (50730, dt.SRATIONAL, 1, _rationals((camera.baseline_exposure,)), True),  # BaselineExposure (EV)
        (50970, dt.LONG, 1, (2,), True),                    # PreviewColorSpace = sRGB
    ]
    raw_tags = [
        (33421, dt.SHORT, 2, (2, 2), True),                 # CFARepeatPatternDim
        (33422, dt.BYTE, 4, tuple(int(c) for c in cfa.ravel()), True),  # CFAPattern
        (50710, dt.BYTE, 3, (0, 1, 2), True),               # CFAPlaneColor: R, G, B
        (50711, dt.SHORT, 1, (1,), True),                   # CFALayout: rectangular
        (50713, dt.SHORT, 2, (1, 1), True),                 # BlackLevelRepeatDim
        (50714, dt.LONG, 1, (black,), True),                # BlackLevel
        (50717, dt.LONG, 1, (white,), True),                # WhiteLevel
    ]
    return ifd0_tags, raw_tags


def write_tiff(path: PathLike, image: np.ndarray, *, software: str = "rawdiff", description: str | None = None,
               compression: Literal["deflate", "none"] = "deflate", overwrite: bool = False) -> np.ndarray:
    """Write an H x W x 3 float image in [0, 1] (linear or encoded RAW, or sRGB) as a 16-bit RGB TIFF.

    Stored values: ``uint16 = round(clip(v, 0, 1) * 65535)``, chunky RGB, Adobe Deflate (zlib) compressed
    by default (``compression="none"`` for uncompressed). No colour profile is attached. Written atomically;
    an existing file is replaced only with ``overwrite=True``.

    Returns:
        The uint16 H x W x 3 array written.

    Raises:
        ValueError: wrong shape / dtype, NaN or inf.
    """
    a = _check_rgb_float(image, "image")
    if compression not in ("deflate", "none"):
        raise ValueError(f"compression must be 'deflate' or 'none', got {compression!r}")
    data = np.rint(np.clip(a, 0.0, 1.0) * 65535.0).astype(np.uint16)
    with atomic_write(path, overwrite=overwrite) as f:
        tifffile.imwrite(f, data, photometric="rgb", metadata=None, software=_ascii(software),
                         description=_ascii(description) if description is not None else None,
                         compression="zlib" if compression == "deflate" else None)
    logger.info("wrote %s: %dx%d 16-bit RGB TIFF", os.fspath(path), data.shape[1], data.shape[0])
    return data


def write_npy(path: PathLike, array: np.ndarray, *, overwrite: bool = False) -> np.ndarray:
    """Save an H x W x 3 float array as float32 ``.npy`` (values as they are, not clipped), atomically (an
    existing file is replaced only with ``overwrite=True``).

    Returns:
        The float32 C-contiguous array written.

    Raises:
        ValueError: wrong shape / dtype, NaN or inf.
    """
    a = _check_rgb_float(array, "array")
    with atomic_write(path, overwrite=overwrite) as f:
        np.save(f, a, allow_pickle=False)
    logger.info("wrote %s: %dx%d float32 array", os.fspath(path), a.shape[1], a.shape[0])
    return a

