"""fsio: atomic writes that never replace a file appearing meanwhile, and reads that refuse non-regular files."""

from __future__ import annotations

import os
import threading

import pytest

from rawdiff_infer.fsio import (NotRegularFileError, OutputExistsError, atomic_path, atomic_write, check_regular,
                                live_temporaries, open_regular, remove_live_temporaries, sha256_file, write_bytes)


def _temps(d):
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp")]


def test_no_clobber_when_the_target_appears_during_the_write(tmp_path):
    target = tmp_path / "x.npy"
    with pytest.raises(OutputExistsError):
        with atomic_write(target) as f:
            f.write(b"ours")
            target.write_bytes(b"theirs")  # another process finished first
    assert target.read_bytes() == b"theirs" and not _temps(tmp_path)


def test_overwrite_replaces(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    write_bytes(target, b"new", overwrite=True)
    assert target.read_bytes() == b"new" and not _temps(tmp_path)
    with pytest.raises(OutputExistsError):
        write_bytes(target, b"newer")
    assert target.read_bytes() == b"new"


def test_two_racing_writers_one_wins_one_fails(tmp_path):
    target = tmp_path / "race.bin"
    barrier = threading.Barrier(2)
    outcome: dict[str, str] = {}

    def writer(name: str) -> None:
        try:
            with atomic_write(target) as f:
                f.write(name.encode() * 1000)
                barrier.wait()
            outcome[name] = "won"
        except OutputExistsError:
            outcome[name] = "refused"

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcome.values()) == ["refused", "won"]
    winner = next(n for n, o in outcome.items() if o == "won")
    assert target.read_bytes() == winner.encode() * 1000 and not _temps(tmp_path)


def test_atomic_path_for_libraries_that_write_by_name(tmp_path):
    target = tmp_path / "m.onnx"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.exists()
        tmp.write_bytes(b"graph")
        assert live_temporaries() == [str(tmp.resolve())]
    assert target.read_bytes() == b"graph" and live_temporaries() == [] and not _temps(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "n.onnx") as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert not (tmp_path / "n.onnx").exists() and not _temps(tmp_path)


def test_remove_live_temporaries(tmp_path):
    cm = atomic_write(tmp_path / "o.dng")
    f = cm.__enter__()
    f.write(b"partial")
    assert len(_temps(tmp_path)) == 1
    assert remove_live_temporaries() == 1
    assert not _temps(tmp_path) and live_temporaries() == []
    f.close()


def test_refuse_non_regular_files(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(NotRegularFileError, match="FIFO"):
        open_regular(fifo)  # must not block: nobody writes to the pipe
    with pytest.raises(NotRegularFileError, match="FIFO"):
        check_regular(fifo)
    with pytest.raises(NotRegularFileError, match="directory"):
        check_regular(tmp_path)
    with pytest.raises(NotRegularFileError, match="character device"):
        open_regular("/dev/zero")
    (tmp_path / "f").write_bytes(b"abc")
    with open_regular(tmp_path / "f") as f:
        assert f.read() == b"abc"
    assert sha256_file(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
