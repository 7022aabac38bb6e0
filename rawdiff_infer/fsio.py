"""File safety: the one place that writes files atomically and opens only regular files.

Rules that hold for every file rawdiff writes (RAW outputs, checkpoints, ONNX graphs, engines, caches):

- **All or nothing.** Data go to a temporary file beside the target (``.NAME.XXXXXXXXXXXX.tmp``, created with
  ``O_EXCL``, permissions 0o666 minus the umask, the umask itself untouched), are flushed and fsync'ed, and only
  then become the target. On any exception, KeyboardInterrupt included, the temporary file is removed and the
  target is untouched.
- **No clobber at the moment of writing.** Unless ``overwrite=True``, the temporary file becomes the target with an
  operation that fails if the target exists *now*, not only when the run started: ``renameat2(RENAME_NOREPLACE)``
  on Linux, else a hard link followed by removing the temporary. A file that appeared at the target while rawdiff
  was computing is therefore never replaced: :class:`OutputExistsError` is raised instead. With ``overwrite=True``
  the target is replaced atomically (``os.replace``).
- **Never a file the run reads.** A command declares the files it reads (:func:`reading`); no write replaces one
  of them, not even with ``overwrite=True`` (``--force``): :class:`InputReplaceError`. Files are compared by
  device and inode (``st_dev``, ``st_ino``), not by name, so another name, a symbolic link or a hard link of an
  input is caught too. :func:`check_target` says the same before any compute.
- **Nothing left behind.** A failed write (a full disk included, even when ``close`` fails again) removes its
  temporary file; the temporary's name is cut to fit ``NAME_MAX`` in *bytes* (a long name in multi-byte UTF-8
  still gets a valid temporary name).
- **Temporaries are tracked.** Every live temporary file is listed in a process-wide registry, so an interrupt
  that must end the process at once (a model call that would not return for minutes) can remove them
  (:func:`remove_live_temporaries`) before it exits.

Reading: :func:`check_regular` refuses anything that is not a regular file (a FIFO would block ``open`` for ever,
a device could stream without end) before a library opens it by name; :func:`open_regular` opens without blocking
and checks the opened descriptor, with no window between the check and the open. :func:`open_append` is the same
for a log a run appends to.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import secrets
import stat
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["InputReplaceError", "NotRegularFileError", "OutputExistsError", "atomic_path", "atomic_write",
           "check_regular", "check_target", "input_named", "live_temporaries", "open_append", "open_regular",
           "publish", "reading", "remove_live_temporaries", "sha256_file", "temporary_name", "write_bytes"]

PathLike = str | os.PathLike[str]

_LIVE: set[str] = set()
_LIVE_LOCK = threading.Lock()
_READS: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) -> the name the command reads it by
_READS_LOCK = threading.Lock()
_RENAME_NOREPLACE = 1
#: longest file name, in bytes, that most file systems take
NAME_MAX = 255
_TMP_EXTRA = len(".") + len(".") + 12 + len(".tmp")  # "." + name + "." + 12 hex digits + ".tmp"
_AT_FDCWD = -100


class OutputExistsError(FileExistsError):
    """The target of a no-clobber write exists (it may have appeared while rawdiff was computing)."""


class NotRegularFileError(OSError):
    """A path that must be a regular file is a FIFO, a device, a socket or a directory."""


class InputReplaceError(FileExistsError):
    """A write would replace a file the run reads (same device and inode); refused even with ``overwrite``."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: PathLike) -> os.stat_result:
    """stat ``path`` (following links) and refuse anything but a regular file.

    Raises:
        FileNotFoundError / PermissionError / OSError: as ``os.stat`` does.
        NotRegularFileError: a directory, FIFO, device or socket (message names what it is).
    """
    return _require_regular(os.stat(path), path)


def _require_regular(st: os.stat_result, path: PathLike) -> os.stat_result:
    """``st`` if it describes a regular file; else NotRegularFileError naming what ``path`` is."""
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(errno.EINVAL, f"is {_kind(st.st_mode)}, not a regular file", os.fspath(path))
    return st


def _fdopen_regular(fd: int, path: PathLike, mode: str) -> BinaryIO:
    """The opened descriptor ``fd`` as a file object if it is a regular file (checked with ``fstat``, so what was
    opened is what is checked), back in blocking mode; else it is closed and NotRegularFileError is raised."""
    try:
        _require_regular(os.fstat(fd), path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def open_regular(path: PathLike) -> BinaryIO:
    """Open a regular file for binary reading; refuse FIFOs, devices, sockets and directories without blocking.

    The file is opened with ``O_NONBLOCK`` (so a FIFO without a writer does not block) and the *opened*
    descriptor is checked with ``fstat``; for a regular file the flag has no effect on reads.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    return _fdopen_regular(fd, path, "rb")


def open_append(path: PathLike) -> BinaryIO:
    """Open a log for appending (created 0o666 minus the umask if missing); refuse a FIFO, device, socket or
    directory without blocking, as :func:`open_regular` does for reading."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a FIFO without a reader (O_NONBLOCK), or a device that is not there
            raise NotRegularFileError(errno.EINVAL, "is a FIFO or a device, not a regular file",
                                      os.fspath(path)) from None
        raise
    return _fdopen_regular(fd, path, "ab")


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a regular file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- the files a run reads --------------------------------------------------------------------------------------

def _identity(path: PathLike) -> tuple[int, int] | None:
    """(st_dev, st_ino) of what ``path`` names (links followed), None where there is nothing or it cannot be seen."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _files_of(path: PathLike) -> list[str]:
    """``path``, and for a folder the entries in it (a sharded checkpoint, a folder of photos; not recursive)."""
    p = os.fspath(path)
    if not os.path.isdir(p):
        return [p]
    try:
        return [p, *(os.path.join(p, name) for name in sorted(os.listdir(p)))]
    except OSError:
        return [p]


@contextlib.contextmanager
def reading(paths: Iterable[PathLike | None]) -> Iterator[None]:
    """While active, no write through this module replaces one of ``paths`` (None entries are ignored; a folder
    stands for itself and the files in it), not even with ``overwrite=True``: :class:`InputReplaceError`. Files are
    identified by device and inode, so another name or a hard link of an input is refused too. Nests."""
    added: list[tuple[int, int]] = []
    with _READS_LOCK:
        for path in paths:
            if path is None:
                continue
            for name in _files_of(path):
                key = _identity(name)
                if key is not None and key not in _READS:
                    _READS[key] = name
                    added.append(key)
    try:
        yield
    finally:
        with _READS_LOCK:
            for key in added:
                _READS.pop(key, None)


def input_named(path: PathLike) -> str | None:
    """The name of the input (declared with :func:`reading`) that ``path`` is the same file as, else None."""
    key = _identity(path)
    if key is None:
        return None
    with _READS_LOCK:
        return _READS.get(key)


def _refuse_input(path: PathLike) -> None:
    name = input_named(path)
    if name is not None:
        same = "" if os.path.abspath(name) == os.path.abspath(path) else f" (the same file as {name})"
        raise InputReplaceError(errno.EEXIST, f"is a file this run reads{same}; never replaced, not even with "
                                "--force", os.fspath(path))


def check_target(path: PathLike, *, overwrite: bool) -> None:
    """Before any compute: may a write through this module make ``path``? Raises (one-line messages):

    - :class:`NotRegularFileError`: a directory, FIFO, device or socket is there (never replaced);
    - :class:`InputReplaceError`: it is a file the run reads (:func:`reading`), even with ``overwrite``;
    - :class:`OutputExistsError`: something is there (a dangling symbolic link included) and not ``overwrite``.
    """
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        return
    st = _identity(path) and os.stat(path)
    if not st:  # a symbolic link to nothing
        if overwrite:
            return
        raise OutputExistsError(errno.EEXIST, "is a dangling symbolic link; not replaced without --force",
                                os.fspath(path))
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(errno.EINVAL, f"exists and is {_kind(st.st_mode)}; it cannot be an output",
                                  os.fspath(path))
    _refuse_input(path)
    if not overwrite:
        what = "a symbolic link to a file" if stat.S_ISLNK(lst.st_mode) else "exists"
        raise OutputExistsError(errno.EEXIST, f"{what}; not replaced without --force", os.fspath(path))


# ---- temporaries ------------------------------------------------------------------------------------------------

def live_temporaries() -> list[str]:
    """Temporary files that a write in progress holds now (absolute paths)."""
    with _LIVE_LOCK:
        return sorted(_LIVE)


def remove_live_temporaries() -> int:
    """Remove every temporary file of a write in progress (for an interrupt that ends the process at once).
    Returns how many were removed."""
    with _LIVE_LOCK:
        names = list(_LIVE)
        _LIVE.clear()
    removed = 0
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(name)
            removed += 1
    return removed


def temporary_name(name: str, token: str) -> str:
    """``.NAME.TOKEN.tmp`` for a target file name, NAME cut (at a character boundary) so that the whole fits
    ``NAME_MAX`` bytes: a name of multi-byte UTF-8 characters is measured in bytes, not characters."""
    budget = NAME_MAX - _TMP_EXTRA - (len(token) - 12)
    raw = os.fsencode(name)
    if len(raw) > budget:
        cut = budget
        while cut > 0 and (raw[cut] & 0xC0) == 0x80:  # do not split a UTF-8 sequence
            cut -= 1
        raw = raw[:cut]
    return f".{os.fsdecode(raw)}.{token}.tmp"


def _new_temporary(target: Path) -> tuple[BinaryIO, str]:
    """Create ``.NAME.<random>.tmp`` beside ``target`` with O_EXCL (0o666 minus the umask) and register it."""
    directory = target.parent
    while True:
        tmp = str(directory / temporary_name(target.name, secrets.token_hex(6)))
        with _LIVE_LOCK:  # registered before it exists: an interrupt right after creation still finds it
            _LIVE.add(os.path.abspath(tmp))
        try:
            return open(tmp, "x+b"), tmp  # noqa: SIM115 - the caller closes it
        except FileExistsError:
            _forget(tmp)
            continue
        except BaseException:
            _forget(tmp)
            raise


def _forget(tmp: str) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(os.path.abspath(tmp))


def _discard(tmp: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    _forget(tmp)


def _renameat2_noreplace(src: str, dst: str) -> bool:
    """rename(src, dst) failing if dst exists (Linux renameat2). False when the system or file system lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), dst)


def publish(tmp: PathLike, target: PathLike, *, overwrite: bool = False) -> None:
    """Make the finished temporary file ``tmp`` the file ``target`` (same directory), atomically.

    ``overwrite=False``: fails with :class:`OutputExistsError` if ``target`` exists at this moment (then ``tmp`` is
    left for the caller to remove). ``overwrite=True``: replaces ``target``.
    """
    src, dst = os.fspath(tmp), os.fspath(target)
    if overwrite:
        _refuse_input(dst)
        os.replace(src, dst)
        return
    try:
        if _renameat2_noreplace(src, dst):
            return
        os.link(src, dst)  # fails with EEXIST if dst exists; then the temporary goes
        os.unlink(src)
    except FileExistsError:
        what = ("is a dangling symbolic link" if os.path.islink(dst) and not os.path.exists(dst)
                else "exists (it appeared while rawdiff was working)")
        raise OutputExistsError(errno.EEXIST, f"{what}; not replaced", dst) from None


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


def _refuse_directory(target: Path) -> None:
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(target))


@contextlib.contextmanager
def atomic_write(path: PathLike, *, overwrite: bool = False) -> Iterator[BinaryIO]:
    """Write a file all-or-nothing through a binary file object (see the module docstring).

    Args:
        path: the target file; its directory must exist.
        overwrite: replace an existing target; otherwise :class:`OutputExistsError` if it exists when the data
            are complete (checked atomically at that moment).
    Raises:
        IsADirectoryError: ``path`` is a directory.
        OutputExistsError: ``overwrite`` is False and ``path`` exists when the write completes.
        OSError: the directory does not exist or cannot be written, the disk is full, ...
    """
    target = Path(path)
    _refuse_directory(target)
    f, tmp = _new_temporary(target)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        publish(tmp, target, overwrite=overwrite)
    except BaseException:
        try:
            with contextlib.suppress(OSError):  # closing flushes: on a full disk it fails again
                f.close()
        finally:
            _discard(tmp)
        raise
    _forget(tmp)
    _fsync_directory(target.parent)


@contextlib.contextmanager
def atomic_path(path: PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Like :func:`atomic_write`, for libraries that write by file name (``onnx.save_model``, safetensors'
    ``save_file``): yields the temporary file's path (an empty file already created); whatever the library wrote
    there becomes ``path`` on a clean exit."""
    target = Path(path)
    _refuse_directory(target)
    f, tmp = _new_temporary(target)
    try:
        f.close()
    except BaseException:
        _discard(tmp)
        raise
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        publish(tmp, target, overwrite=overwrite)
    except BaseException:
        _discard(tmp)
        raise
    _forget(tmp)
    _fsync_directory(target.parent)


def write_bytes(path: PathLike, data: bytes | memoryview, *, overwrite: bool = False) -> None:
    """``data`` to ``path`` through :func:`atomic_write`."""
    with atomic_write(path, overwrite=overwrite) as f:
        f.write(data)
