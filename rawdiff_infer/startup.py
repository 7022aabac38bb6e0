"""The first milliseconds of a command: closed standard streams, and signals before the interrupt handler exists.

Every command (rawdiff-infer, -train, -export, -bench, -eval) calls :func:`begin_command` at the top of its module,
before the heavy imports (torch, numpy, onnx take seconds):

- **Closed standard streams** (``2>&-``, ``>&-``, ``<&-``): the descriptor is opened on ``/dev/null``, and the
  ``sys.stdout`` / ``sys.stderr`` that Python left as None are recreated. Otherwise every message (a progress bar,
  a log line) fails with "'NoneType' object has no attribute 'write'", and worse, the next file rawdiff opens
  would get descriptor 2 and receive the messages meant for stderr. A stderr whose reader goes away (EPIPE) is
  pointed at ``/dev/null`` at its first failed write: progress bars never fail a run.
- **Signals during the imports:** until :func:`interrupts.handle_interrupts` takes over, Ctrl-C, SIGTERM and
  SIGHUP end the process at once with one line and the status 128 + N: nothing has been written yet, so nothing
  needs cleaning up (without this, Ctrl-C in the first second prints a KeyboardInterrupt traceback from inside an
  import).

Both act only when the module runs as the command (its console script, or ``python -m``), never when a program or
a test imports it as a library. This module imports nothing but the standard library.
"""

from __future__ import annotations

import io
import os
import signal
import sys

__all__ = ["begin_command", "reopen_standard_streams"]

_VERBS = {getattr(signal, "SIGINT", None): "interrupted", getattr(signal, "SIGTERM", None): "terminated",
          getattr(signal, "SIGHUP", None): "hung up"}


def reopen_standard_streams() -> None:
    """Open ``/dev/null`` on each of the descriptors 0, 1, 2 that is closed, and recreate a ``sys.stdin`` /
    ``sys.stdout`` / ``sys.stderr`` that is None (Python's answer to a descriptor closed at start)."""
    for fd, flags in ((0, os.O_RDONLY), (1, os.O_WRONLY), (2, os.O_WRONLY)):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, flags)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        if getattr(sys, name) is None:
            raw = io.FileIO(fd, mode, closefd=False)
            buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
            stream = io.TextIOWrapper(buffered, encoding="utf-8", errors="backslashreplace",
                                      line_buffering=mode == "w")
            setattr(sys, name, stream)
            setattr(sys, f"__{name}__", stream)


class _UnfailingStderr:
    """``sys.stderr`` that a reader going away cannot fail: on the first failed write or flush (EPIPE: ``2>&1 |
    head``, a closed pipe) descriptor 2 is pointed at ``/dev/null`` and the run goes on, as ``console.Console`` does
    for stdout. Everything else is the wrapped stream's."""

    def __init__(self, stream: object) -> None:
        self._stream = stream

    def _silence(self) -> None:
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)
            os.close(null)
        except OSError:
            pass

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)  # type: ignore[attr-defined]
        except (OSError, ValueError):
            self._silence()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()  # type: ignore[attr-defined]
        except (OSError, ValueError):
            self._silence()

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


def _runs_as_command(prog: str, module_file: str) -> bool:
    """Whether the process is the command ``prog``: its console script, or ``python -m`` of ``module_file``."""
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None) or ""
    if not main_file:
        return False
    if os.path.basename(main_file) == prog:
        return True
    return os.path.abspath(main_file) == os.path.abspath(module_file)


def _exit_at_once(prog: str):  # noqa: ANN202 - a signal handler
    def handler(signum: int, frame: object) -> None:
        try:
            os.write(2, f"{prog}: {_VERBS.get(signum, 'stopped')} while starting; nothing was written\n".encode())
        except OSError:
            pass
        os._exit(128 + signum)

    return handler


def begin_command(prog: str, module_file: str) -> bool:
    """Standard streams and early signals of the command ``prog`` (see the module docstring). ``module_file`` is
    the ``__file__`` of the command's module (for ``python -m``). Returns whether it acted (False when imported as a
    library)."""
    if not _runs_as_command(prog, module_file):
        return False
    reopen_standard_streams()
    if not isinstance(sys.stderr, _UnfailingStderr):
        sys.stderr = _UnfailingStderr(sys.stderr)  # type: ignore[assignment]
    handler = _exit_at_once(prog)
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), handler)
    return True
