"""What a command prints: results on stdout, one line per problem on stderr, nothing else.

- ``out``: result lines on stdout. A closed pipe (``rawdiff-infer ... | head -1``, ``| true``) silences stdout for
  the rest of the run; it never turns a good result into a failure, and the interpreter's exit flush stays quiet.
- ``err`` / ``warn``: ``<prog>: <message>`` on stderr, always one line (newlines in a message are folded; file names
  should already be shown with ``messages.show_path``).
- ``capture()``: while active, Python warnings (numpy, torch, Pillow) and log records of any library at WARNING or
  above become such lines too (with ``verbose``, INFO as well); nothing else reaches stderr.

Thread-safe: the folder runner reports from its worker threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator

import click

from .messages import first_line

__all__ = ["Console", "OneLineCommand"]


class _Handler(logging.Handler):
    def __init__(self, console: "Console", *, libraries: bool = True) -> None:
        super().__init__()
        self.console = console
        self.libraries = libraries

    def emit(self, record: logging.LogRecord) -> None:
        if not self.libraries and not record.name.startswith("rawdiff"):
            return  # a library's own log (torch's exporter: dozens of lines per failure); -v shows them
        try:
            msg = first_line(record.getMessage()) if record.getMessage() else record.name
            self.console.err(f"{record.levelname.lower()}: {msg}")
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class Console:
    """stdout / stderr of one command run (see the module docstring).

    Args:
        prog: the program name that prefixes every stderr line.
        quiet: no result lines on stdout.
        verbose: log records at INFO too.
    """

    def __init__(self, prog: str, *, quiet: bool = False, verbose: bool = False) -> None:
        self.prog, self.quiet, self.verbose = prog, quiet, verbose
        self.stdout_closed = False
        #: progress bars are on stderr: messages then go through tqdm.write, which clears and redraws them
        self.bars = False
        self._lock = threading.RLock()

    def out(self, line: str) -> None:
        """A result line on stdout (nothing with ``quiet``; nothing once stdout is closed)."""
        if self.quiet or self.stdout_closed:
            return
        with self._lock:
            try:
                click.echo(line)
                sys.stdout.flush()
            except (BrokenPipeError, ValueError, OSError):
                self._close_stdout()

    def _close_stdout(self) -> None:
        """The reader went away: point fd 1 at /dev/null so that no later write (the interpreter's own flush at
        exit included) fails or prints 'Exception ignored'."""
        self.stdout_closed = True
        with contextlib.suppress(Exception):
            fd = sys.stdout.fileno()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)

    def err(self, message: str) -> None:
        """``<prog>: <message>`` on stderr, folded to one line."""
        line = " ".join(str(message).split())
        with self._lock:
            with contextlib.suppress(OSError, ValueError):
                if self.bars:
                    from tqdm import tqdm

                    tqdm.write(f"{self.prog}: {line}", file=sys.stderr)
                else:
                    click.echo(f"{self.prog}: {line}", err=True)

    def warn(self, message: str) -> None:
        self.err(f"warning: {message}")

    @contextlib.contextmanager
    def capture(self, *, libraries: bool = True) -> Iterator[None]:
        """Route Python warnings and log records to one-line messages (restored on exit). Loggers that a library
        gave its own stderr handler (torch's) are routed here too while active. ``libraries=False``: records of
        loggers outside rawdiff are dropped unless ``verbose``."""
        root = logging.getLogger()
        handler = _Handler(self, libraries=libraries or self.verbose)
        handler.setLevel(logging.INFO if self.verbose else logging.WARNING)
        saved_handlers, saved_level = root.handlers[:], root.level
        root.handlers = [handler]
        root.setLevel(logging.INFO if self.verbose else logging.WARNING)
        own = _own_handlers()
        saved_show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
            self.warn(first_line(str(message)) or category.__name__)

        warnings.showwarning = show
        try:
            with warnings.catch_warnings():  # the filters stay as they are (deprecations stay hidden)
                warnings.showwarning = show
                yield
        finally:
            warnings.showwarning = saved_show
            root.handlers = saved_handlers
            root.setLevel(saved_level)
            for logger, (handlers, propagate) in own.items():
                logger.handlers, logger.propagate = handlers, propagate


def _own_handlers() -> dict[logging.Logger, tuple[list[logging.Handler], bool]]:
    """Detach the stream handlers that libraries attached to their own non-propagating loggers (torch prints
    ``W1207 12:00:00 ...`` lines through one), letting their records propagate to ours; returns what to restore."""
    saved = {}
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if not isinstance(logger, logging.Logger) or logger.propagate or not logger.handlers:
            continue
        if any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in logger.handlers):
            saved[logger] = (logger.handlers[:], logger.propagate)
            logger.handlers, logger.propagate = [], True
    return saved


class OneLineCommand(click.Command):
    """A click command whose own errors (a bad option value, a missing argument, ...) are one line on stderr,
    ``<prog>: error: <message>`` with exit status 2, like every other error of rawdiff's commands; ``--help`` and
    normal exits are unchanged."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ANN001
        try:
            return super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                                **extra)
        except click.exceptions.Exit as e:
            code = e.exit_code
        except click.ClickException as e:
            name = prog_name or self.name or "rawdiff"
            with contextlib.suppress(OSError, ValueError):
                click.echo(f"{name}: error: {' '.join(e.format_message().split())}", err=True)
            code = e.exit_code
        except click.Abort:
            code = 130
        if not standalone_mode:
            return code
        sys.exit(code)
