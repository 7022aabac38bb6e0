"""Real-camera (sRGB, RAW) pairs from RAW files with the InvISP protocol that the paper follows (FiveK subsets).

sRGB target (as InvISP's ``data/data_preprocess.py``): ``rawpy.postprocess(use_camera_wb=True,
no_auto_bright=True)`` at 8 bits per sample (LibRaw defaults otherwise: AHD demosaic, sRGB primaries, the
BT.709-shaped gamma (2.222, 4.5) -- not the sRGB OETF --, highlight clipping; one exception, see
``adjust_maximum_thr`` below), then a JPEG round trip with Pillow at quality 90 and ``subsampling=1`` (4:2:2),
decoded again with Pillow (InvISP saves the JPEG and reads it back through PIL).

RAW target (the project's RAW convention, DESIGN.md): ``raw_image_visible`` ->
black level subtracted per CFA colour (``black_level_per_channel`` indexed by ``raw_colors_visible``) ->
divided by ``white_level - black`` -> clipped to [0, 1] -> bilinear demosaic following the file's own CFA layout
(colour index 3, the second green, counts as green) -> white balance with the multipliers of the sRGB render,
normalised so that green = 1 -> clipped to [0, 1] -> LibRaw orientation (``sizes.flip``).
``raw_linear`` stays LINEAR; the gamma 1/2.2 the model learns is applied later by ``rawspace.RawEncoding``.

The render as an ISP (:func:`libraw_isp`, ``rawdiff_infer.isp.IspModel``, stored with every pair as ``RawPair.isp``):
LibRaw scales the black-subtracted RAW by the multipliers over the smallest one (green, ordinarily: then the RAW
target itself, gain 1) and clips, demosaics (AHD), multiplies by its ``rgb_cam`` (camera RGB -> linear sRGB; rawpy
does not expose it: measured from two linear renders and matched to the file's ``color_matrix`` for DNGs, or to
``rgb_xyz_matrix`` through dcraw's ``cam_xyz_coeff``), clips to 16 bits and looks the value up in its gamma
table (``gamma_curve(1/2.222, 4.5, mode 2, 65536)``: ``no_auto_bright`` fixes the white at the 16-bit maximum,
``bright = 1``); the 8-bit output is that table's value shifted right by 8, ``floor(256 f)``. All of this but the
demosaicing is expressed by the IspModel (a curve table that includes the floor): rendering LibRaw's own linear
RAW, or the RAW target against LibRaw's bilinear render, it is within 0.08 levels RMS (70 dB). Against the
protocol's sRGB the residual is the demosaicing (AHD vs the target's bilinear: 42.0 dB on the Canon 550D file)
and the JPEG round trip (38.3 dB together).

Where this deliberately differs from InvISP's script (which has bugs):
  * InvISP subtracts a hard-coded 127 only for a camera name that never matches (``'Canon EOD 5D'`` vs the
    folder ``Canon_EOS_5D``), so no black level is ever subtracted; here the file's own per-channel black is used.
  * InvISP demosaics with a fixed ``RGGB`` argument; here the file's real pattern is used.
  * LibRaw's ``adjust_maximum_thr`` heuristic (default 0.75, so active in InvISP's render) replaces the white
    level by the image's own brightest raw value whenever that exceeds 0.75 x white: every image then gets its
    own gain (up to 1.33x) between RAW and sRGB, so the ISP differs from image to image. It is turned off here
    (``adjust_maximum_thr=0``): sRGB and RAW are both scaled by the file's white level. On the Canon 550D DNG,
    whose brightest pixel (12128) is one isolated value, not saturation, the heuristic would brighten the
    render 1.29x.
  * InvISP scales the multipliers by their maximum (``wb / wb.max()``) and divides by 4095 / 16383; here green = 1
    and the file's white level, which is what LibRaw itself does when it renders the sRGB target (it scales by
    the smallest multiplier, green for ordinary daylight/camera multipliers, and clips at the white level), so
    RAW and sRGB clip the same highlights.

Canon EOS 550D DNG in ``shared/data/raw`` (Magic Lantern): AsShotNeutral = (1, 2.477, 1.462) is merely not
normalised (it is (0.404, 1, 0.590) divided by green); LibRaw's ``camera_whitebalance`` (1, 0.404, 0.684) =
1 / AsShotNeutral gives green-normalised multipliers (2.48, 1, 1.69), close to the daylight ones (2.65, 1, 1.39).
It is not inverted: inverted multipliers would be (0.40, 1, 0.59). The scene is lit by warm light, so both
renders are warm (measured on the ColorChecker's white patch, linear sRGB R/G = 2.34 and B/G = 0.62 with
``wb="camera"``; 2.44 and 0.39 with ``wb="daylight"``). Use ``wb="camera"`` (the protocol) for it;
``wb="daylight"`` exists for files whose as-shot white balance is missing or wrong.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from rawdiff_infer.camera import CFA_PATTERNS, Camera

from rawdiff_infer.bayer import demosaic_bilinear
from rawdiff_infer.camera import SRGB_TO_XYZ
from rawdiff_infer.isp import IspCurve, IspModel

__all__ = [
    "RawFileError",
    "RawPair",
    "PROTOCOL_VERSION",
    "load_raw_pair",
    "demosaic_bilinear",
    "orient",
    "split_files",
    "read_list_file",
    "select_by_stem",
    "RAW_EXTENSIONS",
    "libraw_isp",
    "libraw_curve_table",
    "LIBRAW_GAMMA",
    "LIBRAW_LUT_SIZE",
]

log = logging.getLogger(__name__)

#: Bumped whenever the pair computation changes (part of the cache key in ``data.PairCache``).
PROTOCOL_VERSION = 1

#: File extensions treated as RAW when listing folders.
RAW_EXTENSIONS = (".dng", ".nef", ".cr2", ".cr3", ".arw", ".raf", ".orf", ".rw2", ".pef", ".srw", ".nrw",
                  ".crw", ".3fr", ".iiq", ".erf", ".kdc", ".mef", ".mos", ".raw", ".rwl", ".srf", ".x3f")

_LIST_EXTENSIONS = RAW_EXTENSIONS + (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".npz", ".npy", ".gpr")

#: the output curve of the protocol's render: rawpy's default ``gamma=(2.222, 4.5)`` (power, toe slope), which
#: rawpy passes to LibRaw as ``gamm = (1 / 2.222, 4.5)``: the BT.709-shaped curve
LIBRAW_GAMMA: tuple[float, float] = (2.222, 4.5)
#: entries of the curve table of :func:`libraw_isp` (interpolating it costs < 0.01 output levels)
LIBRAW_LUT_SIZE = 4096
#: dcraw's ``xyz_rgb`` (linear sRGB D65 -> XYZ), the numbers LibRaw's ``cam_xyz_coeff`` builds ``rgb_cam`` with
_DCRAW_XYZ_RGB = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
#: a measured render matrix within this (max abs) of a candidate LibRaw could have used is that candidate
_MATRIX_SNAP = 1e-3


class RawFileError(Exception):
    """A file that cannot give a pair under this protocol; ``str(err)`` is one line naming the file."""


@dataclass(frozen=True, eq=False)
class RawPair:
    """One aligned (sRGB, RAW) pair in display orientation, plus what was used to make it.

    Attributes:
        srgb: H x W x 3 uint8, the rendered and JPEG round-tripped sRGB target.
        raw_linear: H x W x 3 float32 in [0, 1], linear, black-subtracted, white-balanced camera RGB.
        path: the RAW file.
        make, model: EXIF Make / Model ('' where they cannot be read: rawpy 0.28 does not expose them; they are
            read from the TIFF structure, which DNG, NEF, CR2, ARW, PEF, ... have).
        cfa_pattern: colours of the top-left 2x2 cell of the visible area in sensor orientation, e.g. 'RGGB'.
        black_levels: per CFA colour index 0..3 (R, G, B, G2), DN.
        white_level: DN.
        wb: 'camera' or 'daylight': which multipliers were used.
        wb_multipliers: (R, G, B) multipliers applied to the RAW (green = 1) and used by the sRGB render.
        flip: LibRaw ``sizes.flip`` (0 none, 3 180 degrees, 5 90 degrees counter-clockwise, 6 90 clockwise).
        cam_to_srgb: 3x3 (row-major) camera RGB -> linear sRGB matrix LibRaw used for the render (rows sum to 1).
        xyz_to_cam: 3x3 XYZ -> camera matrix as rawpy reports it (``rgb_xyz_matrix``; None when all zero).
        jpeg_quality: quality of the JPEG round trip of ``srgb`` (None: none).
        isp: the render as an ``IspModel`` acting on ``raw_linear`` (:func:`libraw_isp`, before the JPEG round
            trip); None where it was not determined.
    """

    srgb: np.ndarray
    raw_linear: np.ndarray
    path: str
    make: str
    model: str
    cfa_pattern: str
    black_levels: tuple[int, int, int, int]
    white_level: int
    wb: str
    wb_multipliers: tuple[float, float, float]
    flip: int
    cam_to_srgb: tuple[float, ...]
    xyz_to_cam: tuple[float, ...] | None
    jpeg_quality: int | None
    isp: IspModel | None = None

    def camera(self) -> Camera:
        """This file's camera as a :class:`rawdiff_infer.camera.Camera` (for checkpoints and the DNG writer).

        ``color_matrix`` (XYZ(D65) -> camera RGB): rawpy's ``rgb_xyz_matrix`` (dcraw/Adobe table) when the file
        has one; otherwise (DNGs, where LibRaw reports zeros) it is derived from the render matrix,
        ``inv(cam_to_srgb) @ XYZ2SRGB``. Levels: the lowest per-channel black and the white level.
        """
        if self.xyz_to_cam is not None:
            m = np.reshape(self.xyz_to_cam, (3, 3))
        elif len(self.cam_to_srgb) == 9:
            m = np.linalg.inv(np.reshape(self.cam_to_srgb, (3, 3))) @ np.linalg.inv(np.asarray(SRGB_TO_XYZ))
        else:
            raise RawFileError(f"{self.path}: no colour matrix to describe the camera")
        return Camera(make=self.make or "unknown", model=self.model or "unknown",
                      color_matrix=tuple(float(v) for v in m.ravel()), black_level=int(min(self.black_levels)),
                      white_level=int(self.white_level), cfa_pattern=self.cfa_pattern)

    def metadata(self) -> dict[str, Any]:
        """Everything but the images, JSON-serialisable; ``camera_description`` is ``camera().to_dict()``, ``isp``
        is ``isp.to_dict()`` (or None)."""
        meta = {k: getattr(self, k) for k in ("path", "make", "model", "cfa_pattern", "black_levels", "white_level",
                                              "wb", "wb_multipliers", "flip", "cam_to_srgb", "xyz_to_cam",
                                              "jpeg_quality")}
        meta["camera_description"] = self.camera().to_dict()
        meta["isp"] = self.isp.to_dict() if self.isp is not None else None
        return meta


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------

def orient(image: np.ndarray, flip: int) -> np.ndarray:
    """Apply LibRaw's ``sizes.flip`` to an H x W [x C] image, as LibRaw does for its output.

    dcraw's ``flip_index``: bit 2 transposes, bit 1 flips rows, bit 0 flips columns (the flips act on the
    sensor image, the transpose last). 3 = 180 degrees, 5 = 90 degrees counter-clockwise, 6 = 90 clockwise.
    """
    flip = int(flip)
    if flip < 0 or flip > 7:
        raise ValueError(f"flip must be in 0..7, got {flip}")
    if flip & 2:
        image = image[::-1]
    if flip & 1:
        image = image[:, ::-1]
    if flip & 4:
        image = np.swapaxes(image, 0, 1)
    return np.ascontiguousarray(image)


def _read_make_model(path: Path) -> tuple[str, str]:
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            make = tags.get("Make")
            model = tags.get("Model")
            return (str(make.value).strip("\0 ") if make else "", str(model.value).strip("\0 ") if model else "")
    except Exception:  # not TIFF-structured (CR3, RAF, ...): metadata only, not worth failing for
        return "", ""


def _matrix3(m: np.ndarray) -> tuple[float, ...] | None:
    a = np.asarray(m, dtype=np.float64)[:3, :3]
    if not np.any(a):
        return None
    return tuple(float(v) for v in a.ravel())


def _libraw_error(path: Path, e: Exception, doing: str) -> RawFileError:
    """One-line RawFileError for an exception raised by rawpy / LibRaw."""
    import rawpy

    if isinstance(e, rawpy.LibRawFileUnsupportedError):
        version = ".".join(map(str, rawpy.libraw_version))
        return RawFileError(f"{path}: not a RAW file this LibRaw build can decode (LibRaw {version}: unsupported "
                            f"format or not RAW)")
    msg = e.args[0].decode("utf-8", "replace") if e.args and isinstance(e.args[0], bytes) else str(e)
    msg = " ".join(msg.split())
    return RawFileError(f"{path}: {doing} failed ({type(e).__name__}{': ' + msg if msg else ''})")


def _open(path: Path):
    import rawpy

    if not path.is_file():
        raise RawFileError(f"{path}: no such file")
    try:
        return rawpy.imread(str(path))
    except (rawpy.LibRawError, OSError) as e:
        raise _libraw_error(path, e, "reading the RAW file") from None


# --------------------------------------------------------------------------------------------------------------
# The protocol's render as an ISP (rawdiff_infer.isp.IspModel)
# --------------------------------------------------------------------------------------------------------------

def _multipliers(raw: Any, wb: str, p: Path | str) -> tuple[str, np.ndarray, np.ndarray]:
    """(used, mult, pre_mul): which white balance the protocol renders with ('camera', or 'daylight' asked or as
    the fallback for missing camera multipliers), its (R, G, B) multipliers, and the four (R, G, B, G2) that
    LibRaw scales by (``pre_mul``; G2 = G where the file gives none). Raises RawFileError if unusable."""
    if wb not in ("camera", "daylight"):
        raise ValueError(f"wb must be 'camera' or 'daylight', got {wb!r}")
    cam4 = np.asarray(raw.camera_whitebalance, dtype=np.float64)[:4]
    day4 = np.asarray(raw.daylight_whitebalance, dtype=np.float64)[:4]
    cam, day = cam4[:3], day4[:3]
    used = wb
    if wb == "camera" and not (np.all(cam > 0) and np.all(np.isfinite(cam))):
        log.warning("%s: no usable camera white balance %s; using daylight", p, cam.tolist())
        used = "daylight (camera wb missing)"
    mult = cam if used == "camera" else day
    if not (np.all(mult > 0) and np.all(np.isfinite(mult))):
        raise RawFileError(f"{p}: no usable white-balance multipliers ({mult.tolist()})")
    g2 = cam4[3] if used == "camera" and cam4.size > 3 and cam4[3] > 0 else mult[1]
    return used, mult, np.array([mult[0], mult[1], mult[2], g2])


def _render_kwargs(raw: Any, used: str) -> dict[str, Any]:
    """``rawpy.postprocess`` keyword arguments of the protocol's sRGB render (module docstring) for the white
    balance ``used`` (as :func:`_multipliers` says). Everything not named is rawpy's default: AHD, sRGB output,
    ``gamma=LIBRAW_GAMMA``, ``bright=1``, highlight clipping, no exposure shift."""
    kw: dict[str, Any] = dict(no_auto_bright=True, output_bps=8, adjust_maximum_thr=0.0)
    if used == "camera":
        return {**kw, "use_camera_wb": True}
    day = [float(v) for v in np.asarray(raw.daylight_whitebalance, dtype=np.float64)[:3]]
    return {**kw, "use_camera_wb": False, "use_auto_wb": False, "user_wb": [day[0], day[1], day[2], day[1]]}


def _dcraw_gamma(power: float, slope: float) -> tuple[float, float]:
    """(toe break r_b, offset a) of LibRaw's ``gamma_curve`` for ``gamm = (1 / power, slope)``, with its own
    48-step bisection: the curve is ``slope r`` below r_b, ``(1 + a) r^(1/power) - a`` above."""
    g0, g1 = 1.0 / power, float(slope)
    bnd = [0.0, 0.0]
    bnd[1 if g1 >= 1 else 0] = 1.0
    g2 = g3 = g4 = 0.0
    if g1 and (g1 - 1) * (g0 - 1) <= 0:
        for _ in range(48):
            g2 = (bnd[0] + bnd[1]) / 2
            bnd[1 if ((g2 / g1) ** (-g0) - 1) / g0 - 1 / g2 > -1 else 0] = g2
        g3 = g2 / g1
        g4 = g2 * (1 / g0 - 1)
    return g3, g4


def libraw_curve_table(n: int = LIBRAW_LUT_SIZE, gamma: tuple[float, float] = LIBRAW_GAMMA) -> tuple[float, ...]:
    """LibRaw's 8-bit output curve as an ``IspCurve`` table (n values in [0, 1] at l = i / (n - 1), strictly
    increasing) such that ``round(255 * table(l))`` is LibRaw's output level for linear sRGB l in [0, 1].

    What LibRaw does with ``no_auto_bright`` (``copy_mem_image``: ``gamma_curve(gamm[0], gamm[1], 2, 65536 /
    bright)``, then ``curve[v] >> 8``): the 16-bit linear value v (l * 65535, truncated twice on the way: scaling
    and matrix, -1 on average) indexes ``curve[v] = floor(65536 f(v / 65536))``, and the 8-bit output is
    ``floor(256 f)``, not ``round(255 f)``. The table is ``(256 f - 0.5) / 255`` (so that rounding it gives that
    floor), clipped to [0, 1] and blended with a 1e-6 ramp to be strictly increasing. Measured on the Canon 550D
    file, rendering LibRaw's own linear RAW: 0.075 levels RMS from LibRaw's output (0.57 % of values one level
    off, at its truncations), against 0.57 levels (32 % one level off) for the plain ``gamma`` curve.

    Args:
        n: table entries, 2..65536 (4096: below 0.01 levels of interpolation error).
        gamma: (power, toe slope) as rawpy's ``gamma`` takes it.
    """
    r_b, a = _dcraw_gamma(*gamma)
    u = np.linspace(0.0, 1.0, int(n))
    r = np.clip((65535.0 * u - 1.0) / 65536.0, 0.0, None)
    f = np.where(r < r_b, r * gamma[1], (1.0 + a) * np.power(np.maximum(r, 1e-300), 1.0 / gamma[0]) - a)
    table = np.maximum.accumulate(np.clip((256.0 * f - 0.5) / 255.0, 0.0, 1.0))
    return tuple((table * (1.0 - 1e-6) + 1e-6 * u).tolist())


def _matrix_candidates(raw: Any) -> list[np.ndarray]:
    """The matrices LibRaw may render with: the file's own (``cmatrix``, what rawpy calls ``color_matrix``; LibRaw
    adopts it for DNGs when ``cmatrix[0][0] > 0.125``), the one it builds from ``rgb_xyz_matrix`` (``cam_xyz_coeff``:
    rows of cam_xyz @ xyz_rgb normalised to sum 1, inverted; float32 as LibRaw stores it), and the identity."""
    out = []
    cm = np.asarray(raw.color_matrix, dtype=np.float64)[:3, :3]
    if cm[0, 0] > 0.125:
        out.append(cm)
    cam_xyz = np.asarray(raw.rgb_xyz_matrix, dtype=np.float64)[:3, :3]
    if np.any(cam_xyz):
        cam_rgb = cam_xyz @ np.asarray(_DCRAW_XYZ_RGB)
        sums = cam_rgb.sum(axis=1, keepdims=True)
        if np.all(np.abs(sums) > 1e-9):
            inv = np.linalg.inv(cam_rgb / sums)
            out.append(inv.astype(np.float32).astype(np.float64))
    out.append(np.eye(3))
    return out


def _render_matrix(raw: Any, name: str, kwargs: dict[str, Any]) -> tuple[float, ...]:
    """The 3 x 3 camera RGB -> linear sRGB matrix LibRaw renders this file with (rawpy does not expose its
    ``rgb_cam``), measured: two half-size linear 16-bit renders, camera RGB and sRGB, and a least-squares fit
    over pixels unclipped in both (LibRaw truncates the product, hence the +0.5). A candidate of
    :func:`_matrix_candidates` within 1e-3 of it is returned exactly; else the measurement (logged)."""
    import rawpy

    base = {**kwargs, "output_bps": 16, "gamma": (1.0, 1.0), "half_size": True}
    try:
        cam = raw.postprocess(output_color=rawpy.ColorSpace.raw, **base).reshape(-1, 3).astype(np.float64)
        rgb = raw.postprocess(output_color=rawpy.ColorSpace.sRGB, **base).reshape(-1, 3).astype(np.float64)
    except rawpy.LibRawError as e:
        raise _libraw_error(Path(name), e, "measuring the render matrix") from None
    candidates = _matrix_candidates(raw)
    ok = (cam.min(axis=1) >= 1) & (cam.max(axis=1) <= 65534) & (rgb.min(axis=1) >= 1) & (rgb.max(axis=1) <= 65534)
    if ok.sum() < 64:
        log.warning("%s: too few unclipped pixels to measure the render matrix; using the file's", name)
        return tuple(float(v) for v in candidates[0].ravel())
    sol, *_ = np.linalg.lstsq(cam[ok], rgb[ok] + 0.5, rcond=None)
    measured = sol.T
    for cand in candidates:
        if np.abs(cand - measured).max() < _MATRIX_SNAP:
            return tuple(float(v) for v in cand.ravel())
    log.info("%s: LibRaw's render matrix matches none of the file's matrices; using the measured one", name)
    return tuple(float(v) for v in measured.ravel())


def _libraw_isp(raw: Any, name: str, used: str, pre_mul: np.ndarray, curve: str) -> IspModel:
    """:func:`libraw_isp` on an open rawpy object, for the white balance ``used`` with LibRaw's ``pre_mul``."""
    if curve not in ("exact", "gamma"):
        raise ValueError(f"curve must be 'exact' or 'gamma', got {curve!r}")
    matrix = _render_matrix(raw, name, _render_kwargs(raw, used))
    gain = float(pre_mul[1] / pre_mul.min())  # LibRaw scales by the smallest multiplier, the RAW target by green
    if gain != 1.0:
        log.warning("%s: the green multiplier is not the smallest (%s): the ISP's gain %.4g is exact, its highlight "
                    "clipping is not (LibRaw clips after that gain)", name, pre_mul.tolist(), gain)
    if curve == "exact":
        c = IspCurve(kind="lut", lut=libraw_curve_table())
    else:
        c = IspCurve(kind="gamma", power=LIBRAW_GAMMA[0], slope=LIBRAW_GAMMA[1])
    return IspModel(gain=gain, srgb_from_cam=matrix, curve=c, clip=1.0, bits=8)


def libraw_isp(source: str | os.PathLike[str] | Any, *, wb: Literal["camera", "daylight"] = "camera",
               curve: Literal["exact", "gamma"] = "exact") -> IspModel:
    """The protocol's sRGB render of one RAW file as an ``IspModel`` acting on its RAW target (``load_raw_pair``'s
    ``raw_linear``: linear, black-subtracted, white-balanced with green = 1, in [0, 1]).

    LibRaw, with the protocol's settings (``_render_kwargs``), scales the RAW by the multipliers over the
    smallest one and clips it (= the RAW target when green is the smallest, the usual case: gain 1), demosaics
    (AHD), multiplies by its ``rgb_cam`` (camera RGB -> linear sRGB; measured, see ``_render_matrix``), clips to
    16 bits, and applies its gamma curve ``LIBRAW_GAMMA`` with 8-bit output. No auto-brightening
    (``no_auto_bright``), ``bright = 1``, white level = the file's (``adjust_maximum_thr=0``): no other gain.

    Args:
        source: a RAW file's path, or an open ``rawpy.RawPy`` (left open; its later renders are unaffected).
        wb: the protocol's white balance, 'camera' (InvISP; falls back to daylight as ``load_raw_pair`` does)
            or 'daylight'.
        curve: 'exact' (default): a ``libraw_curve_table`` LUT that includes LibRaw's 8-bit truncation
            (``floor(256 f)``), so ``render`` matches LibRaw's own quantisation; 'gamma': the parametric
            curve ``gamma (2.222, 4.5)``, the same shape rounded the runtime's way (up to one level off, 0.57 levels
            RMS on LibRaw's own RAW).
    Returns the IspModel (8 bits, clip 1). What it cannot express: the demosaicing (LibRaw's AHD against the RAW
    target's bilinear: 42 dB on the Canon 550D file, the rest of the residual) and the JPEG round trip after it
    (38 dB); and, only where green is not the smallest multiplier, LibRaw's clipping after the gain.
    Raises RawFileError (one line naming the file) for files LibRaw cannot read or render.
    """
    if curve not in ("exact", "gamma"):
        raise ValueError(f"curve must be 'exact' or 'gamma', got {curve!r}")
    if hasattr(source, "postprocess"):
        used, _, pre_mul = _multipliers(source, wb, "RAW")
        return _libraw_isp(source, "RAW", used, pre_mul, curve)
    p = Path(source)
    with _open(p) as raw:
        used, _, pre_mul = _multipliers(raw, wb, p)
        return _libraw_isp(raw, str(p), used, pre_mul, curve)


# --------------------------------------------------------------------------------------------------------------
# The pair
# --------------------------------------------------------------------------------------------------------------

def load_raw_pair(path: str | os.PathLike[str], *, wb: Literal["camera", "daylight"] = "camera",
                  jpeg_quality: int | None = 90, jpeg_subsampling: int = 1) -> RawPair:
    """Decode a RAW file into an aligned (sRGB, linear RAW) pair with the InvISP protocol (module docstring).

    ``wb``: 'camera' renders with ``use_camera_wb=True`` (InvISP); 'daylight' with ``user_wb`` set to LibRaw's
    ``daylight_whitebalance``. If the file has no usable camera multipliers, 'camera' falls back to daylight
    (as LibRaw does) and ``RawPair.wb`` says so. ``jpeg_quality=None`` skips the JPEG round trip.

    Raises:
        RawFileError: missing, unreadable or unsupported files; non-Bayer data (LinearRaw / demosaiced DNG,
            Foveon, X-Trans); a render whose size does not match the visible sensor area.
    """
    import rawpy

    from .camera_isp import jpeg_roundtrip

    if wb not in ("camera", "daylight"):
        raise ValueError(f"wb must be 'camera' or 'daylight', got {wb!r}")
    p = Path(path)
    with _open(p) as raw:
        try:
            raw_type = raw.raw_type
            pattern = raw.raw_pattern
        except rawpy.LibRawError as e:
            raise _libraw_error(p, e, "unpacking the RAW data") from None
        if raw_type != rawpy.RawType.Flat or pattern is None:
            raise RawFileError(f"{p}: not a colour-filter-array RAW (raw_type={raw_type.name}, no Bayer pattern: "
                               f"LinearRaw or already demosaiced DNG); the protocol needs a Bayer mosaic")
        desc = raw.color_desc.decode("ascii", "replace")
        if np.asarray(pattern).shape != (2, 2) or desc not in ("RGBG", "RGGB", "RGB"):
            raise RawFileError(f"{p}: unsupported CFA (pattern {np.asarray(pattern).tolist()}, colours {desc!r}); "
                               f"only 2x2 RGB Bayer layouts are supported")

        visible = raw.raw_image_visible.astype(np.float32)
        colors = raw.raw_colors_visible.astype(np.int64)
        # colour index -> R/G/B through LibRaw's colour description ("RGBG": index 3 is the second green)
        lut = np.array(["RGB".index(c) for c in desc], dtype=np.int64)
        cfa = "".join(desc[int(v)] for v in colors[:2, :2].ravel())
        if cfa not in CFA_PATTERNS or visible.shape[0] < 2 or visible.shape[1] < 2:
            raise RawFileError(f"{p}: unsupported CFA layout {cfa!r} (need one of {', '.join(CFA_PATTERNS)})")
        black = np.asarray(raw.black_level_per_channel, dtype=np.float32)
        white = float(raw.white_level)
        flip = int(raw.sizes.flip)
        if raw.sizes.pixel_aspect != 1.0:
            raise RawFileError(f"{p}: non-square pixels (aspect {raw.sizes.pixel_aspect}) are not supported")
        if np.any(white <= black):
            raise RawFileError(f"{p}: white level {white} not above black levels {black.tolist()}")

        used, mult, pre_mul = _multipliers(raw, wb, p)
        try:
            rgb = raw.postprocess(**_render_kwargs(raw, used))
        except rawpy.LibRawError as e:
            raise _libraw_error(p, e, "rendering the sRGB target") from None
        isp = _libraw_isp(raw, str(p), used, pre_mul, "exact")
        cam_to_srgb = isp.srgb_from_cam
        xyz_to_cam = _matrix3(raw.rgb_xyz_matrix)

    # Black level per CFA colour (index 0..3 through the real per-pixel colour map), scale by white - black.
    blk = black[colors]
    mosaic = np.clip((visible - blk) / (white - blk), 0.0, 1.0)
    lin = demosaic_bilinear(mosaic, lut[colors])
    mult_g = (mult / mult[1]).astype(np.float32)
    lin = np.clip(lin * mult_g, 0.0, 1.0)
    lin = orient(lin, flip)

    if lin.shape != rgb.shape:
        raise RawFileError(f"{p}: LibRaw's render is {rgb.shape[:2]} but the visible sensor area, oriented, is "
                           f"{lin.shape[:2]}; the pair would not be aligned")
    srgb = jpeg_roundtrip(rgb, jpeg_quality, subsampling=jpeg_subsampling) if jpeg_quality is not None else rgb

    make, model = _read_make_model(p)
    return RawPair(srgb=np.ascontiguousarray(srgb, dtype=np.uint8), raw_linear=lin.astype(np.float32, copy=False),
                   path=str(p), make=make, model=model, cfa_pattern=cfa,
                   black_levels=tuple(int(round(v)) for v in black.tolist()), white_level=int(white),
                   wb=used, wb_multipliers=tuple(float(v) for v in mult_g), flip=flip,
                   cam_to_srgb=cam_to_srgb or (), xyz_to_cam=xyz_to_cam, jpeg_quality=jpeg_quality, isp=isp)


# --------------------------------------------------------------------------------------------------------------
# Splits and list files
# --------------------------------------------------------------------------------------------------------------

def _stem(name: str) -> str:
    base = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    root, ext = os.path.splitext(base)
    return root if ext.lower() in _LIST_EXTENSIONS else base


def split_files(files: Iterable[str | os.PathLike[str]], *, test_fraction: float = 0.15,
                seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Deterministic random train/test split (InvISP uses 85:15).

    The files are sorted by name first, so the split depends only on the set of names and ``seed``, not on the
    order given; ``round(n * test_fraction)`` files go to test. Returns (train, test), each sorted.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError("test_fraction must be in [0, 1]")
    paths = sorted({Path(f) for f in files}, key=lambda q: (q.name, str(q)))
    n_test = int(round(len(paths) * test_fraction))
    order = np.random.default_rng(seed).permutation(len(paths))
    test_idx = set(order[:n_test].tolist())
    train = [q for i, q in enumerate(paths) if i not in test_idx]
    test = [q for i, q in enumerate(paths) if i in test_idx]
    return train, test


def read_list_file(path: str | os.PathLike[str]) -> list[str]:
    """Names from an InvISP-style list file, as stems.

    InvISP ships ``<camera>_train.txt`` / ``_test.txt`` with one bare name per line (``a0002-dgw_005``) and
    ``<camera>.txt`` with one download URL per line (``https://.../a2754-_DSC7455.dng``). Both work: lines are
    stripped, blank lines and ``#`` comments skipped, directories / URL prefixes dropped and a known image or
    RAW extension removed. Order is kept, duplicates dropped.
    """
    names: list[str] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            s = _stem(line)
            if s and s not in seen:
                seen.add(s)
                names.append(s)
    return names


def select_by_stem(files: Iterable[str | os.PathLike[str]], names: Sequence[str], *,
                   missing: Literal["error", "skip"] = "error") -> list[Path]:
    """The files whose stem is in ``names``, in the order of ``names`` (e.g. from :func:`read_list_file`)."""
    by_stem: dict[str, Path] = {}
    for f in files:
        q = Path(f)
        by_stem.setdefault(q.stem, q)
    out, lost = [], []
    for n in names:
        (out.append(by_stem[n]) if n in by_stem else lost.append(n))
    if lost and missing == "error":
        raise FileNotFoundError(f"{len(lost)} listed name(s) have no file, e.g. {lost[:3]}")
    return out
