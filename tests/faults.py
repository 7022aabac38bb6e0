"""Fault injection for the tests: a full disk at the fsio level (every write fails with ENOSPC, closing too)."""

from __future__ import annotations

import errno
import io

import pytest

from rawdiff_infer import fsio


class FullDiskFile(io.FileIO):
    """A file on a full disk: every write fails with ENOSPC (so a buffered file's close fails again)."""

    def write(self, b):  # noqa: ANN001, ANN201
        raise OSError(errno.ENOSPC, "No space left on device")


def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every temporary file ``fsio`` creates from now on behaves as on a full disk (issue 23's simulation)."""
    real = fsio._new_temporary

    def on_full_disk(target):  # noqa: ANN001, ANN202
        f, tmp = real(target)
        f.close()
        return io.BufferedRandom(FullDiskFile(tmp, "r+b")), tmp

    monkeypatch.setattr(fsio, "_new_temporary", on_full_disk)
