"""A zip archive (an AOTInductor .pt2 package) is judged by what its central directory declares before any member
is read: a zip bomb of a few hundred KB that expands to 64 MB (3.4 GB in the reported case) is refused in one line,
without the memory."""

from __future__ import annotations

import json
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from rawdiff_infer.backends.aoti import read_aoti_info
from rawdiff_infer.backends.base import BackendError
from rawdiff_infer.validate import MAX_ZIP_MEMBERS, SchemaError, zip_namelist

METADATA = "pkg/data/aotinductor/model/m_metadata.json"


def _bomb(path: Path, member: str = METADATA, size: int = 64 << 20) -> Path:
    """A deflated member of ``size`` zero bytes (about 1000 times smaller in the archive)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("pkg/version", "1")
        with z.open(member, "w") as f:
            chunk = b"\0" * (1 << 20)
            for _ in range(size >> 20):
                f.write(chunk)
    return path


def test_a_zip_bomb_pt2_is_refused_before_its_metadata_is_read(tmp_path: Path) -> None:
    p = _bomb(tmp_path / "bomb.pt2")
    assert p.stat().st_size < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(BackendError) as e:
            read_aoti_info(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(p)) and "zip bomb" in msg and METADATA in msg, msg
    assert peak < 8 << 20  # the 64 MB member was never expanded


def test_an_honest_archive_passes_with_its_names(tmp_path: Path) -> None:
    p = tmp_path / "ok.pt2"
    with zipfile.ZipFile(p, "w") as z:  # stored, as PyTorch writes packages
        z.writestr(METADATA, json.dumps({"AOTI_DEVICE_KEY": "cpu"}))
        z.writestr("pkg/data/weights/w0", b"\1" * (3 << 20))
    with zipfile.ZipFile(p) as z:
        assert zip_namelist(z) == z.namelist() == [METADATA, "pkg/data/weights/w0"]
    q = tmp_path / "small.zip"
    with zipfile.ZipFile(q, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("small_but_compressible.txt", b"a" * (1 << 20))  # 1000 times smaller, but only 1 MiB
    with zipfile.ZipFile(q) as z:
        assert zip_namelist(z) == ["small_but_compressible.txt"]


def test_too_many_members_or_too_much_in_all(tmp_path: Path) -> None:
    p = tmp_path / "many.zip"
    with zipfile.ZipFile(p, "w") as z:
        for i in range(MAX_ZIP_MEMBERS + 1):
            z.writestr(f"m{i}", b"")
    with zipfile.ZipFile(p) as z, pytest.raises(SchemaError, match="members, more than"):
        zip_namelist(z)
    q = _bomb(tmp_path / "big.zip", "w", size=2 << 20)
    with zipfile.ZipFile(q) as z:
        for info in z.infolist():  # declare 9 GiB, stored: ratio and total both lie
            info.file_size = 9 << 30 if info.filename == "w" else info.file_size
            info.compress_size = 9 << 30 if info.filename == "w" else info.compress_size
        with pytest.raises(SchemaError, match="GiB"):
            zip_namelist(z)
