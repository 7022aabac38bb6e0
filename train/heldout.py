"""The held-out photos: the one list of photos that must never reach a training pool.

They are the evaluation photos of the project (the sampler table of ``benchmarks/gpu_session.py``, validation
during training, the held-out quality checks): a model trained on one of them would report a flattering and
meaningless score. Everything that builds training data from photo folders (``rawdiff-train --photos``, the GPU
session script) filters its files through :func:`split_held_out`.

A photo is held out when

* its file *stem* matches a listed name, case-insensitively (so ``kodim03.png``, ``KODIM03.PNG`` and a
  re-encoded ``kodim03.jpg`` are all held out), or its stem up to the first dot does (``kodim03.s768.jpg``, a
  scaled copy written by ``rawdiff_train.prepare``), or
* its content is byte-identical to a listed photo (sha256), whatever its name (a renamed copy).

The digests are those of the files in ``shared/data/photos`` (see its SOURCES.md), ``train/photos`` (see
``train/photos/SOURCES.md``) and ``shared/data/train-photos`` (its SOURCES.md).
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
    # eight of shared/data/train-photos (see its SOURCES.md): the held-out set of the ISP-consistency measurements
    # (benchmarks/RESULTS.md, session 4), one to three per source package, 2.5 to 13.4 MP
    "lomiri_Dragonfly_by_Bolly.jpg": "af5af17841009732def24b09bb1e669a1b09d2b4bdeee7812c371101c30d2bb3",
    "lomiri_free_by_Peter_Nerlich.jpg": "85a5453c2fed514c75973016f3d862aca62eb7ca087618822469274ac1092373",
    "mate_Aqua.jpg": "5c30118205982da441bf7e6a1ada636a8a0be879408140b3148280c665ed6bce",
    "mate_Garden.jpg": "d3095ee09d425ef23d27155412136cf14fc3c9af76ca58b452f55e23da324e78",
    "mate_Storm.jpg": "77ca53077831d3237f73393a91fc879158abc046d852941c26e90de336356957",
    "plasma_ColorfulCups.jpg": "6e0f3a72feb5a4a9fec191b77e34874c3c69e2d93040deb3f07773e73385023d",
    "plasma_EveningGlow.jpg": "586682dcb362b9f620068f10138f87d0d3649939aef238adc5807cb951976a7a",
    "plasma_Kite.jpg": "bdca288ce296a981e80659c021cf707caddc702c0c8d4247e60bd618476d47f8",
}

_STEMS = frozenset(Path(n).stem.lower() for n in HELD_OUT_PHOTOS)
_DIGESTS = frozenset(HELD_OUT_PHOTOS.values())


def is_held_out(path: str | os.PathLike[str], *, check_content: bool = True) -> bool:
    """True if ``path`` is a held-out photo: by its stem (case-insensitive; the part before the stem's first dot
    counts too, so the scaled copies ``kodim03.s768.jpg`` of ``rawdiff_train.prepare`` stay held out), or, with
    ``check_content`` (the default), by its sha256 (reads the file; raises OSError if it cannot be read)."""
    p = Path(path)
    stem = p.stem.lower()
    if stem in _STEMS or stem.split(".", 1)[0] in _STEMS:
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
