"""Decoding of sRGB photos: ``read_image`` and its errors (see the package docstring).

Every outcome of :func:`read_image` is either a :class:`DecodedImage` or one :class:`ImageError` whose message is
one line, ``"<path>: <problem>"``, the path shown with :func:`rawdiff_infer.messages.show_path` (odd names are
quoted and escaped). Nothing else reaches stderr: tifffile's log records and Python warnings (Pillow, numpy)
raised during a decode are captured and become ``DecodedImage.warnings`` notes (or are dropped when the decode
fails: the error line is then the one message); numpy floating-point errors are ignored (``np.errstate``: the
decoder checks for NaN and infinity itself). The file is opened once, with
:func:`rawdiff_infer.fsio.open_regular` (``O_NONBLOCK`` plus ``fstat``: a FIFO, device, socket or directory is
refused before any read), and every decoder reads that one descriptor.

TIFF policy (the first page; ``BitsPerSample`` = b, ``SampleFormat`` as tifffile reads it). tifffile reads the
structure of every TIFF first; the pixels are decoded by Pillow (libtiff) or tifffile as below. A compression
Pillow's libtiff has no codec for (WebP, for one) goes to tifffile whatever the layout; one that neither can
decode is refused naming the codec (not as corrupt data).

=====================================  =========================================================================
sample format / layout                 outcome
=====================================  =========================================================================
unsigned, b <= 8, grey / RGB /         Pillow, 8 bits (uint8); b < 8 and 1-bit are stretched to 0..255; when
palette / CMYK / YCbCr / CIELab,       Pillow cannot open the file (e.g. a big-endian BigTIFF), tifffile decodes
at most one extra sample               it the same way (not YCbCr / CIELab: refused)
unsigned, b <= 8, more extra samples   tifffile, 8 bits
unsigned, 8 < b <= 16                  tifffile, 16 bits; b < 16 (e.g. 12-bit) stretched: round(v * 65535 / max)
unsigned, b > 16 (24, 32, 64)          tifffile; full range, ``round(v * 65535 / (2**b - 1))``, with a note
float (16, 24, 32, 64 bits)            tifffile; taken as sRGB-encoded values in [0, 1], quantised to 16 bits
                                       (a note says so); values outside [0, 1] are clipped with a note that
                                       counts them; any NaN or infinity refuses the file
signed integers (SampleFormat 2)       refused: no standard meaning for a photo's code values (an offset or a
                                       signed range would be a guess)
complex, void (SampleFormat 4-6)       refused
extra samples (ExtraSamples)           the colour samples are kept; alpha is dropped ("alpha channel dropped"),
                                       associated (premultiplied) colours first divided by it; other extra
                                       samples are dropped with a note that counts them
photometric grey / RGB / palette /     accepted; MinIsWhite is inverted; a palette of any depth is looked up in
CMYK / YCbCr / CIELab                  its colour map (16-bit entries -> 16 bits); CMYK > 8 bits is converted
                                       naively at 16 bits, or through its ICC profile at 8 bits; separated
                                       inks other than CMYK (InkSet 2), and YCbCr / CIELab above 8 bits, are
                                       refused (convert to RGB)
other photometric modes                refused, naming the mode (MASK, ICCLab, ITULab, LogL, LogLuv, depth map,
                                       unknown codes); CFA / LinearRaw (and DNG) are refused as camera RAW
more than 16 samples per pixel         refused; fewer than the mode needs: refused as malformed
planar configuration 2, tiles,         decoded (Pillow or tifffile reorder planes and assemble tiles)
big-endian, BigTIFF
multi-page                             first page, with a note counting the pages
volumetric (ImageDepth > 1)            first slice, with a note
MaxSampleValue / SMin / SMaxSample     ignored: the TIFF specification makes them statistics, not scaling
=====================================  =========================================================================

libtiff (inside Pillow) prints its errors from C: while Pillow decodes a TIFF, libtiff's global error and
warning handlers are set to NULL (then restored), so those lines never reach stderr; Pillow's exception still
reports the failure.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import tifffile
from PIL import Image, ImageCms, ImageFile, ImageOps

from ..fsio import NotRegularFileError, open_regular
from ..messages import first_line, show_path
from .jpeg import MAX_JPEG_SCANS, count_jpeg_scans, estimate_jpeg_quality

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
_TAG_INKSET = 332
_TAG_ICC = 34675
_TAG_DNG_VERSION = 50706

# TIFF PhotometricInterpretation values.
_MINISWHITE, _MINISBLACK, _RGB, _PALETTE, _SEPARATED, _YCBCR, _CIELAB = 0, 1, 2, 3, 5, 6, 8
_INKSET_CMYK = 1
_PHOTOMETRIC_CFA = 32803
_PHOTOMETRIC_LINEAR_RAW = 34892
#: Colour samples per pixel of each accepted photometric interpretation (the rest are extra samples).
_COLOUR_SAMPLES = {_MINISWHITE: 1, _MINISBLACK: 1, _RGB: 3, _PALETTE: 1, _SEPARATED: 4, _YCBCR: 3, _CIELAB: 3}
_PHOTOMETRIC_NAMES = {0: "MinIsWhite", 1: "MinIsBlack", 2: "RGB", 3: "palette", 4: "transparency mask (MASK)",
                      5: "CMYK", 6: "YCbCr", 8: "CIELab", 9: "ICCLab", 10: "ITULab", 32803: "CFA",
                      32844: "LogL", 32845: "LogLuv", 34892: "LinearRaw", 51177: "depth map",
                      52527: "semantic mask"}
# TIFF SampleFormat values.
_UINT, _INT, _FLOAT = 1, 2, 3
_SAMPLE_FORMAT_NAMES = {1: "unsigned integer", 2: "signed integer", 3: "floating-point", 4: "undefined (void)",
                        5: "complex integer", 6: "complex floating-point"}
_ASSOCIATED_ALPHA = 1
_ALPHA_EXTRA_SAMPLES = (1, 2)  # ExtraSamples: associated (premultiplied), unassociated alpha
_MAX_SAMPLES = 16

_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_MAX_LOG_NOTES = 5
_MAX_NOTE_CHARS = 240

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
            each is also logged with ``logging.warning`` as ``"<path>: <note>"``.
        jpeg_quality: JPEG (and MPO) files only: the IJG-equivalent quality 1..100 estimated from the file's
            quantisation tables (``io.jpeg.estimate_jpeg_quality``; the closest IJG quality for other encoders'
            tables); None for every other format and for a JPEG without usable tables.
    """

    pixels: np.ndarray
    bit_depth: int
    format: str
    exif_orientation: int = 1
    icc_converted: bool = False
    warnings: tuple[str, ...] = ()
    jpeg_quality: int | None = None


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
      - EXIF orientation (all 8 values) is applied, so rows are as displayed; another value is ignored
        with a note;
      - grey (1, L, I;16) is repeated to three channels; palette (P, PA) is expanded; CMYK is converted
        with its ICC profile when it has one, naively otherwise; LAB goes through LittleCMS;
      - an alpha channel is dropped (not composited), with a warning;
      - an embedded ICC profile that does not render like sRGB (judged by content: a test image through it,
        never by its name) is converted to sRGB with LittleCMS (``PIL.ImageCms``,
        perceptual intent); if that fails, the pixels are kept as they are and a warning says so.

    Bit depth: 8-bit files give uint8. TIFFs with more than 8 bits per sample are read with tifffile and give
    uint16 (the module docstring has the policy for every TIFF sample format and layout), as do 16-bit grey
    PNGs. Pillow (13) cannot hold 16-bit RGB: it reduces a 16-bit RGB/RGBA PNG to 8 bits, so those are decoded
    with ``imagecodecs`` when it is installed (16 bits kept) and by Pillow otherwise (8 bits, with a warning).
    A TIFF whose compression tifffile cannot decode without ``imagecodecs`` (LZW, JPEG, PackBits) falls back to
    Pillow in the same way. A 16-bit image with a non-sRGB ICC profile is converted at 8 bits (LittleCMS via
    Pillow works on 8-bit RGB only), with a warning.

    Decompression-bomb guard: images with more than ``max_pixels`` pixels are refused. ``max_pixels=None``
    uses Pillow's ``Image.MAX_IMAGE_PIXELS`` (about 89 M pixels by default; ``None`` there means no limit).
    A larger ``max_pixels`` also lifts Pillow's own guard for this call (the CLI's ``--max-pixels``).

    Quiet: nothing is printed; the notes are logged (logger ``rawdiff_infer.io.decode``), each as one line
    ``"<path>: <note>"``. tifffile's log records and Python warnings of the decode become notes in ``warnings``;
    libtiff's C-level messages are silenced. Thread-safe: ``warnings.catch_warnings`` is process-global before
    Python 3.14, so there decodes in several threads run one at a time (and a warning raised by another thread
    during a decode may land in that decode's notes).

    Args:
        path: the file to read.
        max_pixels: largest accepted width * height (> 0), or None for Pillow's limit.

    Returns:
        The decoded image (see ``DecodedImage``).

    Raises:
        ImageError: missing / unreadable / empty file, not a regular file (directory, FIFO, device), a symlink
            loop, a name too long, not an image, an unsupported format or sample format, a camera RAW file (by
            suffix, or a TIFF carrying DNG / CFA data), truncated or corrupt data, NaN / infinite float
            samples, an image above the pixel limit, a JPEG of more than ``io.jpeg.MAX_JPEG_SCANS`` scans (counted
            from its markers before decoding), a TIFF compression no installed codec decodes (named).
        ValueError: ``max_pixels`` is not positive.
    """
    if max_pixels is not None and max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    name = os.fspath(path)
    shown = show_path(name)
    with _PIXEL_LIMIT_LOCK:
        pillow_limit = Image.MAX_IMAGE_PIXELS
    if max_pixels is None or (pillow_limit is not None and max_pixels <= pillow_limit):
        decoded, notes, info = _read_quietly(name, shown, pillow_limit if max_pixels is None else max_pixels)
    else:
        # Lift Pillow's own guard for this call only; our check in _decode enforces max_pixels instead.
        # Concurrent reads with the default limit wait on the lock to read the limit, so they never see this.
        with _PIXEL_LIMIT_LOCK:
            Image.MAX_IMAGE_PIXELS = max_pixels
            try:
                decoded, notes, info = _read_quietly(name, shown, max_pixels)
            finally:
                Image.MAX_IMAGE_PIXELS = pillow_limit
    pixels, bit_depth, fmt, orientation, icc_converted = decoded
    for note in notes:
        logger.warning("%s: %s", shown, note)
    return DecodedImage(pixels=pixels, bit_depth=bit_depth, format=fmt, exif_orientation=orientation,
                        icc_converted=icc_converted, warnings=tuple(notes), jpeg_quality=info.get("jpeg_quality"))


# --------------------------------------------------------------------------------------------------------
# Silence: the libraries' log records and Python warnings become notes; libtiff is muted
# --------------------------------------------------------------------------------------------------------


#: Loggers of the decoding libraries (and their children): their records during a decode become notes.
_LIBRARY_LOGGERS = ("tifffile", "PIL", "imagecodecs")


class _LibraryLogCapture(logging.Filter):
    """A filter on the decoding libraries' loggers: while the *current thread* decodes, their records are
    collected (and not handled, so no handler, nor Python's last-resort handler, prints them); records of other
    threads pass unchanged. The libraries log in the thread that calls them (tifffile decodes here with
    ``maxworkers=1``), so a thread-local sink is enough."""

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()
        self._install_lock = threading.Lock()
        self._known: int = -1

    def filter(self, record: logging.LogRecord) -> bool:
        sink: list[logging.LogRecord] | None = getattr(self._local, "sink", None)
        if sink is None:
            return True
        sink.append(record)
        return False

    def install(self) -> None:
        """Attach this filter to every library logger that exists (a logger's filters do not apply to records
        created by its children, so each child gets it too). Pillow creates its plugins' loggers when it
        imports them: ``Image.init()`` imports them all first."""
        manager = logging.Logger.manager
        if len(manager.loggerDict) == self._known:
            return
        with self._install_lock:
            Image.init()
            for name in [*_LIBRARY_LOGGERS, *list(manager.loggerDict)]:
                if name in _LIBRARY_LOGGERS or name.startswith(tuple(f"{n}." for n in _LIBRARY_LOGGERS)):
                    lg = logging.getLogger(name)
                    if self not in lg.filters:
                        lg.addFilter(self)
            self._known = len(manager.loggerDict)

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[logging.LogRecord]]:
        """Collect this thread's library records for the duration of the block (re-entrant)."""
        self.install()
        previous = getattr(self._local, "sink", None)
        sink: list[logging.LogRecord] = []
        self._local.sink = sink
        try:
            yield sink
        finally:
            self._local.sink = previous


_LOG_CAPTURE = _LibraryLogCapture()


class _LibtiffSilencer:
    """libtiff (used by Pillow for compressed TIFFs) prints its errors and warnings on the process's stderr from C.
    Within :meth:`quiet`, its global error and warning handlers are set to NULL (libtiff then prints nothing), and
    restored after; a lock keeps two decodes from interleaving the swap. Pillow's own exception still reports the
    failure. When the libtiff symbols cannot be found (a Pillow without libtiff), this does nothing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._setters: tuple[Any, Any] | None = None
        self._has_codec: Any = None
        self._resolved = False

    def _resolve(self) -> tuple[Any, Any] | None:
        if not self._resolved:
            self._resolved = True
            try:
                import ctypes

                from PIL import _imaging

                lib = ctypes.CDLL(_imaging.__file__)  # dlsym searches its dependencies: Pillow's libtiff
                setters = (lib.TIFFSetErrorHandler, lib.TIFFSetWarningHandler)
                for fn in setters:
                    fn.restype, fn.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
                self._setters = setters
                has_codec = lib.TIFFIsCODECConfigured
                has_codec.restype, has_codec.argtypes = ctypes.c_int, [ctypes.c_uint16]
                self._has_codec = has_codec
            except (ImportError, OSError, AttributeError):
                logger.debug("libtiff handlers not found: libtiff messages are not silenced", exc_info=True)
        return self._setters

    def decodes(self, compression: int) -> bool:
        """True when Pillow's libtiff has a codec for TIFF ``compression`` (``TIFFIsCODECConfigured``; True when
        libtiff cannot be asked: Pillow then judges the file itself)."""
        with self._lock:
            self._resolve()
        if self._has_codec is None or not 0 <= compression <= 0xFFFF:
            return self._has_codec is None
        return bool(self._has_codec(compression))

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        with self._lock:
            setters = self._resolve()
            if setters is None:
                yield
                return
            previous = [fn(None) for fn in setters]
            try:
                yield
            finally:
                for fn, handler in zip(setters, previous, strict=True):
                    fn(handler)


_LIBTIFF = _LibtiffSilencer()


#: ``warnings.catch_warnings`` swaps process-global state before Python 3.14 (without context-aware warnings):
#: two threads inside it at once can leave the other's recorder installed for good. Decodes then run one at a
#: time.
_SERIAL_DECODES = not getattr(sys.flags, "context_aware_warnings", False)
_DECODE_LOCK = threading.Lock()


def _read_quietly(name: str, shown: str, limit: int | None) -> tuple[_Decoded, list[str], dict[str, Any]]:
    """Open and decode ``name`` with every library message captured; returns the result, its notes
    (deduplicated, one line each) and what the decoders found about the file (``jpeg_quality``). Raises
    ImageError, with the captured messages discarded."""
    notes: list[str] = []
    info: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(_DECODE_LOCK if _SERIAL_DECODES else contextlib.nullcontext())
        records = stack.enter_context(_LOG_CAPTURE.capture())
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        stack.enter_context(np.errstate(all="ignore"))
        fh, size = _open_input(name, shown)
        with fh:
            decoded = _decode(fh, shown, size, limit, notes, info)
    notes += _log_notes(records)
    notes += _warning_notes(caught)
    return decoded, list(dict.fromkeys(notes)), info


def _warning_notes(caught: list[warnings.WarningMessage]) -> list[str]:
    """Python warnings (Pillow's corrupt EXIF, numpy's, ...) as notes; the decompression-bomb warning is left
    out (the pixel limit is checked, and reported, by this module)."""
    return [_note(str(w.message)) for w in caught if not issubclass(w.category, Image.DecompressionBombWarning)]


_TIFFFILE_REWRITES = (
    (re.compile(r"<tifffile\.TiffTag (\d+) @\d+>"), r"tag \1"),
    (re.compile(r"<tifffile\.TiffPage (\d+) @\d+>"), r"page \1"),
    (re.compile(r"<tifffile\.\w+(?: [^>]*)?>\s*"), ""),
    (re.compile(r"<\w+(?:\.\w+)*>\s*"), ""),  # a function's name, e.g. <TiffTag.fromfile>
)
_TIFFFILE_RAISED = re.compile(r"^(.*?)\s*raised \w+\((['\"])(.*)\2\)$")
#: tifffile's complaints that a tag value is not in its enumeration: the values that matter (orientation,
#: photometric, sample format) are judged, and reported, by this module itself.
_TIFFFILE_ENUM = re.compile(r"is not a valid [A-Z_]+\b")


def _log_notes(records: list[logging.LogRecord]) -> list[str]:
    """The libraries' warnings and errors as notes (tifffile's as "TIFF: <problem>"), at most a few plus a
    count; debug and info records are dropped."""
    texts = []
    for r in records:
        if r.levelno < logging.WARNING:
            continue
        try:
            text = first_line(r.getMessage())
        except Exception:  # noqa: BLE001 - a record whose arguments do not format
            text = first_line(str(r.msg))
        if r.name.split(".")[0] != "tifffile":
            texts.append(_note(text))
        elif not _TIFFFILE_ENUM.search(text):
            texts.append(_note("TIFF: " + (_tifffile_text(text) or "structure problem")))
    texts = list(dict.fromkeys(texts))
    if len(texts) > _MAX_LOG_NOTES:
        more = len(texts) - _MAX_LOG_NOTES
        texts = texts[:_MAX_LOG_NOTES] + [f"{more} more decoder messages ignored"]
    return texts


def _tifffile_text(text: str) -> str:
    """A tifffile log message without object reprs: "<tifffile.TiffTag 270 @70> invalid value offset 212"
    -> "tag 270 invalid value offset 212"; "X raised ValueError('why')" -> "X: why"."""
    for pattern, repl in _TIFFFILE_REWRITES:
        text = pattern.sub(repl, text)
    m = _TIFFFILE_RAISED.match(text.strip())
    if m:
        text = f"{m.group(1)}: {m.group(3)}" if m.group(1) else m.group(3)
        for pattern, repl in _TIFFFILE_REWRITES:
            text = pattern.sub(repl, text)
    return text.strip()


def _note(text: str) -> str:
    """One line, at most ``_MAX_NOTE_CHARS`` characters."""
    line = first_line(text)
    return line if len(line) <= _MAX_NOTE_CHARS else line[: _MAX_NOTE_CHARS - 3] + "..."


# --------------------------------------------------------------------------------------------------------
# Opening: regular files only, camera RAW refused
# --------------------------------------------------------------------------------------------------------


def _open_input(name: str, shown: str) -> tuple[BinaryIO, int]:
    """Open ``name`` for reading (regular files only, without blocking) and refuse what is not a photo.

    Returns the open file (at offset 0) and its size in bytes. Raises ImageError for a missing, unreadable,
    empty or non-regular file and for camera RAW (by suffix or by content).
    """
    try:
        fh = open_regular(name)
    except NotRegularFileError as exc:
        raise ImageError(f"{shown}: {exc.strerror}") from None
    except OSError as exc:
        raise ImageError(f"{shown}: {_os_error_reason(exc)}") from None
    try:
        size = os.fstat(fh.fileno()).st_size
        if Path(name).suffix.lower() in RAW_SUFFIXES:
            raise ImageError(f"{shown}: {_RAW_REFUSAL}")
        if size == 0:
            raise ImageError(f"{shown}: empty file (0 bytes)")
        head = _read_head(fh, shown, 64)
        if _raw_by_magic(head):
            raise ImageError(f"{shown}: {_RAW_REFUSAL}")
    except BaseException:
        fh.close()
        raise
    return fh, size


def _os_error_reason(exc: OSError) -> str:
    """The problem an OSError from opening or reading an input names, in a few words."""
    reasons = {
        errno.ENOENT: "no such file",
        errno.ENOTDIR: "no such file (a parent is not a directory)",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ELOOP: "too many levels of symbolic links (a symlink loop?)",
        errno.ENAMETOOLONG: "file name too long",
        errno.EISDIR: "is a directory, not an image file",
    }
    if exc.errno in reasons:
        return reasons[exc.errno]
    return f"cannot read file ({first_line(exc.strerror or exc)})"


def _read_head(fh: BinaryIO, shown: str, n: int) -> bytes:
    """The first ``n`` bytes (fewer for a short file); the file is left at offset 0."""
    try:
        fh.seek(0)
        head = fh.read(n)
        fh.seek(0)
    except OSError as exc:
        raise ImageError(f"{shown}: {_os_error_reason(exc)}") from None
    return head


def _raw_by_magic(head: bytes) -> bool:
    """Camera RAW by its first bytes: vendor magic numbers (RAF, X3F, ORF, RW2, CR3, CR2)."""
    if head.startswith((b"FUJIFILMCCD-RAW", b"FOVb", b"IIRO", b"IIRS", b"MMOR", b"IIU\x00")):
        return True
    if head[4:8] == b"ftyp" and head[8:12] == b"crx ":
        return True
    return head.startswith(_TIFF_MAGICS) and head[8:10] == b"CR"


_MAGICS = (("JPEG", b"\xff\xd8\xff"), ("PNG", b"\x89PNG\r\n\x1a\n"), ("TIFF", b"II*\x00"), ("TIFF", b"MM\x00*"),
           ("TIFF", b"II+\x00"), ("TIFF", b"MM\x00+"), ("WebP", b"RIFF"))


def _format_by_magic(head: bytes) -> str | None:
    """The accepted format a file's first bytes claim, if any."""
    for fmt, magic in _MAGICS:
        if head.startswith(magic) and (fmt != "WebP" or head[8:12] == b"WEBP"):
            return fmt
    return None


def _format_by_partial_magic(head: bytes) -> str | None:
    """The format whose magic number a file too short to hold it begins with (a file cut inside its magic)."""
    for fmt, magic in _MAGICS:
        if 0 < len(head) < len(magic) and magic.startswith(head):
            return fmt
    if head.startswith(b"RIFF") and len(head) < 12 and b"WEBP".startswith(head[8:]):
        return "WebP"
    return None


def _webp_cut(head: bytes, size: int) -> bool:
    """True when a WebP's RIFF header declares more bytes than the file has."""
    return len(head) >= 8 and 8 + int.from_bytes(head[4:8], "little") > size


# --------------------------------------------------------------------------------------------------------
# Decoding: dispatch and error mapping
# --------------------------------------------------------------------------------------------------------


def _decode(fh: BinaryIO, shown: str, size: int, limit: int | None, notes: list[str],
            info: dict[str, Any] | None = None) -> _Decoded:
    """Decode the open file; map every decoder failure to ImageError. ``info`` receives ``jpeg_quality``."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        notes.append("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set by some code: truncated data may go unnoticed")
    head = _read_head(fh, shown, 16)
    claimed = _format_by_magic(head)
    fmt = claimed or "image"
    cut = claimed == "WebP" and _webp_cut(head, size)
    try:
        if claimed == "TIFF":
            return _decode_tiff(fh, shown, size, limit, notes)
        return _decode_pillow(fh, shown, limit, notes, info=info)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(_bomb_message(shown, str(exc))) from None
    except Image.UnidentifiedImageError:
        if cut:
            raise ImageError(f"{shown}: truncated WebP data") from None
        if claimed:
            raise ImageError(f"{shown}: truncated or corrupt {claimed} header") from None
        partial = _format_by_partial_magic(head)
        if partial:
            unit = "byte" if size == 1 else "bytes"
            raise ImageError(f"{shown}: truncated {partial} header (the file has only {size} {unit})") from None
        raise ImageError(f"{shown}: not an image (unrecognised format)") from None
    except MemoryError:
        raise ImageError(f"{shown}: not enough memory to decode this image") from None
    except OSError as exc:
        if exc.errno is not None:  # a read error from the system, not a decoder's complaint
            raise ImageError(f"{shown}: {_os_error_reason(exc)}") from None
        raise _corrupt(shown, fmt, exc, cut=cut) from None
    except Exception as exc:  # noqa: BLE001 - the decoders raise SyntaxError, ValueError, zlib.error, ...
        raise _corrupt(shown, fmt, exc, cut=cut) from None


def _corrupt(shown: str, fmt: str, exc: BaseException, *, cut: bool = False) -> ImageError:
    """A decoder's exception as 'truncated <fmt> data' (also when ``cut``: the container declares more bytes
    than the file has) or 'corrupt <fmt> data (<reason>)'."""
    msg = _note(first_line(exc))
    if cut or "truncated" in msg.lower() or isinstance(exc, EOFError):
        return ImageError(f"{shown}: truncated {fmt} data")
    return ImageError(f"{shown}: corrupt {fmt} data ({msg})")


def _check_pixels(shown: str, size: tuple[int, ...], limit: int | None) -> None:
    """Refuse an image with no pixels or with more than ``limit`` (width * height [* depth])."""
    dims = [int(s) for s in size]
    count = int(np.prod(dims, dtype=object))
    text = "x".join(str(d) for d in dims)
    if count <= 0:
        raise ImageError(f"{shown}: the image has no pixels ({text})")
    if limit is not None and count > limit:
        raise ImageError(_bomb_message(shown, f"{text} = {count} pixels, above the limit of {limit}"))


def _bomb_message(shown: str, detail: str) -> str:
    return (f"{shown}: image too large for the decompression-bomb guard ({first_line(detail).rstrip('.')}); "
            "raise the limit with --max-pixels if you trust this file")


# --------------------------------------------------------------------------------------------------------
# TIFF
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TiffLayout:
    """What the first page of a TIFF declares (tifffile's reading of its tags).

    Attributes:
        photometric: PhotometricInterpretation code (0 MinIsWhite, 1 MinIsBlack, 2 RGB, 3 palette, ...).
        sample_format: SampleFormat code (1 unsigned, 2 signed, 3 float, 4 void, 5/6 complex).
        bits: BitsPerSample (1..64).
        samples: SamplesPerPixel, colour and extra samples together.
        extra: ExtraSamples codes (0 unspecified, 1 associated alpha, 2 unassociated alpha), one per extra.
        width, height: pixels; depth: ImageDepth (> 1 for a volumetric page).
        inkset: InkSet of a separated image (1 CMYK, the default; 2 other inks).
    """

    photometric: int
    sample_format: int
    bits: int
    samples: int
    extra: tuple[int, ...]
    width: int
    height: int
    depth: int
    inkset: int = 1

    @classmethod
    def of(cls, page: tifffile.TiffPage) -> _TiffLayout:
        return cls(photometric=int(page.photometric), sample_format=int(page.sampleformat),
                   bits=int(page.bitspersample), samples=int(page.samplesperpixel),
                   extra=tuple(int(e) for e in page.extrasamples), width=int(page.imagewidth),
                   height=int(page.imagelength), depth=int(page.imagedepth), inkset=_tag_int(page, _TAG_INKSET, 1))

    @property
    def colour_samples(self) -> int:
        """Colour samples per pixel (1 grey / palette, 3 RGB / YCbCr / CIELab, 4 CMYK)."""
        return _COLOUR_SAMPLES[self.photometric]

    @property
    def mode_name(self) -> str:
        return _PHOTOMETRIC_NAMES.get(self.photometric, "unknown")

    def for_pillow(self) -> bool:
        """True for what Pillow (libtiff) decodes at 8 bits without loss: unsigned samples of at most 8 bits,
        one page slice, the colour samples plus at most one extra (alpha, or one unspecified it drops)."""
        return (self.sample_format == _UINT and self.bits <= 8 and self.depth == 1
                and self.samples <= self.colour_samples + 1
                and not (self.photometric == _SEPARATED and self.samples != 4))


def _tag_int(page: tifffile.TiffPage, code: int, default: int) -> int:
    """A tag's value as an int (the first of several); ``default`` when absent or not a number."""
    tag = page.tags.get(code)
    if tag is None:
        return default
    value = tag.value
    try:
        return int(value[0] if isinstance(value, (tuple, list)) else value)
    except (TypeError, ValueError, IndexError):
        return default


def _decode_tiff(fh: BinaryIO, shown: str, size: int, limit: int | None, notes: list[str]) -> _Decoded:
    """A TIFF: inspect it with tifffile, refuse what has no meaning as a photo, decode it with Pillow or tifffile
    (see the module docstring). A file tifffile cannot parse is left to Pillow to judge."""
    try:
        tif = tifffile.TiffFile(fh, name="input.tif")
    except Exception as exc:  # noqa: BLE001 - tifffile cannot parse it: Pillow (libtiff) may
        logger.debug("tifffile cannot parse %s", shown, exc_info=True)
        return _decode_pillow(fh, shown, limit, notes, tiff_reason=_note(first_line(exc)))
    with tif:
        page, layout = _inspect_tiff(shown, tif, size, limit, notes)
        if layout.for_pillow() and _LIBTIFF.decodes(int(page.compression)):
            decoded = _tiff_by_pillow(fh, shown, layout, limit, notes)
            if decoded is not None:
                return decoded
        return _decode_tiff_array(fh, shown, tif, page, layout, limit, notes)


def _inspect_tiff(shown: str, tif: tifffile.TiffFile, size: int, limit: int | None,
                  notes: list[str]) -> tuple[tifffile.TiffPage, _TiffLayout]:
    """The first page and its layout; ImageError for no page, camera RAW, a refused layout, data beyond the end
    of the file or too many pixels. Notes a multi-page file."""
    if not tif.pages:
        raise ImageError(f"{shown}: truncated or corrupt TIFF header (no readable image directory)")
    page = tif.pages.first
    if _tiff_is_raw(tif, page):
        raise ImageError(f"{shown}: {_RAW_REFUSAL}")
    layout = _TiffLayout.of(page)
    _refuse_tiff_layout(shown, layout)
    if any(o + c > size for o, c in zip(page.dataoffsets, page.databytecounts, strict=False)):
        # caught here, before libtiff (via Pillow) reads beyond the end of the file
        raise ImageError(f"{shown}: truncated TIFF data")
    _check_pixels(shown, (layout.width, layout.height) + ((layout.depth,) if layout.depth > 1 else ()), limit)
    if len(tif.pages) > 1:
        notes.append(f"{len(tif.pages)} frames/pages: using the first")
    return page, layout


def _tiff_by_pillow(fh: BinaryIO, shown: str, layout: _TiffLayout, limit: int | None,
                    notes: list[str]) -> _Decoded | None:
    """Pillow's decoding of an 8-bit TIFF; None when Pillow cannot open it (e.g. a big-endian BigTIFF), for
    tifffile to decode instead; the failed attempt's notes and warnings are then dropped."""
    attempt: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            decoded = _decode_pillow(fh, shown, limit, attempt, tiff_extra=_extra_sample_note(layout))
        except Image.UnidentifiedImageError:
            if layout.photometric in (_YCBCR, _CIELAB):  # no tifffile path for these
                raise
            logger.debug("Pillow cannot open %s; decoding with tifffile", shown)
            return None
    notes.extend(attempt + _warning_notes(caught))
    return decoded


def _tiff_is_raw(tif: tifffile.TiffFile, page: tifffile.TiffPage) -> bool:
    """True when IFD0 or one of its first SubIFDs holds DNG or CFA / LinearRaw data."""
    try:
        pages = [page]
        subifds = page.tags.get(_TAG_SUBIFDS)
        for offset in (subifds.value if subifds is not None else ())[:8]:
            tif.filehandle.seek(offset)
            pages.append(tifffile.TiffPage(tif, index=(0, len(pages) - 1)))
    except Exception:  # noqa: BLE001 - unreadable SubIFDs: judge by IFD0 alone
        logger.debug("unreadable SubIFDs", exc_info=True)
    return any(_TAG_DNG_VERSION in p.tags
               or int(p.photometric) in (_PHOTOMETRIC_CFA, _PHOTOMETRIC_LINEAR_RAW) for p in pages)


def _refuse_tiff_layout(shown: str, layout: _TiffLayout) -> None:
    """Raise ImageError for a sample format, photometric mode or sample count that is not a photo."""
    fmt_name = _SAMPLE_FORMAT_NAMES.get(layout.sample_format, f"SampleFormat {layout.sample_format}")
    if layout.sample_format == _INT:
        raise ImageError(f"{shown}: {layout.bits}-bit signed integer TIFF samples have no standard meaning for a "
                         "photo; save it with unsigned integer (8/16-bit) or float ([0, 1]) samples")
    if layout.sample_format not in (_UINT, _FLOAT):
        raise ImageError(f"{shown}: {layout.bits}-bit {fmt_name} TIFF samples are not supported; "
                         "save it with unsigned integer (8/16-bit) or float samples")
    if layout.photometric not in _COLOUR_SAMPLES:
        raise ImageError(f"{shown}: TIFF photometric interpretation {layout.mode_name} ({layout.photometric}) "
                         "is not supported; give an RGB, greyscale, palette, CMYK or YCbCr image")
    if layout.samples > _MAX_SAMPLES:
        raise ImageError(f"{shown}: {layout.samples} samples per pixel is not a photo (at most {_MAX_SAMPLES} "
                         "are supported)")
    if layout.samples < layout.colour_samples:
        raise ImageError(f"{shown}: malformed TIFF: {layout.mode_name} needs {layout.colour_samples} samples per "
                         f"pixel, the file declares {layout.samples}")
    if layout.photometric == _SEPARATED and layout.inkset != _INKSET_CMYK:
        raise ImageError(f"{shown}: separated TIFF with InkSet {layout.inkset} (inks other than CMYK) is not "
                         "supported; give a CMYK or RGB image")
    if layout.photometric == _PALETTE and layout.sample_format != _UINT:
        raise ImageError(f"{shown}: malformed TIFF: palette indices must be unsigned integers, not {fmt_name}")
    if layout.photometric in (_YCBCR, _CIELAB) and not layout.for_pillow():
        if layout.sample_format != _UINT or layout.bits > 8:
            why = f"{layout.bits}-bit {fmt_name} samples"
        else:
            why = f"{layout.samples} samples per pixel" if layout.depth == 1 else f"ImageDepth {layout.depth}"
        raise ImageError(f"{shown}: {layout.mode_name} TIFF with {why} is not supported (only 8-bit samples, "
                         "at most one extra); convert it to RGB")


def _extra_sample_note(layout: _TiffLayout) -> str | None:
    """A note for the extra samples that are not alpha (alpha has its own note), or None when there are none."""
    extra = layout.samples - layout.colour_samples
    kinds = list(layout.extra[:extra]) + [0] * (extra - len(layout.extra))
    other = sum(1 for k in kinds if k not in _ALPHA_EXTRA_SAMPLES)
    if other <= 0:
        return None
    plural = "s" if other > 1 else ""
    return (f"{other} extra sample{plural} per pixel dropped (kept the {layout.colour_samples} "
            f"{layout.mode_name} sample{'s' if layout.colour_samples > 1 else ''})")


def _has_alpha(layout: _TiffLayout) -> bool:
    """True when one of the extra samples is declared alpha (associated or not)."""
    return any(k in _ALPHA_EXTRA_SAMPLES for k in layout.extra)


def _decode_tiff_array(fh: BinaryIO, shown: str, tif: tifffile.TiffFile, page: tifffile.TiffPage,
                       layout: _TiffLayout, limit: int | None, notes: list[str]) -> _Decoded:
    """Decode the first page with tifffile: colour samples kept, scaled to 8 or 16 bits, oriented, ICC applied.
    Falls back to Pillow (at 8 bits, with a note) when tifffile lacks the codec and Pillow can decode it."""
    _refuse_missing_codec(shown, int(page.compression))
    try:
        arr = page.asarray(maxworkers=1)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. LZW without imagecodecs: Pillow may still read it
        pil = _pillow_fallback(fh, shown, limit, notes, exc)
        if pil is None:
            raise
        return pil
    arr = _samples_last(shown, arr, page.axes, layout, notes)
    colour = layout.colour_samples
    if arr.shape[2] > colour:
        if _has_alpha(layout):
            notes.append("alpha channel dropped (transparency is ignored)")
        if layout.extra[:1] == (_ASSOCIATED_ALPHA,) and layout.photometric != _PALETTE:
            arr = _unpremultiply(arr, colour, layout.bits)
        extra_note = _extra_sample_note(layout)
        if extra_note:
            notes.append(extra_note)
        arr = arr[..., :colour]
    icc = _tiff_icc(page, notes)
    orientation = _tiff_orientation(page, notes)
    if layout.photometric == _PALETTE:
        arr = _palette_lookup(shown, arr[..., 0], page.colormap)
    else:
        arr = _full_range(shown, arr, layout.bits, notes)
    if layout.photometric == _MINISWHITE:
        arr = np.iinfo(arr.dtype).max - arr
    if layout.photometric == _SEPARATED:
        rgb, converted = _cmyk_to_rgb(arr, icc, notes)
        if converted:
            return _finish_array(shown, rgb, "TIFF", orientation, None, notes, icc_converted=True)
        arr, icc = rgb, None  # the naive conversion's result is taken as sRGB; the CMYK profile no longer fits
    return _finish_array(shown, arr, "TIFF", orientation, icc, notes)


def _refuse_missing_codec(shown: str, compression: int) -> None:
    """ImageError naming the codec when neither tifffile (with imagecodecs, if installed) nor Pillow's libtiff can
    decode TIFF ``compression``: the file is not corrupt, this installation lacks its codec."""
    if compression in tifffile.TIFF.DECOMPRESSORS or _LIBTIFF.decodes(compression):
        return
    try:
        name = tifffile.COMPRESSION(compression).name
    except ValueError:
        name = "unknown"
    try:
        import imagecodecs  # noqa: F401 - optional: tifffile's codecs
        fix = "neither imagecodecs nor Pillow's libtiff has that codec"
    except ImportError:
        fix = "install imagecodecs (pip install imagecodecs), which has most TIFF codecs"
    raise ImageError(f"{shown}: TIFF compression {name} ({compression}) cannot be decoded here: {fix}; or save the "
                     "TIFF uncompressed, or with LZW or Deflate")


def _pillow_fallback(fh: BinaryIO, shown: str, limit: int | None, notes: list[str],
                     exc: Exception) -> _Decoded | None:
    """Pillow's 8-bit decoding of a TIFF whose data tifffile could not decode (a codec it lacks); None when
    Pillow cannot decode it either (the caller then reports tifffile's reason)."""
    fallback: list[str] = []
    try:
        decoded = _decode_pillow(fh, shown, limit, fallback)
    except Exception:  # noqa: BLE001 - Pillow cannot either: report tifffile's reason
        logger.debug("Pillow fallback failed for %s", shown, exc_info=True)
        return None
    notes.append(_note(f"TIFF read at 8 bits by Pillow (tifffile: {first_line(exc)})"))
    notes.extend(n for n in fallback if "frames/pages" not in n)
    return decoded


def _unpremultiply(arr: np.ndarray, colour: int, bits: int) -> np.ndarray:
    """Undo associated (premultiplied) alpha: the colour samples ``[..., :colour]`` become ``c * M / a`` where
    0 < a < M (M = 2**bits - 1, or 1 for float), rounded and clipped to [0, M]; the sample after them is the
    alpha. Pixels with a = 0 or a = M are kept as they are (as Pillow does for 8-bit RGBa)."""
    top = 1.0 if arr.dtype.kind == "f" else float((1 << bits) - 1 if 0 < bits < 64 else np.iinfo(arr.dtype).max)
    work = np.dtype(np.float64 if arr.dtype.itemsize > 2 else np.float32)  # float32: exact enough to 16 bits
    alpha: np.ndarray = arr[..., colour:colour + 1].astype(work)
    partial = np.greater(alpha, 0) & np.less(alpha, top)
    scaled: np.ndarray = np.divide(np.multiply(arr[..., :colour].astype(work), top, dtype=work),
                                   np.where(partial, alpha, 1), dtype=work)
    if arr.dtype.kind != "f":
        scaled = np.clip(np.rint(scaled), 0, top)
    else:
        scaled = np.minimum(scaled, top)
    out = arr.copy()
    out[..., :colour] = np.where(partial, scaled, arr[..., :colour]).astype(arr.dtype)
    return out


def _samples_last(shown: str, arr: np.ndarray, axes: str, layout: _TiffLayout, notes: list[str]) -> np.ndarray:
    """tifffile's page array (axes among Z, Y, X, S in any order) -> H x W x S; a volume gives its first
    slice, with a note."""
    if set(axes) - set("ZYXS") or arr.ndim != len(axes):
        raise ImageError(f"{shown}: unsupported TIFF layout (axes {axes}, array shape {arr.shape})")
    if "Z" in axes:
        notes.append(f"volumetric TIFF (ImageDepth {layout.depth}): using the first slice")
        arr = np.take(arr, 0, axis=axes.index("Z"))
        axes = axes.replace("Z", "")
    if "S" not in axes:
        arr, axes = arr[..., None], axes + "S"
    return arr.transpose([axes.index(a) for a in "YXS"])


def _full_range(shown: str, arr: np.ndarray, bits: int, notes: list[str]) -> np.ndarray:
    """Samples -> uint8 (at most 8 bits per sample) or uint16 (more, or float), full range kept.

    Unsigned b-bit code values v (0 .. 2**b - 1) become ``round(v * M / (2**b - 1))`` with M = 255 or 65535;
    bool (1-bit) gives 0 / 255; float goes through :func:`_float_to_uint16`.
    """
    if arr.dtype.kind == "b":
        return arr.astype(np.uint8) * np.uint8(255)
    if arr.dtype.kind == "f":
        return _float_to_uint16(shown, arr, notes)
    if arr.dtype.kind != "u":
        raise ImageError(f"{shown}: unsupported TIFF sample type {arr.dtype}")
    out_dtype = np.uint8 if bits <= 8 else np.uint16
    top_in = (1 << bits) - 1 if 0 < bits < 64 else int(np.iinfo(arr.dtype).max)
    top_out = int(np.iinfo(out_dtype).max)
    if top_in == top_out:
        return arr.astype(out_dtype, copy=False)
    if bits > 16:
        notes.append(f"{bits}-bit unsigned integer samples rescaled to 16 bits (full range)")
        scaled = np.rint(arr.astype(np.float64) * (top_out / top_in))
    else:  # exact integer rounding for 1..15 bits
        scaled = (arr.astype(np.uint32) * top_out + top_in // 2) // top_in
    return np.clip(scaled, 0, top_out).astype(out_dtype)


def _float_to_uint16(shown: str, arr: np.ndarray, notes: list[str]) -> np.ndarray:
    """Float samples, taken as sRGB-encoded values in [0, 1] -> uint16 ``round(v * 65535)``.

    Values outside [0, 1] are clipped with a note; any NaN or infinity refuses the image (ImageError).
    """
    values = arr.astype(np.float32, copy=False)  # float16 * 65535 would overflow; float64 is not needed
    finite = np.isfinite(values)
    if not finite.all():
        nan = int(np.isnan(values).sum())
        inf = int(values.size - finite.sum()) - nan
        raise ImageError(f"{shown}: floating-point image holds {nan} NaN and {inf} infinite sample values "
                         f"(of {values.size}); refused")
    outside = int(np.count_nonzero((values < 0) | (values > 1)))
    if outside:
        notes.append(f"{outside} of {values.size} floating-point samples outside [0, 1] (min {values.min():.4g}, "
                     f"max {values.max():.4g}) clipped")
    notes.append("floating-point samples taken as sRGB-encoded values in [0, 1] and stored as 16 bits")
    return np.rint(np.clip(values, 0.0, 1.0) * np.float32(65535.0)).astype(np.uint16)


def _palette_lookup(shown: str, index: np.ndarray, colormap: np.ndarray | None) -> np.ndarray:
    """Palette indices H x W -> uint16 RGB H x W x 3 through the TIFF ColorMap (3 x 2**bits, 16-bit values)."""
    if colormap is None or colormap.ndim != 2 or colormap.shape[0] != 3:
        raise ImageError(f"{shown}: malformed TIFF: a palette image without a valid colour map")
    if index.size and int(index.max()) >= colormap.shape[1]:
        raise ImageError(f"{shown}: malformed TIFF: palette index {int(index.max())} beyond the "
                         f"{colormap.shape[1]}-entry colour map")
    return np.moveaxis(colormap.astype(np.uint16)[:, index], 0, -1)


def _cmyk_to_rgb(arr: np.ndarray, icc: bytes | None, notes: list[str]) -> tuple[np.ndarray, bool]:
    """uint8/uint16 CMYK H x W x 4 -> RGB H x W x 3 and whether the ICC profile was used.

    With a readable CMYK ICC profile: LittleCMS at 8 bits (uint8 result). Otherwise the naive conversion
    ``R = (M - C) (M - K) / M`` (Pillow's) at the input's depth, with a note.
    """
    top = np.iinfo(arr.dtype).max
    if icc:
        arr8 = arr if arr.dtype == np.uint8 else ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        converted, ok = _apply_icc(Image.fromarray(np.ascontiguousarray(arr8), mode="CMYK"), icc, notes)
        if ok:
            if arr.dtype != np.uint8:
                notes.append("16-bit CMYK converted to sRGB through its ICC profile at 8 bits")
            return np.asarray(converted.convert("RGB")), True
    notes.append("CMYK converted to RGB without a colour profile (approximate colours)")
    wide = arr.astype(np.uint64)
    k = top - wide[..., 3:4]
    rgb = ((top - wide[..., :3]) * k + top // 2) // top
    return rgb.astype(arr.dtype), False


def _tiff_orientation(page: tifffile.TiffPage, notes: list[str]) -> int:
    """The Orientation tag (1..8); a missing one is 1, an invalid one is ignored with a note."""
    tag = page.tags.get(_TAG_ORIENTATION)
    if tag is None:
        return 1
    try:
        value = int(tag.value)
    except (TypeError, ValueError):
        notes.append(_note(f"unreadable EXIF orientation {tag.value!r} ignored"))
        return 1
    return _valid_orientation(value, notes)


def _valid_orientation(value: int, notes: list[str]) -> int:
    """``value`` if it is an EXIF orientation (1..8), else 1 with a note."""
    if not 1 <= value <= 8:
        notes.append(f"invalid EXIF orientation {value} ignored")
        return 1
    return value


def _tiff_icc(page: tifffile.TiffPage, notes: list[str]) -> bytes | None:
    """The embedded ICC profile's bytes, or None (a tag of the wrong type is ignored with a note)."""
    tag = page.tags.get(_TAG_ICC)
    if tag is None:
        return None
    try:
        return bytes(tag.value)
    except (TypeError, ValueError):
        notes.append("unreadable ICC profile tag ignored; colours may be off")
        return None


# --------------------------------------------------------------------------------------------------------
# Arrays (tifffile, imagecodecs, Pillow I;16) -> DecodedImage fields
# --------------------------------------------------------------------------------------------------------


def _finish_array(shown: str, arr: np.ndarray, fmt: str, orientation: int, icc: bytes | None,
                  notes: list[str], *, icc_converted: bool = False) -> _Decoded:
    """uint8 / uint16 H x W [x C] (C = 1..4; 2 and 4 end in alpha) -> oriented, alpha-free sRGB H x W x 3.

    A non-sRGB ICC profile is applied at 8 bits (a uint16 result then becomes uint8, bit depth 8).
    """
    if arr.ndim == 3 and arr.shape[2] in (2, 4):
        notes.append("alpha channel dropped (transparency is ignored)")
        arr = arr[..., : arr.shape[2] - 1]
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)) or arr.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"{shown}: unsupported {fmt} layout (array shape {arr.shape}, {arr.dtype})")
    arr = _orient(arr, orientation)
    if icc and not _is_srgb_profile(icc):
        arr8 = arr if arr.dtype == np.uint8 else ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        converted, ok = _apply_icc(Image.fromarray(np.ascontiguousarray(arr8)), icc, notes)
        if ok:
            if arr.dtype == np.uint16:
                notes.append("16-bit image with a non-sRGB ICC profile converted to sRGB at 8 bits")
            return np.ascontiguousarray(np.asarray(converted.convert("RGB"))), 8, fmt, orientation, True
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    depth = 8 if arr.dtype == np.uint8 else 16
    return np.ascontiguousarray(arr), depth, fmt, orientation, icc_converted


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


# --------------------------------------------------------------------------------------------------------
# Pillow (JPEG, PNG, WebP, 8-bit TIFF) and 16-bit colour PNG (imagecodecs)
# --------------------------------------------------------------------------------------------------------


def _decode_pillow(fh: BinaryIO, shown: str, limit: int | None, notes: list[str], *,
                   tiff_reason: str | None = None, tiff_extra: str | None = None,
                   info: dict[str, Any] | None = None) -> _Decoded:
    """Open with Pillow, check the format and the pixel limit, decode.

    ``info``: receives ``jpeg_quality`` (estimated from the quantisation tables) for a JPEG.

    ``tiff_reason``: why tifffile could not parse this TIFF (named if Pillow cannot identify it either).
    ``tiff_extra``: a note about an extra sample Pillow will drop silently.
    """
    fh.seek(0)
    try:
        img_cm = Image.open(fh)
    except Image.UnidentifiedImageError:
        if tiff_reason:
            raise ImageError(f"{shown}: truncated or corrupt TIFF header ({tiff_reason})") from None
        raise
    with img_cm as img:
        fmt = _ACCEPTED_FORMATS.get(img.format or "", img.format or "image")
        if img.format not in _ACCEPTED_FORMATS:
            raise ImageError(f"{shown}: unsupported image format {img.format}; give a JPEG, PNG, TIFF or WebP file")
        _check_pixels(shown, img.size, limit)
        if img.format != "TIFF" or tiff_reason:  # tifffile counted a parsed TIFF's pages already
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                notes.append(f"{frames} frames/pages: using the first")
        if fmt == "JPEG":
            _refuse_scan_bomb(fh, shown)
        if img.format == "PNG":
            png16 = _decode_png16(fh, shown, img, notes)
            if png16 is not None:
                return png16
        with _LIBTIFF.quiet() if img.format == "TIFF" else contextlib.nullcontext():
            img.load()
        if info is not None and fmt == "JPEG":
            info["jpeg_quality"] = estimate_jpeg_quality(getattr(img, "quantization", None))
        if tiff_extra:
            notes.append(tiff_extra)
        return _from_pillow(shown, img, fmt, notes)


def _refuse_scan_bomb(fh: BinaryIO, shown: str) -> None:
    """ImageError for a JPEG of more than ``MAX_JPEG_SCANS`` scans (libjpeg walks every block once per scan: a
    small file of thousands of scans takes minutes); counted from the markers before any decoding."""
    pos = fh.tell()
    fh.seek(0)
    data = fh.read()
    fh.seek(pos)
    if count_jpeg_scans(data, stop_above=MAX_JPEG_SCANS) > MAX_JPEG_SCANS:
        raise ImageError(f"{shown}: JPEG with more than {MAX_JPEG_SCANS} scans refused (decoding it would take "
                         "minutes; a progressive JPEG has about 10)")


def _decode_png16(fh: BinaryIO, shown: str, img: Image.Image, notes: list[str]) -> _Decoded | None:
    """A 16-bit colour (RGB, grey + alpha, RGBA) PNG with imagecodecs, 16 bits kept; None to let Pillow do it
    (8-bit, palette, 16-bit grey which Pillow keeps as I;16, or imagecodecs missing)."""
    head = _read_head(fh, shown, 26)
    if len(head) < 26 or head[24] != 16 or head[25] not in (2, 4, 6):
        return None
    try:
        import imagecodecs  # optional: Pillow cannot hold 16-bit RGB
    except ImportError:
        notes.append("16-bit PNG reduced to 8 bits (Pillow cannot hold 16-bit colour; "
                     "install imagecodecs to keep 16 bits)")
        return None
    fh.seek(0)
    data = fh.read()
    fh.seek(0)
    try:
        arr = np.asarray(imagecodecs.png_decode(data))
    except Exception as exc:  # noqa: BLE001 - let Pillow judge the file: its errors name truncation
        img.load()
        notes.append(_note(f"16-bit PNG read at 8 bits (imagecodecs: {first_line(exc)})"))
        return None
    if arr.dtype != np.uint16:
        return None
    return _finish_array(shown, arr, "PNG", _exif_orientation(img, notes), img.info.get("icc_profile"), notes)


def _exif_orientation(img: Image.Image, notes: list[str]) -> int:
    """The EXIF orientation Pillow reads (1..8); 1 when absent, unreadable or invalid (with a note)."""
    try:
        value = int(img.getexif().get(_TAG_ORIENTATION, 1))
    except Exception as exc:  # noqa: BLE001 - corrupt EXIF must not stop decoding
        notes.append(_note(f"unreadable EXIF data ignored ({first_line(exc)})"))
        return 1
    return _valid_orientation(value, notes)


def _from_pillow(shown: str, img: Image.Image, fmt: str, notes: list[str]) -> _Decoded:
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
        arr = _float_to_uint16(shown, arr, notes) if mode == "F" else np.clip(arr, 0, 65535).astype(np.uint16)
        pixels, depth, _, _, converted = _finish_array(shown, arr, fmt, 1, icc, notes)  # already oriented
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
        raise ImageError(f"{shown}: unsupported {fmt} pixel mode {img.mode}")
    if img.mode == "L":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8)), 8, fmt, orientation, icc_converted


# --------------------------------------------------------------------------------------------------------
# ICC profiles
# --------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _icc_test_image() -> Image.Image:
    """Every 8-bit level of grey, red, green and blue, and a 6 x 6 x 6 colour cube: 1240 RGB pixels."""
    levels = np.arange(256, dtype=np.uint8)
    ramps = [np.stack([levels * (c == k) if k < 3 else levels for c in range(3)], axis=-1) for k in range(4)]
    cube = np.stack(np.meshgrid(*[np.linspace(0, 255, 6).astype(np.uint8)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return Image.fromarray(np.concatenate([*ramps, cube])[None])


#: the most an 8-bit value may move through a profile judged sRGB (rounding of curves stored as tables)
_SRGB_TOLERANCE = 2


@lru_cache(maxsize=32)
def _is_srgb_profile(icc: bytes) -> bool:
    """True when the profile renders like sRGB: an RGB profile through which the test image (``_icc_test_image``)
    goes to sRGB with no 8-bit value moving by more than ``_SRGB_TOLERANCE``. Judged by content, never by the
    profile's name (a linear profile named "... sRGB" is not sRGB). False otherwise, also for an unreadable profile
    (which ``_apply_icc`` then reports)."""
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if src.profile.xcolor_space.strip() != "RGB":
            return False
        test = _icc_test_image()
        out = ImageCms.profileToProfile(test, src, _srgb_profile(), renderingIntent=ImageCms.Intent.PERCEPTUAL,
                                        outputMode="RGB")
    except Exception:  # noqa: BLE001 - judged (and warned about) in _apply_icc
        return False
    assert out is not None
    diff = np.abs(np.asarray(out, dtype=np.int16) - np.asarray(test, dtype=np.int16))
    return int(diff.max()) <= _SRGB_TOLERANCE


def _apply_icc(img: Image.Image, icc: bytes | None, notes: list[str], *,
               lab: bool = False) -> tuple[Image.Image, bool]:
    """Convert ``img`` from its ICC profile (or LAB) to sRGB; on failure keep it and add a note."""
    try:
        src = ImageCms.createProfile("LAB") if lab else ImageCms.ImageCmsProfile(io.BytesIO(icc or b""))
    except Exception as exc:  # noqa: BLE001 - PyCMSError, OSError, TypeError on junk bytes
        notes.append(_note(f"unreadable ICC profile ignored ({first_line(exc)}); colours may be off"))
        return img, False
    try:
        out = ImageCms.profileToProfile(img, src, _srgb_profile(),
                                        renderingIntent=ImageCms.Intent.PERCEPTUAL, outputMode="RGB")
    except Exception as exc:  # noqa: BLE001
        notes.append(_note(f"ICC profile conversion to sRGB failed ({first_line(exc)}); pixels kept as they are"))
        return img, False
    assert out is not None
    return out, True
