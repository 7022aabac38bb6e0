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
]

log = logging.getLogger(__name__)

#: Bumped whenever the pair computation changes (part of the cache key in ``data.PairCache``).
PROTOCOL_VERSION = 1

#: File extensions treated as RAW when listing folders.
RAW_EXTENSIONS = (".dng", ".nef", ".cr2", ".cr3", ".arw", ".raf", ".orf", ".rw2", ".pef", ".srw", ".nrw",
                  ".crw", ".3fr", ".iiq", ".erf", ".kdc", ".mef", ".mos", ".raw", ".rwl", ".srf", ".x3f")

_LIST_EXTENSIONS = RAW_EXTENSIONS + (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".npz", ".npy", ".gpr")


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
        """Everything but the images, JSON-serialisable; ``camera_description`` is ``camera().to_dict()``."""
        meta = {k: getattr(self, k) for k in ("path", "make", "model", "cfa_pattern", "black_levels", "white_level",
                                              "wb", "wb_multipliers", "flip", "cam_to_srgb", "xyz_to_cam",
                                              "jpeg_quality")}
        meta["camera_description"] = self.camera().to_dict()
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

        cam = np.asarray(raw.camera_whitebalance, dtype=np.float64)[:3]
        day = np.asarray(raw.daylight_whitebalance, dtype=np.float64)[:3]
        used = wb
        if wb == "camera" and not (np.all(cam > 0) and np.all(np.isfinite(cam))):
            log.warning("%s: no usable camera white balance %s; using daylight", p, cam.tolist())
            used = "daylight (camera wb missing)"
        mult = cam if used == "camera" else day
        if not (np.all(mult > 0) and np.all(np.isfinite(mult))):
            raise RawFileError(f"{p}: no usable white-balance multipliers ({mult.tolist()})")

        try:
            if used == "camera":
                rgb = raw.postprocess(use_camera_wb=True, no_auto_bright=True, output_bps=8,
                                      adjust_maximum_thr=0.0)
            else:
                rgb = raw.postprocess(use_camera_wb=False, use_auto_wb=False, no_auto_bright=True, output_bps=8,
                                      adjust_maximum_thr=0.0,
                                      user_wb=[float(day[0]), float(day[1]), float(day[2]), float(day[1])])
        except rawpy.LibRawError as e:
            raise _libraw_error(p, e, "rendering the sRGB target") from None
        cam_to_srgb = _matrix3(raw.color_matrix)
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
                   cam_to_srgb=cam_to_srgb or (), xyz_to_cam=xyz_to_cam, jpeg_quality=jpeg_quality)


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
