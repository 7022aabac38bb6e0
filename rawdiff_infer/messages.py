"""One-line messages: the first line of an error, and file names shown safely.

Every problem rawdiff reports is one line on stderr. A file name may hold a newline, a control character or bytes
that are not UTF-8; printed as it is, it would break the line (or the terminal). :func:`show_path` prints ordinary
names as they are and escapes the odd ones inside quotes.
"""

from __future__ import annotations

import os

__all__ = ["first_line", "show_path"]

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\", "'": "\\'"}


def first_line(e: BaseException | str) -> str:
    """The first non-empty line of an exception's message (its type name if it has none), whitespace folded."""
    text = str(e).strip() if not isinstance(e, str) else e.strip()
    line = text.splitlines()[0] if text else ""
    line = " ".join(line.split())
    if not line and isinstance(e, BaseException):
        return type(e).__name__
    return line


def show_path(path: str | os.PathLike[str] | bytes) -> str:
    """A file name fit for a one-line message: as it is when printable, else quoted with escapes
    (``\\n``, ``\\t``, ``\\xNN`` for undecodable bytes, ``\\uNNNN`` for other non-printable characters)."""
    s = os.fsdecode(path) if isinstance(path, bytes) else os.fspath(path)
    if s.isprintable() and not any("\udc80" <= c <= "\udcff" for c in s):
        return s
    out = []
    for c in s:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif "\udc80" <= c <= "\udcff":  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        elif c.isprintable():
            out.append(c)
        elif ord(c) < 0x100:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(f"\\u{ord(c):04x}")
    return "'" + "".join(out) + "'"
