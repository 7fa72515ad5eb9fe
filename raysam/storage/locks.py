"""One writer per date group: lock files next to the group directories, with stale takeover.

A run claims each date group it is about to write with ``.<group>.lock`` next to the group's
directory (created atomically with ``os.link`` on local roots; on object stores a best-effort
put-then-read-back). A second run pointed at the same root stops with one line naming the group
and the lock; a lock left by a killed run on the same host (its pid is gone, or now belongs to a
younger process) is stale and taken over, as is one from another host that nobody renewed for
:data:`LOCK_LEASE_S`. A running driver renews its locks every :data:`LOCK_RENEW_S`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from raysam.errors import ConfigError
from raysam.storage.root import OutputRoot

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
CLAIM_ATTEMPTS = 3  # a stale lock is taken over at most this often before giving up
# A running driver touches its locks every LOCK_RENEW_S; a lock from another host (a preempted
# driver pod) that nobody touched for LOCK_LEASE_S is stale. Ten renewals of slack.
LOCK_RENEW_S = 60.0
LOCK_LEASE_S = 600.0
BRIEF_LOCK_POLL_S = 0.1  # how often held_briefly tries again while another run holds the lock


@dataclass(frozen=True)
class GroupLock:
    """A held claim on one date group: the lock file and the token written into it."""

    group_id: str
    path: str
    token: str


def lock_owner(token: str) -> dict:
    """What a lock file says about its holder (no secrets: pid, host, start times, token)."""
    return {
        "pid": os.getpid(), "host": socket.gethostname(), "pid_started": _process_started(os.getpid()),
        "token": token, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _process_started(pid: int) -> float | None:
    """The start time of process ``pid`` (epoch s), or None when there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def is_stale(owner: dict, age_s: float | None) -> bool:
    """True when the lock's holder is gone: on this host its pid is dead or reused; on another
    host it stopped renewing the lock (``age_s``, seconds since the lock file was last touched)."""
    if owner.get("host") != socket.gethostname():
        return age_s is not None and age_s > LOCK_LEASE_S
    if not isinstance(owner.get("pid"), int):
        return False
    started = _process_started(owner["pid"])
    if started is None:
        return True
    recorded = owner.get("pid_started")
    return isinstance(recorded, int | float) and abs(started - recorded) > 1.0


def _held_message(what: str, path: str, owner: dict | None) -> str:
    who = "an unreadable lock" if owner is None else (
        f"pid {owner.get('pid')} on host {owner.get('host')} since {owner.get('created_at')}")
    return (f"{what} is being written by another raysam run ({who}; lock file {path}): "
            f"wait for that run to finish, or if it is no longer running delete {path} and re-run")


def lock_path(group_dir: str) -> str:
    """The lock file of a date-group directory: ``.<group>.lock`` next to it."""
    parent, name = group_dir.rsplit("/", 1)
    return f"{parent}/.{name}{LOCK_SUFFIX}"


def _read_owner(root: OutputRoot, path: str) -> dict | None:
    try:
        return root.read_json(path)
    except OSError as err:
        raise ConfigError(f"cannot read lock file {path}: {str(err).splitlines()[0]}") from None


def claim(root: OutputRoot, group_id: str, group_dir: str, what: str | None = None) -> GroupLock:
    """Take the date group's lock, taking over a stale one; one line if another run holds it.

    Args:
        root: the output root.
        group_id: the group's id (kept in the lock).
        group_dir: the path the lock guards; its lock file is :func:`lock_path` of it.
        what: how messages name it (default ``date group <group_id>``).

    Raises:
        ConfigError: a live run (or one on another host) holds the lock; names the lock file.
    """
    path = lock_path(group_dir)
    what = what or f"date group {group_id}"
    token = uuid.uuid4().hex
    body = json.dumps(lock_owner(token), sort_keys=True).encode()
    storage = root.storage
    for _ in range(CLAIM_ATTEMPTS):
        if storage.create_exclusive(path, body):
            return GroupLock(group_id, path, token)
        owner = _read_owner(root, path)
        if owner is None and not storage.exists(path):
            continue  # released between our attempt and the read
        mtime = storage.mtime(path)
        if owner is None or not is_stale(owner, None if mtime is None else time.time() - mtime):
            raise ConfigError(_held_message(what, path, owner))
        storage.delete_if_unchanged(path, owner)
        log.warning("%s: took over the stale lock %s of pid %s (that run is gone)", what, path, owner.get("pid"))
    raise ConfigError(_held_message(what, path, _read_owner(root, path)))


@contextlib.contextmanager
def held_briefly(root: OutputRoot, path: str, what: str, wait_s: float) -> Iterator[bool]:
    """Hold the lock of ``path`` around a short write, waiting up to ``wait_s`` while a live run
    holds it. Yields True while held, or False when it could not be had in time (nothing held)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lock = claim(root, what, path, what)
            break
        except ConfigError:
            if time.monotonic() >= deadline:
                yield False
                return
            time.sleep(BRIEF_LOCK_POLL_S)
    try:
        yield True
    finally:
        release(root, lock)


def renew(root: OutputRoot, lock: GroupLock) -> None:
    """Touch a held lock so other hosts see its run is alive (no-op if it is gone or not ours)."""
    owner = _read_owner(root, lock.path)
    if owner is not None and owner.get("token") == lock.token:
        root.storage.touch(lock.path)


def release(root: OutputRoot, lock: GroupLock) -> None:
    """Delete the lock file if it is still ours."""
    owner = _read_owner(root, lock.path)
    if owner is not None and owner.get("token") == lock.token:
        root.storage.delete_file(lock.path)


def release_all(root: OutputRoot, locks: dict[str, GroupLock]) -> None:
    """Release every lock still held (on success, failure or interrupt)."""
    while locks:
        _, lock = locks.popitem()
        try:
            release(root, lock)
        except Exception as err:  # noqa: BLE001 - releasing must not hide the run's own error
            log.warning("could not release lock %s (%s); delete it before the next run", lock.path, err)


@contextlib.contextmanager
def keep_alive(root: OutputRoot, locks: dict[str, GroupLock]) -> Iterator[None]:
    """Renew the locks held in ``locks`` every :data:`LOCK_RENEW_S` from a daemon thread."""
    stop = threading.Event()

    def renew_all() -> None:
        while not stop.wait(LOCK_RENEW_S):
            for lock in list(locks.values()):
                try:
                    renew(root, lock)
                except Exception as err:  # noqa: BLE001 - a missed renewal is not fatal
                    log.warning("could not renew lock %s: %s", lock.path, err)

    thread = threading.Thread(target=renew_all, name="raysam-lock-renew", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
