"""Interrupts for the command-line tools: Ctrl-C, SIGTERM and SIGHUP end a run within seconds, leaving nothing behind.

Inside :func:`handle_interrupts` the first SIGINT, SIGTERM or SIGHUP raises :class:`Interrupted` in the main thread,
so ``finally`` blocks and ``fsio``'s writers remove their temporary files on the way out. Python runs signal
handlers only between bytecodes of the main thread, however, and a long native call (one model evaluation on a
huge batch can take minutes on a CPU) would hold the exception back until it returns. A watchdog thread therefore
learns of the signal at once, through the interpreter's wakeup file descriptor, which the C-level handler writes
to immediately. If the main thread has not finished unwinding ``grace_s`` seconds later, the watchdog removes every
temporary file of a write in progress (``fsio.remove_live_temporaries``), lets the caller print its one line, and
ends the process with the conventional status (128 + the signal number: 130 for Ctrl-C, 143 for SIGTERM, 129 for
SIGHUP).

Further signals while the run unwinds are ignored, so a second Ctrl-C cannot interrupt the cleanup itself.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator

from .fsio import remove_live_temporaries

__all__ = ["HANDLED_SIGNALS", "Interrupted", "exit_code_of", "handle_interrupts", "signal_name"]

HANDLED_SIGNALS: tuple[int, ...] = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP"))
                                         if s is not None)


class Interrupted(KeyboardInterrupt):
    """The run was interrupted by a signal (a KeyboardInterrupt, so code that cleans up on Ctrl-C also does here).

    Attributes:
        signum: the signal number.
    """

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signum)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """128 + the signal number (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP)."""
        return 128 + self.signum

    @property
    def verb(self) -> str:
        """'interrupted' (Ctrl-C), 'terminated' (SIGTERM), 'hung up' (SIGHUP) or 'stopped'."""
        if self.signum == signal.SIGINT:
            return "interrupted"
        if self.signum == signal.SIGTERM:
            return "terminated"
        return "hung up" if self.signum == getattr(signal, "SIGHUP", None) else "stopped"


def signal_name(signum: int) -> str:
    """'SIGTERM' for 15, and so on."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code_of(e: BaseException) -> int:
    """Exit status for an interrupt: the signal's for :class:`Interrupted`, 130 for a plain KeyboardInterrupt."""
    return e.exit_code if isinstance(e, Interrupted) else 130


@contextlib.contextmanager
def handle_interrupts(on_hard_exit: Callable[[Interrupted], None] | None = None, *,
                      grace_s: float = 2.0) -> Iterator[None]:
    """Turn SIGINT / SIGTERM / SIGHUP into :class:`Interrupted` in the main thread, with a hard deadline.

    Args:
        on_hard_exit: called from the watchdog thread just before the process ends because the main thread did not
            unwind within ``grace_s`` (print the one-line message here; temporary files are already removed).
        grace_s: seconds between the signal and the hard exit (> 0).

    Outside the main thread (a library user's worker thread) this does nothing: signals belong to the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []
    done = threading.Event()
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)

    def handler(signum: int, frame: object) -> None:
        if fired:
            return  # already unwinding: do not interrupt the cleanup
        fired.append(signum)
        raise Interrupted(signum)

    saved = {s: signal.signal(s, handler) for s in HANDLED_SIGNALS}
    old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    thread = threading.Thread(target=_watchdog, args=(reader, done, fired, grace_s, on_hard_exit),
                              name="rawdiff-interrupt-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        signal.set_wakeup_fd(old_fd)
        for s, h in saved.items():
            signal.signal(s, h)
        thread.join(timeout=1.0)
        reader.close()
        writer.close()


def _watchdog(reader: socket.socket, done: threading.Event, fired: list[int], grace_s: float,
              on_hard_exit: Callable[[Interrupted], None] | None) -> None:
    """Wait for a signal number on the wakeup socket; if the main thread has not finished ``grace_s`` seconds
    later, remove live temporaries, report, and end the process with the signal's status."""
    while not done.is_set():
        ready, _, _ = select.select([reader], [], [], 0.2)
        if not ready:
            continue
        try:
            data = reader.recv(64)
        except OSError:  # BlockingIOError included
            continue
        signums = [b for b in data if b in HANDLED_SIGNALS]
        if not signums:
            continue
        if done.wait(grace_s):
            return
        remove_live_temporaries()
        exc = Interrupted(fired[0] if fired else signums[0])
        if on_hard_exit is not None:
            with contextlib.suppress(Exception):
                on_hard_exit(exc)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(exc.exit_code)
