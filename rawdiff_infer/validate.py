"""Strict checks for values that come from files or users: one schema for every model description.

Each checker returns the value normalised (ints stay ints, numbers become float) or raises :class:`SchemaError`
(a ValueError) whose message names the field: ``model.base_channels: must be an integer in 1..1024, got 32.0``.
JSON gives no types beyond number / string / bool / list / object, so these checks are strict where Python would
be lenient: ``True`` is not an integer, ``32.0`` is not an integer, NaN and infinities are never numbers.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["SchemaError", "boolean", "choice", "integer", "int_list", "known_keys", "number", "obj", "string",
           "zip_namelist", "MAX_ZIP_BYTES", "MAX_ZIP_MEMBERS", "MAX_ZIP_RATIO"]

#: the most a zip archive rawdiff opens (an AOTInductor ``.pt2`` package) may declare once expanded: the largest
#: U-Net a description may declare (500 M parameters) in fp32 is 2 GB, its compiled code much less
MAX_ZIP_BYTES = 8 << 30
#: the most members it may hold (a package has a few dozen)
MAX_ZIP_MEMBERS = 10_000
#: the most a member above ``_ZIP_RATIO_FLOOR`` bytes may expand (PyTorch stores package members uncompressed;
#: deflate reaches about 1000 on zeros, which is what a zip bomb is made of)
MAX_ZIP_RATIO = 100
_ZIP_RATIO_FLOOR = 1 << 20


class SchemaError(ValueError):
    """A field of a description has the wrong type or an out-of-range value (message: ``field: problem``)."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def integer(value: Any, name: str, lo: int, hi: int) -> int:
    """An int (not a bool, not a float) in lo..hi inclusive."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SchemaError(f"{name}: must be an integer in {lo}..{hi}, got {_show(value)}")
    return int(value)


def number(value: Any, name: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite int or float in [lo, hi] (open ends with ``lo_open`` / ``hi_open``), returned as float."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        v = float(value)
        ok = (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise SchemaError(f"{name}: must be a finite number in {left}{lo:g}, {hi:g}{right}, got {_show(value)}")
    return float(value)


def boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise SchemaError(f"{name}: must be true or false, got {_show(value)}")
    return value


def string(value: Any, name: str, *, max_len: int = 255, min_len: int = 0) -> str:
    """A str of min_len..max_len printable characters."""
    if not isinstance(value, str) or not min_len <= len(value) <= max_len or not value.isprintable():
        raise SchemaError(f"{name}: must be a string of {min_len}..{max_len} printable characters, "
                          f"got {_show(value)}")
    return value


def choice(value: Any, name: str, options: Iterable[Any]) -> Any:
    opts = tuple(options)
    if isinstance(value, bool) or value not in opts:
        raise SchemaError(f"{name}: must be one of {', '.join(map(repr, opts))}; got {_show(value)}")
    return value


def int_list(value: Any, name: str, lo: int, hi: int, *, min_len: int = 0, max_len: int = 64,
             unique: bool = False) -> tuple[int, ...]:
    """A list / tuple of min_len..max_len integers, each in lo..hi."""
    if not isinstance(value, (list, tuple)) or not min_len <= len(value) <= max_len:
        raise SchemaError(f"{name}: must be a list of {min_len}..{max_len} integers, got {_show(value)}")
    out = tuple(integer(v, f"{name}[{i}]", lo, hi) for i, v in enumerate(value))
    if unique and len(set(out)) != len(out):
        raise SchemaError(f"{name}: entries must be distinct, got {list(out)}")
    return out


def obj(value: Any, name: str) -> dict[str, Any]:
    """A JSON object (dict with string keys)."""
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise SchemaError(f"{name}: must be a JSON object, got {type(value).__name__}")
    return dict(value)


def known_keys(d: Mapping[str, Any], name: str, allowed: Iterable[str]) -> None:
    """Refuse keys outside ``allowed`` (a typo in a description must not be silently ignored)."""
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise SchemaError(f"{name}: unknown key(s) {', '.join(map(repr, unknown[:5]))}")


def zip_namelist(archive: zipfile.ZipFile) -> list[str]:
    """The member names of an open zip archive (what ``ZipFile.namelist`` gives), once what its central directory
    declares is checked, before any member is read or extracted: at most ``MAX_ZIP_MEMBERS`` members,
    ``MAX_ZIP_BYTES`` expanded in all, and no member above 1 MiB expanding more than ``MAX_ZIP_RATIO`` times (a zip
    bomb). The readers (Python's zipfile, PyTorch's miniz) stop at a member's declared size, so these bound the
    memory and disk that reading the archive takes.

    Raises SchemaError (a ValueError) whose one-line message names the member."""
    infos = archive.infolist()
    if len(infos) > MAX_ZIP_MEMBERS:
        raise SchemaError(f"zip archive: {len(infos)} members, more than {MAX_ZIP_MEMBERS}")
    total = 0
    for info in infos:
        total += info.file_size
        if info.file_size > _ZIP_RATIO_FLOOR and info.file_size > MAX_ZIP_RATIO * max(info.compress_size, 1):
            raise SchemaError(f"zip member {info.filename[:200]!r}: expands {info.compress_size} bytes to "
                              f"{info.file_size} (more than {MAX_ZIP_RATIO} times: a zip bomb)")
    if total > MAX_ZIP_BYTES:
        raise SchemaError(f"zip archive: its members expand to {total} bytes, more than {MAX_ZIP_BYTES >> 30} GiB")
    return [info.filename for info in infos]
