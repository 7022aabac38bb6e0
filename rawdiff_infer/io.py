"""Image input and RAW output: decode sRGB photos, write DNG / 16-bit TIFF / ``.npy`` atomically.

Input (``read_image``): JPEG (incl. MPO), PNG, TIFF and WebP, 8 or 16 bits per channel, decoded in full (a
truncated file is an error, never a grey-filled picture), EXIF orientation applied, alpha dropped, grey /
palette / CMYK / LAB expanded to RGB, an embedded non-sRGB ICC profile converted to sRGB. Every problem with
the input file raises :class:`ImageError` with a one-line message ``"<path>: <problem>"``; camera RAW files
are refused (this tool makes RAW, it does not read it).

Output: the RAW convention of DESIGN.md. ``linear`` is float32 H x W x 3 in [0, 1]: demosaiced camera RGB,
black-subtracted, white-balanced, divided by (white - black). ``write_dng`` stores its Bayer mosaic
``round(black + linear * (white - black))`` as uint16 with the camera's colour matrix and AsShotNeutral =
(1, 1, 1) (the data is already white-balanced), so LibRaw / darktable / Lightroom render it. Every writer goes
through :func:`atomic_write`: a temporary file in the target's directory, fsync, ``os.replace``; a failure
leaves neither a partial file nor a damaged previous one.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import secrets
import stat
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import tifffile
from PIL import Image, ImageCms, ImageFile, ImageOps

from .camera import CFA_PATTERNS, Camera

__all__ = [
    "ImageError",
    "DecodedImage",
    "read_image",
    "is_supported_image",
    "SUPPORTED_INPUT_SUFFIXES",
    "RAW_SUFFIXES",
    "atomic_write",
    "write_dng",
    "write_tiff",
    "write_npy",
    "mosaic",
    "demosaic_bilinear",
    "render_srgb_preview",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: File-name suffixes (lower case) that ``read_image`` is meant for.
SUPPORTED_INPUT_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".tif", ".tiff", ".webp"}
)

#: Camera RAW suffixes (lower case): refused as input, whatever their content.
RAW_SUFFIXES: frozenset[str] = frozenset({
    ".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".gpr", ".raf", ".orf", ".rw2",
    ".rwl", ".pef", ".ptx", ".srw", ".x3f", ".3fr", ".fff", ".iiq", ".mos", ".mef", ".mrw", ".kdc", ".dcr",
    ".k25", ".erf", ".raw", ".rwz", ".cap", ".eip", ".bay", ".mdc", ".nksc",
})

#: Pillow format names accepted as input (MPO is the multi-picture JPEG that many phones write).
_ACCEPTED_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "TIFF": "TIFF", "WEBP": "WebP"}

_RAW_REFUSAL = "camera RAW files are not accepted as input; give an sRGB photo (JPEG/PNG/TIFF/WebP)"

# TIFF / DNG tag codes.
_TAG_ORIENTATION = 274
_TAG_SUBIFDS = 330
_TAG_ICC = 34675
_TAG_DNG_VERSION = 50706
_PHOTOMETRIC_CFA = 32803
_PHOTOMETRIC_LINEAR_RAW = 34892

#: XYZ(D65) -> linear sRGB (IEC 61966-2-1), and its inverse.
_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]])

#: (pixels, bit_depth, format, exif_orientation, icc_converted)
_Decoded = tuple[np.ndarray, int, str, int, bool]

#: LibRaw (like dcraw) refuses RAW images narrower or lower than this (checked with rawpy 0.28).
_LIBRAW_MIN_SIDE = 22

# Image.MAX_IMAGE_PIXELS is a Pillow global: raising it for one read is done under this lock.
_PIXEL_LIMIT_LOCK = threading.Lock()


class ImageError(Exception):
    """A bad input image: the message is one line, ``"<path>: <problem>"``, fit to show a user as is."""


@dataclass(frozen=True)
class DecodedImage:
    """A decoded input photo.

    Attributes:
        pixels: H x W x 3 sRGB, C-contiguous; uint8 (0..255) when ``bit_depth == 8``, uint16 (0..65535) when
            ``bit_depth == 16``. Rows top to bottom as displayed: EXIF orientation is already applied.
        bit_depth: 8 or 16: bits per channel of ``pixels`` (not necessarily of the file, see ``warnings``).
        format: container format: "JPEG", "PNG", "TIFF" or "WebP".
        exif_orientation: the EXIF orientation (1..8) the file declared and that was applied (1 = none).
        icc_converted: True when an embedded non-sRGB ICC profile (or LAB data) was converted to sRGB.
        warnings: one-line notes about lossy steps (alpha dropped, bits reduced, profile ignored, ...);
            each is also logged with ``logging.warning``.
    """

    pixels: np.ndarray
    bit_depth: int
    format: str
    exif_orientation: int = 1
    icc_converted: bool = False
    warnings: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------------------


def is_supported_image(path: PathLike) -> bool:
    """True when ``path``'s suffix is one of ``SUPPORTED_INPUT_SUFFIXES`` (case-insensitive; no I/O)."""
    return Path(path).suffix.lower() in SUPPORTED_INPUT_SUFFIXES


def read_image(path: PathLike, *, max_pixels: int | None = None) -> DecodedImage:
    """Decode an sRGB photo (JPEG, PNG, TIFF or WebP) fully into an H x W x 3 array.

    What is done to the pixels:
      - the whole file is decoded (``Image.load``); truncated or corrupt data raises ``ImageError``
        (Pillow's ``LOAD_TRUNCATED_IMAGES`` is not used);
      - EXIF orientation (all 8 values) is applied, so rows are as displayed;
      - grey (1, L, I;16) is repeated to three channels; palette (P, PA) is expanded; CMYK is converted
        with its ICC profile when it has one, naively otherwise; LAB goes through LittleCMS;
      - an alpha channel is dropped (not composited), with a warning;
      - an embedded ICC profile that is not sRGB is converted to sRGB with LittleCMS (``PIL.ImageCms``,
        perceptual intent); if that fails, the pixels are kept as they are and a warning says so.

    Bit depth: 8-bit files give uint8. 16-bit TIFFs are read with tifffile and keep 16 bits (uint16), as do
    16-bit grey PNGs. Pillow (13) cannot hold 16-bit RGB: it reduces a 16-bit RGB/RGBA PNG to 8 bits, so those
    are decoded with the optional ``imagecodecs`` package when it is installed (16 bits kept) and by Pillow
    otherwise (8 bits, with a warning). A 16-bit TIFF whose compression tifffile cannot decode without
    ``imagecodecs`` (LZW, JPEG, PackBits) falls back to Pillow in the same way. A 16-bit image with a non-sRGB
    ICC profile is converted at 8 bits (LittleCMS via Pillow works on 8-bit RGB only), with a warning.

    Decompression-bomb guard: images with more than ``max_pixels`` pixels are refused. ``max_pixels=None``
    uses Pillow's ``Image.MAX_IMAGE_PIXELS`` (about 89 M pixels by default; ``None`` there means no limit).
    A larger ``max_pixels`` also lifts Pillow's own guard for this call (the CLI's ``--max-pixels``).

    Args:
        path: the file to read.
        max_pixels: largest accepted width * height (> 0), or None for Pillow's limit.

    Returns:
        The decoded image (see ``DecodedImage``).

    Raises:
        ImageError: missing / unreadable / empty file, a directory, not an image, an unsupported format,
            a camera RAW file (by suffix, or a TIFF carrying DNG / CFA data), truncated or corrupt data,
            an image above the pixel limit.
        ValueError: ``max_pixels`` is not positive.
    """
    if max_pixels is not None and max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    name = os.fspath(path)
    _check_file(name)
    notes: list[str] = []
    with _PIXEL_LIMIT_LOCK:
        pillow_limit = Image.MAX_IMAGE_PIXELS
    if max_pixels is None or (pillow_limit is not None and max_pixels <= pillow_limit):
        decoded = _decode_capturing_warnings(name, pillow_limit if max_pixels is None else max_pixels, notes)
    else:
        # Lift Pillow's own guard for this call only; our check in _decode enforces max_pixels instead.
        # Concurrent reads with the default limit wait on the lock to read the limit, so they never see this.
        with _PIXEL_LIMIT_LOCK:
            Image.MAX_IMAGE_PIXELS = max_pixels
            try:
                decoded = _decode_capturing_warnings(name, max_pixels, notes)
            finally:
                Image.MAX_IMAGE_PIXELS = pillow_limit
    pixels, bit_depth, fmt, orientation, icc_converted = decoded
    for note in notes:
        logger.warning("%s: %s", name, note)
    return DecodedImage(pixels=pixels, bit_depth=bit_depth, format=fmt, exif_orientation=orientation,
                        icc_converted=icc_converted, warnings=tuple(notes))


def _decode_capturing_warnings(name: str, limit: int | None, notes: list[str]) -> _Decoded:
    """``_decode`` with Python warnings from Pillow (corrupt EXIF, palette transparency, ...) turned into
    notes. (``warnings.catch_warnings`` is process-global before Python 3.14: a warning raised by another
    thread meanwhile may land here too.)"""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decoded = _decode(name, limit, notes)
    for w in caught:
        if not issubclass(w.category, Image.DecompressionBombWarning):
            notes.append(_one_line(str(w.message)))
    return decoded


def _check_file(name: str) -> None:
    """Raise ImageError unless ``name`` is a non-empty, readable regular file that is not camera RAW."""
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except NotADirectoryError:
        raise ImageError(f"{name}: no such file (a parent is not a directory)") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except OSError as exc:
        raise ImageError(f"{name}: cannot access file ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{name}: is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{name}: not a regular file")
    if Path(name).suffix.lower() in RAW_SUFFIXES:
        raise ImageError(f"{name}: {_RAW_REFUSAL}")
    if st.st_size == 0:
        raise ImageError(f"{name}: empty file (0 bytes)")
    try:
        with open(name, "rb") as f:
            head = f.read(64)
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except OSError as exc:
        raise ImageError(f"{name}: cannot read file ({exc.strerror or exc})") from None
    if _looks_like_raw(name, head):
        raise ImageError(f"{name}: {_RAW_REFUSAL}")


def _looks_like_raw(name: str, head: bytes) -> bool:
    """Camera RAW by content: vendor magic numbers, or a TIFF whose IFD0 / SubIFDs hold DNG or CFA data."""
    if head.startswith((b"FUJIFILMCCD-RAW", b"FOVb", b"IIRO", b"IIRS", b"MMOR", b"IIU\x00")):
        return True  # RAF, X3F, ORF, RW2
    if head[4:8] == b"ftyp" and head[8:12] == b"crx ":
        return True  # CR3
    if not head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return False
    if head[8:10] == b"CR":
        return True  # CR2
    try:
        with tifffile.TiffFile(name) as tif:
            page = tif.pages.first
            pages = [page]
            subifds = page.tags.get(_TAG_SUBIFDS)
            for offset in (subifds.value if subifds is not None else ())[:8]:
                tif.filehandle.seek(offset)
                pages.append(tifffile.TiffPage(tif, index=(0, len(pages) - 1)))
            return any(_TAG_DNG_VERSION in p.tags
                       or int(p.photometric) in (_PHOTOMETRIC_CFA, _PHOTOMETRIC_LINEAR_RAW) for p in pages)
    except Exception:  # noqa: BLE001 - not parseable as TIFF by tifffile: let the decoder judge it
        logger.debug("%s: tifffile could not inspect the TIFF structure", name, exc_info=True)
        return False


def _decode(name: str, limit: int | None, notes: list[str]) -> _Decoded:
    """Open, check the pixel limit, decode; map every decoder failure to ImageError."""
    fmt = "image"
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        notes.append("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set by some code: truncated data may go unnoticed")
    try:
        with Image.open(name) as img:
            fmt = _ACCEPTED_FORMATS.get(img.format or "", img.format or "image")
            if img.format not in _ACCEPTED_FORMATS:
                raise ImageError(f"{name}: unsupported image format {img.format}; "
                                 "give a JPEG, PNG, TIFF or WebP file")
            _check_pixels(name, img.size, limit)
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                notes.append(f"{frames} frames/pages: using the first")
            arr16 = _decode_16bit(name, img, fmt, limit, notes)
            if arr16 is not None:
                return arr16
            img.load()
            return _from_pillow(name, img, fmt, notes)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(_bomb_message(name, str(exc))) from None
    except Image.UnidentifiedImageError:
        claimed = _format_by_magic(name)
        if claimed:
            raise ImageError(f"{name}: truncated or corrupt {claimed} header") from None
        raise ImageError(f"{name}: not an image (unrecognised format)") from None
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode this image") from None
    except Exception as exc:  # noqa: BLE001 - the decoders raise OSError, SyntaxError, ValueError, zlib.error...
        msg = _one_line(str(exc))
        if "truncated" in msg.lower() or isinstance(exc, EOFError):
            raise ImageError(f"{name}: truncated {fmt} data") from exc
        raise ImageError(f"{name}: corrupt {fmt} data ({msg or type(exc).__name__})") from exc


def _format_by_magic(name: str) -> str | None:
    """The accepted format a file's first bytes claim, if any."""
    try:
        with open(name, "rb") as f:
            head = f.read(12)
    except OSError:
        return None
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "TIFF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WebP"
    return None


def _check_pixels(name: str, size: tuple[int, ...], limit: int | None) -> None:
    width, height = int(size[0]), int(size[1])
    if limit is not None and width * height > limit:
        raise ImageError(_bomb_message(name, f"{width}x{height} = {width * height} pixels, above the limit of "
                                             f"{limit}"))


def _bomb_message(name: str, detail: str) -> str:
    return (f"{name}: image too large for the decompression-bomb guard ({_one_line(detail).rstrip('.')}); "
            "raise the limit with --max-pixels if you trust this file")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _decode_16bit(name: str, img: Image.Image, fmt: str, limit: int | None,
                  notes: list[str]) -> _Decoded | None:
    """Decode a 16-bit TIFF (tifffile) or 16-bit colour PNG (imagecodecs); None to let Pillow do it."""
    if img.format == "TIFF":
        return _decode_tiff_16bit(name, img, limit, notes)
    if img.format == "PNG":
        with open(name, "rb") as f:
            head = f.read(26)
        bits, colour_type = head[24], head[25]
        if bits != 16 or colour_type not in (2, 4, 6):
            return None  # 8-bit, palette, or 16-bit grey (Pillow keeps I;16)
        try:
            import imagecodecs  # optional: Pillow cannot hold 16-bit RGB
        except ImportError:
            notes.append("16-bit PNG reduced to 8 bits (Pillow cannot hold 16-bit colour; "
                         "install imagecodecs to keep 16 bits)")
            return None
        with open(name, "rb") as f:
            data = f.read()
        try:
            arr = np.asarray(imagecodecs.png_decode(data))
        except Exception as exc:  # noqa: BLE001 - let Pillow judge the file: its errors name truncation
            img.load()
            notes.append(f"16-bit PNG read at 8 bits (imagecodecs: {_one_line(str(exc))})")
            return None
        if arr.dtype != np.uint16:
            return None
        return _finish_array(name, arr, fmt, _exif_orientation(img, notes), img.info.get("icc_profile"), notes)
    return None


def _decode_tiff_16bit(name: str, img: Image.Image, limit: int | None, notes: list[str]) -> _Decoded | None:
    """Check a TIFF's first image is complete; read it with tifffile if it has more than 8 bits per sample
    (16 bits kept). None to let Pillow decode it."""
    try:
        tif = tifffile.TiffFile(name)
    except Exception:  # noqa: BLE001 - tifffile cannot parse it: Pillow (libtiff) may
        logger.debug("%s: tifffile cannot parse this TIFF", name, exc_info=True)
        return None
    with tif:
        page = tif.pages.first
        size = os.path.getsize(name)
        if any(o + c > size for o, c in zip(page.dataoffsets, page.databytecounts, strict=False)):
            # caught here, before libtiff (via Pillow) prints read errors on stderr
            raise ImageError(f"{name}: truncated TIFF data")
        bits = int(page.bitspersample)
        kind = np.dtype(page.dtype).kind if page.dtype is not None else "?"
        if bits <= 8 and kind in "ui":
            return None  # 8-bit: Pillow handles every photometric and compression
        photometric = int(page.photometric)
        if photometric not in (0, 1, 2) or kind not in "uif":  # not grey / RGB: Pillow, 8 bits
            notes.append(f"{bits}-bit TIFF with photometric {photometric} read at 8 bits")
            return None
        _check_pixels(name, (page.imagewidth, page.imagelength), limit)
        try:
            arr = page.asarray()
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. LZW without imagecodecs: Pillow may still read it
            try:
                img.load()
            except Exception:  # noqa: BLE001 - Pillow cannot either: report tifffile's reason
                raise exc from None
            notes.append(f"16-bit TIFF read at 8 bits ({_one_line(str(exc))})")
            return None
        if int(page.planarconfig) == 2 and arr.ndim == 3:
            arr = np.moveaxis(arr, 0, -1)
        icc_tag = page.tags.get(_TAG_ICC)
        icc = bytes(icc_tag.value) if icc_tag is not None else None
        orient_tag = page.tags.get(_TAG_ORIENTATION)
        orientation = int(orient_tag.value) if orient_tag is not None else 1
    if arr.dtype.kind == "f":
        notes.append("floating-point TIFF: values taken as [0, 1] and stored as 16 bits")
        arr = np.rint(np.clip(np.nan_to_num(arr, nan=0.0), 0.0, 1.0) * 65535.0).astype(np.uint16)
    elif arr.dtype.itemsize > 2:
        notes.append(f"{bits}-bit integer TIFF clipped to 16 bits")
        arr = np.clip(arr, 0, 65535).astype(np.uint16)
    elif 8 < bits < 16:  # e.g. 12-bit samples: stretch to the 16-bit range
        arr = (arr.astype(np.uint32) * 65535 // ((1 << bits) - 1)).astype(np.uint16)
    else:
        arr = arr.astype(np.uint16)
    if photometric == 0:  # MINISWHITE
        arr = 65535 - arr
    if not 1 <= orientation <= 8:
        notes.append(f"invalid EXIF orientation {orientation} ignored")
        orientation = 1
    return _finish_array(name, arr, "TIFF", orientation, icc, notes)


def _finish_array(name: str, arr: np.ndarray, fmt: str, orientation: int, icc: bytes | None,
                  notes: list[str]) -> _Decoded:
    """uint16 H x W [x C] (tifffile, imagecodecs, Pillow I;16) -> oriented, alpha-free sRGB H x W x 3.

    A non-sRGB ICC profile is applied at 8 bits (the result is then uint8, bit depth 8).
    """
    if arr.ndim == 3 and arr.shape[2] in (2, 4):
        notes.append("alpha channel dropped (transparency is ignored)")
        arr = arr[..., : arr.shape[2] - 1]
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ImageError(f"{name}: unsupported {fmt} layout (array shape {arr.shape})")
    arr = _orient(arr, orientation)
    if icc and not _is_srgb_profile(icc):
        arr8 = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        converted, ok = _apply_icc(Image.fromarray(np.ascontiguousarray(arr8)), icc, notes)
        if ok:
            notes.append("16-bit image with a non-sRGB ICC profile converted to sRGB at 8 bits")
            return np.ascontiguousarray(np.asarray(converted.convert("RGB"))), 8, fmt, orientation, True
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr, dtype=np.uint16), 16, fmt, orientation, False


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF orientation 1..8 to an H x W x C array (same result as ``ImageOps.exif_transpose``)."""
    ops = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }
    return ops.get(orientation, ops[1])(arr)


def _exif_orientation(img: Image.Image, notes: list[str]) -> int:
    try:
        value = int(img.getexif().get(_TAG_ORIENTATION, 1))
    except Exception as exc:  # noqa: BLE001 - corrupt EXIF must not stop decoding
        notes.append(f"unreadable EXIF data ignored ({_one_line(str(exc))})")
        return 1
    if not 1 <= value <= 8:
        notes.append(f"invalid EXIF orientation {value} ignored")
        return 1
    return value


def _from_pillow(name: str, img: Image.Image, fmt: str, notes: list[str]) -> _Decoded:
    """A loaded Pillow image -> oriented sRGB uint8 / uint16 H x W x 3."""
    icc = img.info.get("icc_profile")
    orientation = _exif_orientation(img, notes)
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "1":
        img = img.convert("L")
    elif mode in ("P", "PA"):
        img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
    elif mode == "RGBa":
        img = img.convert("RGBA")
    elif mode == "La":
        img = img.convert("LA")
    elif mode in ("RGBX", "YCbCr", "HSV"):
        img = img.convert("RGB")
    if img.mode in ("RGBA", "LA"):
        notes.append("alpha channel dropped (transparency is ignored)")
        img = img.convert("RGB" if img.mode == "RGBA" else "L")
    mode = img.mode
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        arr = np.asarray(img)
        if mode == "F":
            notes.append("floating-point image: values taken as [0, 1] and stored as 16 bits")
            arr = np.rint(np.clip(np.nan_to_num(arr), 0.0, 1.0) * 65535.0)
        arr = np.clip(arr, 0, 65535).astype(np.uint16)
        pixels, depth, _, _, converted = _finish_array(name, arr, fmt, 1, icc, notes)  # already oriented
        return pixels, depth, fmt, orientation, converted
    icc_converted = False
    if mode == "LAB":
        img, icc_converted = _apply_icc(img, None, notes, lab=True)
    elif icc and not _is_srgb_profile(icc):
        img, icc_converted = _apply_icc(img, icc, notes)
    if img.mode == "CMYK":
        if not icc_converted:
            notes.append("CMYK converted to RGB without a colour profile (approximate colours)")
        img = img.convert("RGB")
    if img.mode not in ("RGB", "L"):
        raise ImageError(f"{name}: unsupported {fmt} pixel mode {img.mode}")
    if img.mode == "L":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8)), 8, fmt, orientation, icc_converted


@lru_cache(maxsize=1)
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _is_srgb_profile(icc: bytes) -> bool:
    """True when the profile's description says sRGB; False otherwise, also for an unreadable profile (which
    ``_apply_icc`` then reports)."""
    try:
        desc = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc)))
    except Exception:  # noqa: BLE001 - judged (and warned about) in _apply_icc
        return False
    return "srgb" in desc.lower()


def _apply_icc(img: Image.Image, icc: bytes | None, notes: list[str], *,
               lab: bool = False) -> tuple[Image.Image, bool]:
    """Convert ``img`` from its ICC profile (or LAB) to sRGB; on failure keep it and add a note."""
    try:
        src = ImageCms.createProfile("LAB") if lab else ImageCms.ImageCmsProfile(io.BytesIO(icc or b""))
    except Exception as exc:  # noqa: BLE001 - PyCMSError, OSError, TypeError on junk bytes
        notes.append(f"unreadable ICC profile ignored ({_one_line(str(exc))}); colours may be off")
        return img, False
    try:
        out = ImageCms.profileToProfile(img, src, _srgb_profile(),
                                        renderingIntent=ImageCms.Intent.PERCEPTUAL, outputMode="RGB")
    except Exception as exc:  # noqa: BLE001
        notes.append(f"ICC profile conversion to sRGB failed ({_one_line(str(exc))}); "
                     "pixels kept as they are")
        return img, False
    assert out is not None
    return out, True


# --------------------------------------------------------------------------------------------------------
# Bayer helpers
# --------------------------------------------------------------------------------------------------------

CFAPattern = str | tuple[int, int, int, int]


def _pattern_indices(pattern: CFAPattern) -> np.ndarray:
    """'RGGB' / (0, 1, 1, 2) -> 2 x 2 int array of colour indices (0 = R, 1 = G, 2 = B)."""
    if isinstance(pattern, str):
        try:
            cells = CFA_PATTERNS[pattern.upper()]
        except KeyError:
            raise ValueError(f"unknown CFA pattern {pattern!r}; choose from {sorted(CFA_PATTERNS)}") from None
    else:
        cells = tuple(int(c) for c in pattern)
        if len(cells) != 4 or sorted(set(cells)) != [0, 1, 2]:
            raise ValueError(f"CFA pattern must be 4 colour indices covering 0, 1, 2; got {pattern!r}")
    return np.array(cells, dtype=np.intp).reshape(2, 2)


def mosaic(image: np.ndarray, pattern: CFAPattern) -> np.ndarray:
    """Bayer-sample an H x W x 3 image: H x W array, same dtype, pixel (y, x) = image[y, x, cfa[y % 2, x % 2]].

    Args:
        image: H x W x 3, any dtype (channels R, G, B of the camera).
        pattern: a name from ``camera.CFA_PATTERNS`` ("RGGB", "BGGR", "GRBG", "GBRG") describing the top-left
            2 x 2 cell, or its 4 colour indices row-major (0 = R, 1 = G, 2 = B).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
    cfa = _pattern_indices(pattern)
    out = np.empty(image.shape[:2], dtype=image.dtype)
    for dy in (0, 1):
        for dx in (0, 1):
            out[dy::2, dx::2] = image[dy::2, dx::2, cfa[dy, dx]]
    return out


def demosaic_bilinear(mosaic_: np.ndarray, pattern: CFAPattern) -> np.ndarray:
    """Bilinear demosaic: H x W Bayer mosaic -> H x W x 3 float32, in the mosaic's units.

    Each missing sample is the mean of its nearest same-colour neighbours (the 3 x 3 kernel
    [[1, 2, 1], [2, 4, 2], [1, 2, 1]] applied as a normalised convolution, so borders use only the
    neighbours that exist); measured samples are kept exactly. Needs H, W >= 2.
    """
    m = np.asarray(mosaic_)
    if m.ndim != 2 or m.shape[0] < 2 or m.shape[1] < 2:
        raise ValueError(f"expected an H x W mosaic with H, W >= 2, got shape {m.shape}")
    cfa = _pattern_indices(pattern)
    h, w = m.shape
    values = m.astype(np.float32)
    ys, xs = np.arange(h)[:, None] % 2, np.arange(w)[None, :] % 2
    colour = cfa[ys, xs]  # H x W colour index per site
    kernel = ((1.0, 2.0, 1.0), (2.0, 4.0, 2.0), (1.0, 2.0, 1.0))
    out = np.empty((h, w, 3), dtype=np.float32)
    for c in range(3):
        mask = (colour == c).astype(np.float32)
        num = _conv3x3(values * mask, kernel)
        den = _conv3x3(mask, kernel)
        plane = num / den
        out[..., c] = np.where(mask > 0, values, plane)
    return out


def _conv3x3(a: np.ndarray, kernel: tuple[tuple[float, ...], ...]) -> np.ndarray:
    """'Same' 3 x 3 correlation with zero padding (float32)."""
    p = np.pad(a, 1)
    h, w = a.shape
    out = np.zeros((h, w), dtype=np.float32)
    for dy in range(3):
        for dx in range(3):
            out += np.float32(kernel[dy][dx]) * p[dy:dy + h, dx:dx + w]
    return out


# --------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_write(path: PathLike) -> Iterator[BinaryIO]:
    """Write a file all-or-nothing: yields a binary file object on a temporary file in ``path``'s directory.

    On a clean exit the data are flushed and fsync'ed, the temporary file is renamed over ``path``
    (``os.replace``, atomic on POSIX and Windows), and the directory is fsync'ed where the OS allows. On any
    exception (including KeyboardInterrupt) the temporary file is removed and ``path`` is untouched. The new
    file gets the usual permissions (0o666 minus the umask).

    Raises:
        IsADirectoryError: ``path`` is a directory.
        OSError: the directory does not exist or cannot be written, the disk is full, ...
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(target))
    directory = target.parent
    while True:
        tmp = directory / f".{target.name[:200]}.{secrets.token_hex(6)}.tmp"
        try:
            f = open(tmp, "x+b")  # noqa: SIM115 - closed below; O_CREAT|O_EXCL, 0o666 minus umask
            break
        except FileExistsError:
            continue
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, target)
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems / platforms refuse fsync on directories
    finally:
        os.close(fd)


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
    cam_rgb = cam_xyz @ _SRGB_TO_XYZ
    cam_rgb = cam_rgb / cam_rgb.sum(axis=1, keepdims=True)
    return np.linalg.inv(cam_rgb)


def _srgb_encode(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1.0 / 2.4) - 0.055)


def render_srgb_preview(linear: np.ndarray, *, camera: Camera, max_side: int = 256) -> np.ndarray:
    """A small sRGB rendering of white-balanced linear camera RGB: uint8 h x w x 3, long side <= ``max_side``.

    Box-downsampled by an integer factor, converted with the camera matrix as LibRaw does for the DNG we
    write (see ``_camera_to_srgb``), sRGB-encoded, no exposure change.
    """
    lin = _check_rgb_float(linear, "linear")
    factor = max(1, -(-max(lin.shape[:2]) // max_side))
    h, w = lin.shape[0] // factor, lin.shape[1] // factor
    if factor > 1 and h > 0 and w > 0:
        lin = lin[: h * factor, : w * factor].reshape(h, factor, w, factor, 3).mean(axis=(1, 3))
    rgb = lin.astype(np.float64) @ _camera_to_srgb(camera).T
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
              description: str | None = None, preview_max_side: int = 256) -> np.ndarray:
    """Write linear camera RGB as a Bayer DNG (DNG 1.4, uncompressed 16-bit CFA) that raw converters read.

    Layout (Adobe DNG Converter's, the one DNG recommends): IFD0 is an 8-bit sRGB preview
    (NewSubFileType = 1, long side <= ``preview_max_side``) carrying the DNG-wide tags (DNGVersion, Make,
    Model, UniqueCameraModel, ColorMatrix1, CalibrationIlluminant1, AsShotNeutral, Orientation, Software,
    ImageDescription); its SubIFD is the raw mosaic (NewSubFileType = 0, PhotometricInterpretation = CFA)
    with CFARepeatPatternDim, CFAPattern, CFAPlaneColor, CFALayout, BlackLevelRepeatDim, BlackLevel,
    WhiteLevel.

    Args:
        path: output file (conventionally ``.dng``); replaced atomically.
        linear: H x W x 3 float, white-balanced camera RGB in [0, 1] (values outside are clipped; NaN / inf
            raise ValueError). H, W >= 2; LibRaw opens only H, W >= 22 (a warning is logged below that).
        camera: colour matrix, black / white levels and CFA pattern of the camera the RAW imitates.
        orientation: EXIF/TIFF orientation (1..8) of the stored pixels (1 = stored upright).
        preview_srgb: optional sRGB image with the same H x W as ``linear`` (uint8, uint16 or float [0, 1]),
            e.g. the input photo, for the embedded preview; by default one is rendered from ``linear``.
        software, description: Software and ImageDescription tags (non-ASCII characters are escaped).
        preview_max_side: long side of the preview in pixels (>= 1).

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
    cfa = _pattern_indices(camera.cfa_pattern)
    raw = np.rint(black + np.clip(mosaic(lin, camera.cfa_pattern), 0.0, 1.0).astype(np.float64)
                  * (white - black)).astype(np.uint16)
    if preview_srgb is not None:
        preview = _preview_from_srgb(preview_srgb, lin.shape[:2], preview_max_side)
    else:
        preview = render_srgb_preview(lin, camera=camera, max_side=preview_max_side)
    if description is None:
        description = f"RAW reconstructed from an sRGB image by {software}"

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
    with atomic_write(path) as f, tifffile.TiffWriter(f) as tw:
        tw.write(preview, photometric="rgb", subfiletype=1, subifds=1, software=_ascii(software),
                 description=_ascii(description), metadata=None, extratags=ifd0_tags)
        tw.write(raw, photometric=_PHOTOMETRIC_CFA, subfiletype=0, software=False, metadata=None,
                 extratags=raw_tags)
    logger.info("wrote %s: %dx%d %s DNG (%s, black %d, white %d)", os.fspath(path), raw.shape[1],
                raw.shape[0], camera.cfa_pattern, camera.unique_model, black, white)
    return raw


def write_tiff(path: PathLike, image: np.ndarray, *, software: str = "rawdiff", description: str | None = None,
               compression: Literal["deflate", "none"] = "deflate") -> np.ndarray:
    """Write an H x W x 3 float image in [0, 1] (linear or encoded RAW, or sRGB) as a 16-bit RGB TIFF.

    Stored values: ``uint16 = round(clip(v, 0, 1) * 65535)``, chunky RGB, Adobe Deflate (zlib) compressed
    by default (``compression="none"`` for uncompressed). No colour profile is attached. Replaced atomically.

    Returns:
        The uint16 H x W x 3 array written.

    Raises:
        ValueError: wrong shape / dtype, NaN or inf.
    """
    a = _check_rgb_float(image, "image")
    if compression not in ("deflate", "none"):
        raise ValueError(f"compression must be 'deflate' or 'none', got {compression!r}")
    data = np.rint(np.clip(a, 0.0, 1.0) * 65535.0).astype(np.uint16)
    with atomic_write(path) as f:
        tifffile.imwrite(f, data, photometric="rgb", metadata=None, software=_ascii(software),
                         description=_ascii(description) if description is not None else None,
                         compression="zlib" if compression == "deflate" else None)
    logger.info("wrote %s: %dx%d 16-bit RGB TIFF", os.fspath(path), data.shape[1], data.shape[0])
    return data


def write_npy(path: PathLike, array: np.ndarray) -> np.ndarray:
    """Save an H x W x 3 float array as float32 ``.npy`` (values as they are, not clipped), atomically.

    Returns:
        The float32 C-contiguous array written.

    Raises:
        ValueError: wrong shape / dtype, NaN or inf.
    """
    a = _check_rgb_float(array, "array")
    with atomic_write(path) as f:
        np.save(f, a, allow_pickle=False)
    logger.info("wrote %s: %dx%d float32 array", os.fspath(path), a.shape[1], a.shape[0])
    return a

