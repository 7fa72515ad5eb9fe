"""SIGTERM and SIGINT stop a run within seconds, whatever it is doing, and say what was kept.

:func:`guard` (the command line holds it for the whole run) turns both signals into
:class:`RunInterrupted` in the main thread, so the run unwinds as for any error: the driver
cancels its Ray tasks, drops staging directories, releases its date-group locks and removes
the directories it left empty, each recording what it did in :data:`REPORT`; the command line
then prints :meth:`StopReport.line` and exits 128 + the signal number.

The main thread may be stuck where no Python code runs (a C++ call into an object store that
does not answer): Python runs a signal handler only between bytecodes. So the signal also wakes
a watchdog thread (through :func:`signal.set_wakeup_fd`, written by the C-level handler at
once); if the process is still alive :data:`GRACE_S` later, or at a second signal, the watchdog
runs the registered cleanups itself (:func:`on_stop`, each bounded by :data:`CLEANUP_S`), prints
the line and leaves with :func:`os._exit`. Ray's processes started by the run die with it (Ray
sets their parent-death signal).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

GRACE_S = 10.0  # how long the main thread gets to unwind before the watchdog steps in
# How long a stopped run waits for its chip stream's thread (the chip being segmented): well
# within GRACE_S, so the main thread has dropped the staging and released the locks before the
# watchdog steps in.
STREAM_STOP_WAIT_S = GRACE_S / 2
CLEANUP_S = 5.0  # how long the watchdog waits for each cleanup
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived; raised in the main thread (Ray's waits may turn it into a
    plain ``KeyboardInterrupt``: see :func:`received`)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class StopReport:
    """What the unwinding (or the watchdog) did, for the one line printed at the end."""

    locks_released: int = 0
    groups_dropped: int = 0
    checkpoints_kept: int = 0
    kept_in: str | None = None
    printed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def line(self, signum: int) -> str:
        """``raysam: stopped by SIGTERM: ...; kept ...`` (one line)."""
        name = signal.Signals(signum).name
        if not (self.locks_released or self.groups_dropped or self.checkpoints_kept):
            return f"raysam: stopped by {name}; nothing was kept (no output was written)"
        done = f"released {self.locks_released} date-group lock(s), removed the staging of {self.groups_dropped} group(s)"
        if self.checkpoints_kept:
            kept = (f"kept {self.checkpoints_kept} chip checkpoint(s) in {self.kept_in} for the next run "
                    "(re-run the same command to resume)")
        else:
            kept = "kept nothing (no chip was checkpointed)"
        return f"raysam: stopped by {name}: {done}; {kept}"

    def reset(self) -> None:
        self.locks_released = self.groups_dropped = self.checkpoints_kept = 0
        self.kept_in, self.printed = None, False

    def print_once(self, signum: int) -> None:
        """Print :meth:`line` to stderr, once per run whoever calls it."""
        with self.lock:
            if self.printed:
                return
            self.printed = True
        print(self.line(signum), file=sys.stderr, flush=True)


REPORT = StopReport()
_cleanups: list[Callable[[], object]] = []
_state: dict[str, object] = {}


def _raise(signum: int, frame: object) -> None:
    if _state.get("signum") is None:
        _state["signum"] = signum
        raise RunInterrupted(signum)
    # a second signal: the watchdog ends the run now


def received() -> int | None:
    """The signal that stopped the run, if one did. Ray's own waits turn the interruption into a
    bare ``KeyboardInterrupt``, so catch that and ask here which signal it was."""
    signum = _state.get("signum")
    return signum if isinstance(signum, int) else None


def install_handlers() -> None:
    """(Re)install the handlers: Ray's ``init`` replaces the SIGTERM handler with its own."""
    if _state.get("active") and threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _raise)


@contextlib.contextmanager
def guard(grace_s: float = GRACE_S) -> Iterator[None]:
    """Turn SIGTERM/SIGINT into :class:`RunInterrupted` and watch the process while held.

    Outside the main thread (or nested) it does nothing. The previous handlers are restored on
    exit, so a process that runs several commands (tests) keeps its own.
    """
    if _state.get("active") or threading.current_thread() is not threading.main_thread():
        yield
        return
    REPORT.reset()
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    reader, writer = socket.socketpair()
    reader.setblocking(True)
    writer.setblocking(False)
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    _state.update(active=True, signum=None)
    watchdog = threading.Thread(target=_watch, args=(reader, grace_s), name="raysam-stop-watchdog", daemon=True)
    watchdog.start()
    install_handlers()
    try:
        yield
    finally:
        _state.update(active=False)
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        writer.close()  # ends the watchdog's wait
        watchdog.join(timeout=1)
        reader.close()
        _cleanups.clear()


def _watch(reader: socket.socket, grace_s: float) -> None:
    """Wait for a signal; give the main thread ``grace_s`` to unwind, then end the process."""
    signum = _next_signal(reader, None)
    if signum is None:
        return
    if _next_signal(reader, grace_s) is None and not _state.get("active"):
        return  # the guard was left meanwhile: the main thread finished on its own
    emergency_exit(signum)


def _next_signal(reader: socket.socket, timeout_s: float | None) -> int | None:
    """The next SIGTERM/SIGINT written to the wakeup fd; None when the guard ends or on timeout."""
    reader.settimeout(timeout_s)
    try:
        while True:
            data = reader.recv(16)
            if not data:
                return None
            for signum in data:
                if signum in SIGNALS:
                    return signum
    except (TimeoutError, OSError):
        return None


def emergency_exit(signum: int) -> None:
    """Run the registered cleanups (each bounded), print the stop line and leave at once."""
    for cleanup in list(_cleanups):
        thread = threading.Thread(target=cleanup, name="raysam-stop-cleanup", daemon=True)
        thread.start()
        thread.join(CLEANUP_S)
    REPORT.print_once(signum)
    with contextlib.suppress(Exception):
        import logging

        logging.shutdown()
    os._exit(128 + signum)


@contextlib.contextmanager
def on_stop(cleanup: Callable[[], object]) -> Iterator[None]:
    """Register ``cleanup`` for the watchdog while the block runs (the block itself cleans up
    when it unwinds normally). ``cleanup`` must be safe to call twice and from another thread."""
    _cleanups.append(cleanup)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            _cleanups.remove(cleanup)


class Once:
    """A thread-safe cleanup that runs its function once; later calls return its first result."""

    def __init__(self, fn: Callable[[], object]):
        self._fn = fn
        self._lock = threading.Lock()
        self._done = False
        self._result: object = None

    def __call__(self) -> object:
        with self._lock:
            if not self._done:
                self._done = True
                self._result = self._fn()
            return self._result
