"""Stopping on signals and bounding calls: the pieces the command line's boundary is built from.

tests/reliability/test_signals.py stops real runs at every phase; these check the pieces in
this process: the guard turns SIGTERM into an exception and puts the old handlers back, the stop
line says what was kept, a cleanup runs once whoever calls it, and a bounded call gives up.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from raysam import deadline, interrupt
from raysam.errors import DataError


def test_the_guard_turns_sigterm_into_an_exception_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(interrupt.RunInterrupted) as stop:
        with interrupt.guard():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts the sleep
    assert stop.value.signum == signal.SIGTERM and stop.value.exit_code == 143
    assert interrupt.received() == signal.SIGTERM
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_bounded_call_gives_up_and_says_so():
    release = threading.Event()
    with pytest.raises(DataError, match="gave up"):
        deadline.bounded(lambda: release.wait(30), 0.2, lambda: DataError("gave up"))
    release.set()
    assert deadline.bounded(lambda: 42, 5, lambda: DataError("never")) == 42
    with pytest.raises(ZeroDivisionError):
        deadline.bounded(lambda: 1 / 0, 5, lambda: DataError("never"))


def test_a_signal_interrupts_a_bounded_wait():
    release = threading.Event()
    threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt), interrupt.guard():
        deadline.bounded(lambda: release.wait(30), 30, lambda: DataError("never"))
    assert time.monotonic() - t0 < 5
    release.set()


def test_a_cleanup_runs_once_whoever_calls_it():
    calls = []
    once = interrupt.Once(lambda: calls.append(threading.current_thread().name) or len(calls))
    threads = [threading.Thread(target=once) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert once() == 1 and len(calls) == 1


@pytest.mark.parametrize(("counts", "line"), [
    ({}, "raysam: stopped by SIGTERM; nothing was kept (no output was written)"),
    ({"locks_released": 1, "groups_dropped": 1},
     "raysam: stopped by SIGTERM: released 1 date-group lock(s), removed the staging of 1 group(s); "
     "kept nothing (no chip was checkpointed)"),
    ({"locks_released": 2, "groups_dropped": 2, "checkpoints_kept": 5, "kept_in": "out/r/k/.work"},
     "raysam: stopped by SIGTERM: released 2 date-group lock(s), removed the staging of 2 group(s); "
     "kept 5 chip checkpoint(s) in out/r/k/.work for the next run (re-run the same command to resume)"),
])
def test_the_stop_line_says_what_was_kept(counts, line):
    report = interrupt.StopReport(**counts)
    assert report.line(signal.SIGTERM) == line
