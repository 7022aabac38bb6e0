"""Decoding of sRGB photos: ``read_image`` and its errors (see the package docstring)."""

from __future__ import annotations

import io
import logging
import os
import stat
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageCms, ImageFile, ImageOps


__all__ = ["ImageError", "DecodedImage", "read_image", "is_supported_image", "SUPPORTED_INPUT_SUFFIXES",
           "RAW_SUFFIXES"]

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

#: (pixels, bit_depth, format, exif_orientation, icc_converted)
_Decoded = tuple[np.ndarray, int, str, int, bool]

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
