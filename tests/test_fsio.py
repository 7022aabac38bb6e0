"""fsio: atomic writes that never replace a file appearing meanwhile, and reads that refuse non-regular files."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from faults import full_disk

from rawdiff_infer import fsio
from rawdiff_infer.fsio import (InputReplaceError, NotRegularFileError, OutputExistsError, atomic_path, atomic_write,
                                check_regular, check_target, input_named, live_temporaries, open_append,
                                open_regular, reading, remove_live_temporaries, sha256_file, write_bytes)


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


# ---- issue 23: data loss, debris on a full disk, long UTF-8 names, logs -------------------------------------------

def test_a_failed_write_leaves_no_temporary_even_when_close_fails_again(tmp_path, monkeypatch):
    full_disk(monkeypatch)
    with pytest.raises(OSError) as info:
        write_bytes(tmp_path / "x.npy", b"data that never reaches the disk")
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == [] and live_temporaries() == []


def test_full_disk_through_dev_full(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with pytest.raises(NotRegularFileError):
        check_target("/dev/full", overwrite=True)  # a device is never an output


@pytest.mark.parametrize("char", ["\u00e9", "\u8a9e", "\U0001f4f7"])
@pytest.mark.parametrize("size", [237, 240, 251])
def test_long_multibyte_names_get_a_valid_temporary_name(tmp_path, char, size):
    n = (size - len(".npy")) // len(char.encode())
    name = char * n + ".npy"
    assert len(name.encode()) <= 255
    write_bytes(tmp_path / name, b"x")
    assert os.listdir(tmp_path) == [name]
    tmp = fsio.temporary_name(name, "0" * 12)
    assert len(tmp.encode()) <= 255 and tmp.encode().decode() == tmp  # a whole character was cut, never half


def test_a_file_the_run_reads_is_never_replaced_not_even_with_overwrite(tmp_path):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"the model")
    os.link(model, tmp_path / "hard.json")
    os.symlink(model, tmp_path / "soft.json")
    with reading([model, None]):
        for target in (model, tmp_path / "hard.json", tmp_path / "soft.json"):
            with pytest.raises(InputReplaceError, match="a file this run reads"):
                check_target(target, overwrite=True)
            with pytest.raises(InputReplaceError):
                write_bytes(target, b"a report", overwrite=True)
        assert input_named(tmp_path / "hard.json") == str(model)
    assert model.read_bytes() == b"the model" and not _temps(tmp_path)
    write_bytes(tmp_path / "hard.json", b"now an output", overwrite=True)  # outside the run it may be replaced
    assert model.read_bytes() == b"the model"


def test_a_folder_declared_read_covers_its_files(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "rawdiff.json").write_bytes(b"{}")
    with reading([tmp_path / "shards"]):
        with pytest.raises(InputReplaceError):
            write_bytes(tmp_path / "shards" / "rawdiff.json", b"x", overwrite=True)


def test_a_dangling_symlink_is_named_as_such(tmp_path):
    link = tmp_path / "out.npy"
    os.symlink(tmp_path / "nowhere", link)
    with pytest.raises(OutputExistsError, match="dangling symbolic link"):
        check_target(link, overwrite=False)
    with pytest.raises(OutputExistsError, match="dangling symbolic link") as info:
        write_bytes(link, b"x")
    assert "appeared" not in str(info.value)
    check_target(link, overwrite=True)
    write_bytes(link, b"x", overwrite=True)
    assert not link.is_symlink() and link.read_bytes() == b"x"


def test_check_target(tmp_path):
    check_target(tmp_path / "new", overwrite=False)
    (tmp_path / "old").write_bytes(b"")
    with pytest.raises(OutputExistsError, match="--force"):
        check_target(tmp_path / "old", overwrite=False)
    check_target(tmp_path / "old", overwrite=True)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(NotRegularFileError, match="FIFO"):
        check_target(tmp_path / "pipe", overwrite=True)


def test_open_append_refuses_a_fifo_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "log.csv")
    with pytest.raises(NotRegularFileError, match="FIFO"):
        open_append(tmp_path / "log.csv")
    with open_append(tmp_path / "real.csv") as f:
        f.write(b"a\n")
    with open_append(tmp_path / "real.csv") as f:
        f.write(b"b\n")
    assert (tmp_path / "real.csv").read_bytes() == b"a\nb\n"
