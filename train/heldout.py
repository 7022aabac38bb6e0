"""The held-out photos: the one list of photos that must never reach a training pool.

They are the evaluation photos of the project (the sampler table of ``benchmarks/gpu_session.py``, validation
during training, the held-out quality checks): a model trained on one of them would report a flattering and
meaningless score. Everything that builds training data from photo folders (``rawdiff-train --photos``, the GPU
session script) filters its files through :func:`split_held_out`.

A photo is held out when

* its file *stem* matches a listed name, case-insensitively (so ``kodim03.png``, ``KODIM03.PNG`` and a
  re-encoded ``kodim03.jpg`` are all held out), or
* its content is byte-identical to a listed photo (sha256), whatever its name (a renamed copy).

The digests are those of the files in ``shared/data/photos`` (see its SOURCES.md) and ``train/photos`` (see
``train/photos/SOURCES.md``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

from rawdiff_infer.fsio import sha256_file

__all__ = ["HELD_OUT_PHOTOS", "is_held_out", "sort_held_out", "split_held_out"]

#: file name -> sha256 of the file: the photos that are never used for training
HELD_OUT_PHOTOS: Mapping[str, str] = {
    "kodim03.png": "e25ca1ff2f0c0cb5fdfd5f9b0a0bb21ac4c3de3c84a67f35b09a85d3306249db",
    "kodim07.png": "b77d3f006f42414bb242222e0482e750c0fb9e5ee8d4bed2f6f11c5605fe54a4",
    "kodim13.png": "bc34a3ce58dea09dce1704c997171602de90cb34d0c8503a988b77f473d39b08",
    "grace_hopper.jpg": "a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130",
}

_STEMS = frozenset(Path(n).stem.lower() for n in HELD_OUT_PHOTOS)
_DIGESTS = frozenset(HELD_OUT_PHOTOS.values())


def is_held_out(path: str | os.PathLike[str], *, check_content: bool = True) -> bool:
    """True if ``path`` is a held-out photo: by its stem (case-insensitive), or, with ``check_content`` (the
    default), by its sha256 (reads the file; raises OSError if it cannot be read)."""
    p = Path(path)
    if p.stem.lower() in _STEMS:
        return True
    return check_content and sha256_file(p) in _DIGESTS


def split_held_out(files: Iterable[str | os.PathLike[str]], *,
                   check_content: bool = True) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files), each in the order given. See :func:`is_held_out`."""
    train: list[Path] = []
    held: list[Path] = []
    for f in files:
        (held if is_held_out(f, check_content=check_content) else train).append(Path(f))
    return train, held


def sort_held_out(files: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Held-out files in the order of :data:`HELD_OUT_PHOTOS` (by stem; others, e.g. renamed copies, after them
    by name). Evaluation seeds its synthetic camera per index, so this order keeps kodim03, kodim07, kodim13 at
    indices 0, 1, 2 as in every earlier measurement."""
    order = {Path(n).stem.lower(): i for i, n in enumerate(HELD_OUT_PHOTOS)}
    return sorted((Path(f) for f in files), key=lambda p: (order.get(p.stem.lower(), len(order)), p.name))
