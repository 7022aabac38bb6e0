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
- **Temporaries are tracked.** Every live temporary file is listed in a process-wide registry, so an interrupt
  that must end the process at once (a model call that would not return for minutes) can remove them
  (:func:`remove_live_temporaries`) before it exits.

Reading: :func:`check_regular` refuses anything that is not a regular file (a FIFO would block ``open`` for ever,
a device could stream without end) before a library opens it by name; :func:`open_regular` opens without blocking
and checks the opened descriptor, with no window between the check and the open.
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
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["NotRegularFileError", "OutputExistsError", "atomic_path", "atomic_write", "check_regular",
           "live_temporaries", "open_regular", "publish", "remove_live_temporaries", "sha256_file", "write_bytes"]

PathLike = str | os.PathLike[str]

_LIVE: set[str] = set()
_LIVE_LOCK = threading.Lock()
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


class OutputExistsError(FileExistsError):
    """The target of a no-clobber write exists (it may have appeared while rawdiff was computing)."""


class NotRegularFileError(OSError):
    """A path that must be a regular file is a FIFO, a device, a socket or a directory."""


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
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(errno.EINVAL, f"is {_kind(st.st_mode)}, not a regular file", os.fspath(path))
    return st


def open_regular(path: PathLike) -> BinaryIO:
    """Open a regular file for binary reading; refuse FIFOs, devices, sockets and directories without blocking.

    The file is opened with ``O_NONBLOCK`` (so a FIFO without a writer does not block) and the *opened*
    descriptor is checked with ``fstat``; for a regular file the flag has no effect on reads.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(errno.EINVAL, f"is {_kind(st.st_mode)}, not a regular file", os.fspath(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a regular file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def _new_temporary(target: Path) -> tuple[BinaryIO, str]:
    """Create ``.NAME.<random>.tmp`` beside ``target`` with O_EXCL (0o666 minus the umask) and register it."""
    directory = target.parent
    while True:
        tmp = str(directory / f".{target.name[:200]}.{secrets.token_hex(6)}.tmp")
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
    with contextlib.suppress(FileNotFoundError):
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
        os.replace(src, dst)
        return
    try:
        if _renameat2_noreplace(src, dst):
            return
        os.link(src, dst)  # fails with EEXIST if dst exists; then the temporary goes
        os.unlink(src)
    except FileExistsError:
        raise OutputExistsError(errno.EEXIST, "exists (it appeared while rawdiff was working); not replaced",
                                dst) from None


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
        f.close()
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
    f.close()
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
