"""Interrupts end a run within seconds even inside a long native call, and leave no temporary file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from rawdiff_infer.interrupts import Interrupted, handle_interrupts

SCRIPT = textwrap.dedent("""
    import sys, torch
    from rawdiff_infer.fsio import atomic_write
    from rawdiff_infer.interrupts import handle_interrupts, Interrupted
    torch.set_num_threads(1)
    a = torch.randn(6000, 6000)
    def last_words(e):
        print(f"hard exit {e.verb}", file=sys.stderr)
    try:
        with handle_interrupts(last_words, grace_s=1.0):
            with atomic_write(sys.argv[1]) as f:
                f.write(b"partial")
                print("ready", flush=True)
                for _ in range(50):
                    a = a @ a  # one native call of several seconds: the signal waits for it
                    a = a / a.abs().max()
    except Interrupted as e:
        print(f"unwound {e.verb}", file=sys.stderr)
        sys.exit(e.exit_code)
""")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_signal_ends_a_long_native_call_within_seconds(tmp_path, sig, code):
    target = tmp_path / "out.bin"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(target)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    sent = time.perf_counter()
    proc.send_signal(sig)
    rc = proc.wait(timeout=30)
    latency = time.perf_counter() - sent
    err = proc.stderr.read()
    assert rc == code, err
    assert latency < 6.0, f"took {latency:.1f} s"
    assert f"hard exit {proc_verb(sig)}" in err, err  # the native call was still running: the watchdog ended it
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)  # no output, no temporary


def test_interrupted_in_the_main_thread_is_a_keyboard_interrupt():
    with pytest.raises(KeyboardInterrupt) as info:
        with handle_interrupts(grace_s=5.0):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                time.sleep(0.01)
    assert isinstance(info.value, Interrupted) and info.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or callable(signal.getsignal(signal.SIGTERM))


def proc_verb(sig: int) -> str:
    return {signal.SIGTERM: "terminated", signal.SIGHUP: "hung up", signal.SIGINT: "interrupted"}[sig]
