"""Calls that must answer within a bounded time, whatever the library underneath does.

Some clients have no timeout of their own that holds in every case: pyarrow's GCS client
retries a request that a server accepted but never answers for as long as its retry policy
allows, ``requests`` waits for ever without a timeout, and C++ code that holds no Python frame
cannot be interrupted by a signal. :func:`bounded` runs such a call in a daemon thread and gives
up on it after a deadline. A call that was given up on may still hold its thread (and, at
interpreter exit, a library's finaliser would wait for it): the command line leaves the process
without finalisers (``raysam.run._exit``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from raysam.errors import RaysamError

T = TypeVar("T")

def bounded(call: Callable[[], T], timeout_s: float, on_timeout: Callable[[], RaysamError]) -> T:
    """``call()``'s result, or ``on_timeout()`` raised if it does not return within ``timeout_s``.

    The call's own exception is raised as is. Signals still reach the main thread meanwhile
    (its wait is interruptible), so SIGTERM and Ctrl-C stop a bounded call at once.

    Args:
        call: what to run (in a daemon thread).
        timeout_s: seconds to wait for it.
        on_timeout: builds the one-line error raised when it does not answer in time.
    """
    outcome: dict[str, object] = {}
    returned = threading.Event()

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as err:  # noqa: BLE001 - handed back to the caller below
            outcome["error"] = err
        finally:
            returned.set()

    threading.Thread(target=target, name="raysam-bounded-call", daemon=True).start()
    if not returned.wait(timeout_s):  # a signal (RunInterrupted) while waiting is raised from here
        raise on_timeout()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]

