"""A JPEG's quality from its quantisation tables: the IJG (libjpeg) quality 1..100 that gives them, or the closest.

IJG's ``jpeg_set_quality(q)`` scales the two tables of the JPEG standard (Annex K, luminance and chrominance) by
``s = 5000 / q`` for q < 50 and ``s = 200 - 2 q`` otherwise: ``entry = clamp((base * s + 50) // 100, 1, cap)``
with cap 255 for baseline files (what libjpeg, libjpeg-turbo and Pillow write) and 32767 with 16-bit entries.
Quality 100 gives all ones. Encoders that use other tables (cameras, mozjpeg, Photoshop, hand-made ``qtables``)
get the quality whose IJG luminance table has the closest mean entry: the coarseness their luminance table
amounts to on IJG's scale.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import re

import numpy as np

__all__ = ["estimate_jpeg_quality", "ijg_table", "count_jpeg_scans", "MAX_JPEG_SCANS"]

#: the most scans (SOS markers) a JPEG may hold: libjpeg's progressive scripts write 6 (grey) or 10 (colour),
#: optimising encoders a few dozen; each scan costs a pass over every block of the image
MAX_JPEG_SCANS = 256

#: JPEG standard (Annex K.1) luminance table, natural (row-major) order
_LUMA = (
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip
#: JPEG standard (Annex K.2) chrominance table: 99 everywhere but its top-left 4 x 4 corner (natural order)
_CHROMA_CORNER = ((17, 18, 24, 47), (18, 21, 26, 66), (24, 26, 56, 99), (47, 66, 99, 99))


def _chroma_table() -> tuple[int, ...]:
    """Annex K.2 as 64 entries, natural order."""
    table = np.full((8, 8), 99, dtype=np.int64)
    table[:4, :4] = _CHROMA_CORNER
    return tuple(int(v) for v in table.reshape(-1))


_CHROMA = _chroma_table()

#: the largest entry of a baseline (8-bit) table and of an extended (16-bit) one as IJG writes them
_BASELINE_CAP, _EXTENDED_CAP = 255, 32767


def _zigzag_to_natural() -> np.ndarray:
    """Index array z with natural[k] = zigzag[z[k]] (the zigzag position of natural index k)."""
    order = sorted(((r + c, c if (r + c) % 2 == 0 else r, r * 8 + c) for r in range(8) for c in range(8)))
    # diagonals d = r + c in turn; even d runs up (row falling, column rising), odd d runs down
    z = np.empty(64, dtype=np.int64)
    for pos, (_, _, nat) in enumerate(order):
        z[nat] = pos
    return z


_ZIGZAG_INDEX = _zigzag_to_natural()


@lru_cache(maxsize=4)
def _ijg_tables(chroma: bool, baseline: bool) -> np.ndarray:
    """[100, 64] int64: IJG's table (natural order) for quality 1..100 (row q - 1)."""
    base = np.asarray(_CHROMA if chroma else _LUMA, dtype=np.int64)
    q = np.arange(1, 101, dtype=np.int64)
    scale = np.where(q < 50, 5000 // q, 200 - 2 * q)
    cap = _BASELINE_CAP if baseline else _EXTENDED_CAP
    out = np.clip((base[None, :] * scale[:, None] + 50) // 100, 1, cap)
    out.flags.writeable = False
    return out


def ijg_table(quality: int, *, chroma: bool = False, baseline: bool = True) -> list[int]:
    """IJG's quantisation table for ``quality`` 1..100 in natural (row-major) order: 64 ints in 1..255 (baseline)
    or 1..32767. What ``jpeg_set_quality(quality, baseline)`` of libjpeg writes."""
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    return [int(v) for v in _ijg_tables(chroma, baseline)[int(quality) - 1]]


def _as_table(value: Any) -> np.ndarray | None:
    """One table as a 1-D int64 array of finite values >= 0; None when it is empty or not numbers."""
    try:
        arr = np.asarray(list(value), dtype=np.float64).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        return None
    if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr < 0):
        return None
    return np.minimum(np.rint(arr), 65535).astype(np.int64)


def _tables_of(tables: Mapping[Any, Any] | Sequence[Any] | None) -> list[np.ndarray]:
    """The tables, luminance first (a dict: by ascending table id; a sequence: in order); unusable ones left out."""
    if tables is None:
        return []
    items: Iterable[Any]
    if isinstance(tables, Mapping):
        try:
            keys = sorted(tables, key=lambda k: (str(type(k)), k))
        except TypeError:
            keys = list(tables)
        items = [tables[k] for k in keys]
    elif isinstance(tables, (str, bytes)):
        return []
    else:
        items = tables
    out = []
    for t in items:
        arr = _as_table(t)
        if arr is not None:
            out.append(arr)
    return out


def _exact_quality(luma: np.ndarray, chroma: np.ndarray | None) -> int | None:
    """The IJG quality whose tables equal these (natural or zigzag order, baseline or 16-bit); the highest such
    quality when several do; None when none does."""
    if luma.size != 64 or (chroma is not None and chroma.size != 64):
        return None
    for order in (slice(None), _ZIGZAG_INDEX):  # natural order (Pillow >= 8.3), or the file's zigzag order
        lum = luma[order]
        chr_ = chroma[order] if chroma is not None else None
        for baseline in (True, False):
            hit = np.all(_ijg_tables(False, baseline) == lum[None, :], axis=1)
            if chr_ is not None:
                hit &= np.all(_ijg_tables(True, baseline) == chr_[None, :], axis=1)
            found = np.flatnonzero(hit)
            if found.size:
                return int(found[-1]) + 1
    return None


def estimate_jpeg_quality(tables: Mapping[Any, Any] | Sequence[Any] | None) -> int | None:
    """The IJG-equivalent quality (1..100) of a JPEG's quantisation tables.

    Args:
        tables: the file's tables, e.g. Pillow's ``JpegImageFile.quantization`` (a dict table id -> 64 entries;
            natural order in Pillow >= 8.3, zigzag before: both are recognised). The lowest id (or the first of a
            sequence) is taken as the luminance table and the next as the chrominance table; one table (a
            greyscale file) is enough. Entries are 1..255, or up to 65535 in 16-bit tables.

    Returns:
        The quality whose IJG tables equal the file's (the luminance table alone when the chrominance one differs
        or is missing); otherwise the quality whose IJG luminance table has the mean entry closest to the file's
        (ties: the higher quality); all-ones tables give 100. None when there is no usable table (missing, empty,
        not numbers). Never raises.
    """
    try:
        found = _tables_of(tables)
    except Exception:  # noqa: BLE001 - hostile input: no estimate rather than a traceback
        return None
    if not found:
        return None
    luma, chroma = found[0], (found[1] if len(found) > 1 else None)
    exact = _exact_quality(luma, chroma)
    if exact is None and chroma is not None:
        exact = _exact_quality(luma, None)
    if exact is not None:
        return exact
    baseline = int(luma.max()) <= _BASELINE_CAP
    means = _ijg_tables(False, baseline).mean(axis=1)  # falls as quality rises
    dist = np.abs(means - float(luma.mean()))
    return int(np.flatnonzero(dist == dist.min())[-1]) + 1


#: the marker that ends a scan's entropy-coded data: 0xFF followed by neither a stuffed 0x00, a restart marker
#: (RST0-7) nor a fill byte
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
#: markers without a length field: TEM, RST0-7, SOI
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})


def count_jpeg_scans(data: bytes, *, stop_above: int | None = None) -> int:
    """The number of scans (SOS markers) of the first image of a JPEG, read from its marker structure: segments
    are skipped by their lengths (an EXIF thumbnail's markers are not counted), a scan's entropy-coded data up to
    the next marker. Counting stops once above ``stop_above``. A malformed structure ends the count (the decoder
    then judges the file); 0 for data that is not a JPEG. Never raises."""
    if not data.startswith(b"\xff\xd8"):
        return 0
    i, scans, n = 2, 0, len(data)
    while i + 1 < n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0xD9:  # EOI
            break
        if marker in _STANDALONE:
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2:
            break
        i += 2 + length
        if marker == 0xDA:
            scans += 1
            if stop_above is not None and scans > stop_above:
                break
            end = _SCAN_END.search(data, i)
            if end is None:
                break
            i = end.start()
    return scans
