"""Atomic, idempotent output directories (local paths or pyarrow-filesystem URIs).

Each date group's outputs are written into a local staging directory first and published
at the end: on a local root the staging directory is renamed into place (atomic on one
filesystem); on an object store (s3://, gs://) every file is PUT (atomic per object) and the
completion marker is PUT last. A date group counts as done only when its marker exists and
names the same run fingerprint, so an interrupted run never leaves a half-result that looks
whole, and a re-run skips what is complete.

A run claims each date group it is about to write with a lock file next to the group's
directory (``.<group>.lock``, created atomically with ``os.link``; on object stores a
best-effort put-then-read-back). A second run pointed at the same root stops with one line
naming the group and the lock; a lock left by a killed run on the same host (its pid is gone,
or now belongs to a younger process) is stale and taken over, and the staging directories that
run left behind are removed once the lock is held.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from raysam.errors import ConfigError

log = logging.getLogger(__name__)

MARKER = "_COMPLETE.json"
LOCK_SUFFIX = ".lock"
# What interrupted runs leave next to a group directory (staging_dir, _publish_local).
LEFTOVER_INFIXES = (".staging-", ".old-", ".tmp-")
CLAIM_ATTEMPTS = 3  # a stale lock is taken over at most this often before giving up
# A running driver touches its locks every LOCK_RENEW_S; a lock from another host (a preempted
# driver pod) that nobody touched for LOCK_LEASE_S is stale. Ten renewals of slack.
LOCK_RENEW_S = 60.0
LOCK_LEASE_S = 600.0


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


# "No space left on device", "File too large" (a file-size limit), "Disk quota exceeded".
_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_FULL_TEXTS = ("No space left", "File too large", "quota exceeded")


def storage_error(base: str, err: BaseException) -> ConfigError:
    """One line for a failed write under the output root: full (ENOSPC/EFBIG/EDQUOT) or not writable."""
    first = (str(err).splitlines() or [type(err).__name__])[0]
    if getattr(err, "errno", None) in _FULL_ERRNOS or any(t.lower() in first.lower() for t in _FULL_TEXTS):
        return ConfigError(f"output root {base!r} is full or cannot be written ({first}): free space, "
                           "raise the quota or choose another output.root")
    return ConfigError(f"output root {base!r} is not writable: {first}")


def _held_message(group_id: str, path: str, owner: dict | None) -> str:
    who = "an unreadable lock" if owner is None else (
        f"pid {owner.get('pid')} on host {owner.get('host')} since {owner.get('created_at')}")
    return (f"date group {group_id} is being written by another raysam run ({who}; lock file {path}): "
            f"wait for that run to finish, or if it is no longer running delete {path} and re-run")


@dataclass(frozen=True)
class OutputRoot:
    """The run's output root: a pyarrow filesystem and a base path on it."""

    fs: pafs.FileSystem
    base: str
    is_local: bool

    @classmethod
    def open(cls, root: str) -> OutputRoot:
        """Resolve a local path or URI (``s3://bucket/prefix``); fails clearly when it cannot."""
        try:
            fs, base = pafs.FileSystem.from_uri(root if "://" in root else str(Path(root).resolve()))
        except Exception as err:  # pyarrow raises ArrowInvalid / OSError with long texts
            raise ConfigError(f"output.root={root!r} cannot be opened: {str(err).splitlines()[0]}") from None
        return cls(fs=fs, base=base.rstrip("/"), is_local=isinstance(fs, pafs.LocalFileSystem))

    def path(self, *parts: str) -> str:
        """Join path components under the base; a component that could leave it is refused."""
        for part in parts:
            if not part or part in (".", "..") or any(c in part for c in "/\\\0"):
                raise ConfigError(f"output path component {part!r} could escape output.root: "
                                  "use letters, digits, '-', '_' and '.' in region names")
        return "/".join([self.base, *parts])

    def read_marker(self, group_dir: str) -> dict | None:
        """The completion marker of a date-group directory, or None when it is not complete."""
        info = self.fs.get_file_info(f"{group_dir}/{MARKER}")
        if info.type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(f"{group_dir}/{MARKER}") as f:
            return json.loads(f.read().decode())

    def is_complete(self, group_dir: str, fingerprint: str) -> bool:
        """True when ``group_dir`` holds a marker for this run fingerprint."""
        marker = self.read_marker(group_dir)
        return marker is not None and marker.get("fingerprint") == fingerprint

    def check_writable(self) -> None:
        """Create the base and write/delete a probe file, so an unwritable root fails before work."""
        probe = self.path(f".raysam-probe-{uuid.uuid4().hex}")
        try:
            self.fs.create_dir(self.base, recursive=True)
            with self.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            self.fs.delete_file(probe)
        except Exception as err:
            with contextlib.suppress(Exception):  # a probe created before the write failed
                self.fs.delete_file(probe)
            raise storage_error(self.base, err) from None

    def publish(self, staging: Path, group_dir: str, marker: dict) -> None:
        """Move a finished staging directory to ``group_dir`` and write the marker last."""
        (staging / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
        if self.is_local:
            self._publish_local(staging, Path(group_dir))
            return
        if self.fs.get_file_info(group_dir).type != pafs.FileType.NotFound:
            self.fs.delete_dir_contents(group_dir, missing_dir_ok=True)
        files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MARKER)
        for p in [*files, staging / MARKER]:
            dst = f"{group_dir}/{p.relative_to(staging).as_posix()}"
            self.fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(dst) as out, p.open("rb") as src:
                shutil.copyfileobj(src, out, length=1 << 22)
        shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _publish_local(staging: Path, final: Path) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # an incomplete or outdated earlier attempt: move it aside, then drop it
            trash = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        if staging.stat().st_dev == final.parent.stat().st_dev:
            staging.rename(final)
        else:
            tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
            shutil.copytree(staging, tmp)
            tmp.rename(final)
            shutil.rmtree(staging, ignore_errors=True)

    def lock_path(self, group_dir: str) -> str:
        """The lock file of a date-group directory: ``.<group>.lock`` next to it."""
        parent, name = group_dir.rsplit("/", 1)
        return f"{parent}/.{name}{LOCK_SUFFIX}"

    def claim(self, group_id: str, group_dir: str) -> GroupLock:
        """Take the date group's lock, taking over a stale one; one line if another run holds it.

        Raises:
            ConfigError: a live run (or one on another host) holds the lock; names the lock file.
        """
        path = self.lock_path(group_dir)
        token = uuid.uuid4().hex
        body = json.dumps(lock_owner(token), sort_keys=True).encode()
        for _ in range(CLAIM_ATTEMPTS):
            if self._create_exclusive(path, body, token):
                return GroupLock(group_id, path, token)
            owner = self._read_json(path)
            if owner is None and self.fs.get_file_info(path).type == pafs.FileType.NotFound:
                continue  # released between our attempt and the read
            if owner is None or not is_stale(owner, self._age_s(path)):
                raise ConfigError(_held_message(group_id, path, owner))
            self._drop_stale(path, owner)
            log.warning("date group %s: took over the stale lock %s of pid %s (that run is gone)",
                        group_id, path, owner.get("pid"))
        raise ConfigError(_held_message(group_id, path, self._read_json(path)))

    def renew(self, lock: GroupLock) -> None:
        """Touch a held lock so other hosts see its run is alive (no-op if it is gone or not ours)."""
        owner = self._read_json(lock.path)
        if owner is None or owner.get("token") != lock.token:
            return
        if self.is_local:
            with contextlib.suppress(FileNotFoundError):
                os.utime(lock.path)
            return
        with self.fs.open_output_stream(lock.path) as f:
            f.write(json.dumps(owner, sort_keys=True).encode())

    @contextlib.contextmanager
    def keep_alive(self, locks: list[GroupLock]) -> Iterator[None]:
        """Renew ``locks`` every :data:`LOCK_RENEW_S` from a daemon thread while the block runs."""
        stop = threading.Event()

        def renew_all() -> None:
            while not stop.wait(LOCK_RENEW_S):
                for lock in locks:
                    try:
                        self.renew(lock)
                    except Exception as err:  # noqa: BLE001 - a missed renewal is not fatal
                        log.warning("could not renew lock %s: %s", lock.path, err)

        thread = threading.Thread(target=renew_all, name="raysam-lock-renew", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def _age_s(self, path: str) -> float | None:
        mtime = self.fs.get_file_info(path).mtime
        return None if mtime is None else time.time() - mtime.timestamp()

    def release(self, lock: GroupLock) -> None:
        """Delete the lock file if it is still ours."""
        owner = self._read_json(lock.path)
        if owner is not None and owner.get("token") == lock.token:
            self.fs.delete_file(lock.path)

    def remove_leftovers(self, group_dir: str) -> int:
        """Delete what interrupted runs left next to ``group_dir``; call only while holding its lock.

        Returns:
            How many staging/temporary entries were removed (local roots; 0 on object stores,
            whose staging lives in the local temp directory of the run that made it).
        """
        if not self.is_local:
            return 0
        final = Path(group_dir)
        if not final.parent.is_dir():
            return 0
        prefix = f".{final.name}."
        removed = 0
        for entry in final.parent.iterdir():
            rest = entry.name[len(prefix):] if entry.name.startswith(prefix) else ""
            if any(rest.startswith(i[1:]) for i in LEFTOVER_INFIXES) or rest.startswith("lock."):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
                removed += 1
        return removed

    def _read_json(self, path: str) -> dict | None:
        try:
            with self.fs.open_input_stream(path) as f:
                value = json.loads(f.read().decode())
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return None
        except OSError as err:  # pyarrow's "Path does not exist" is an OSError on some filesystems
            if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
                return None
            raise ConfigError(f"cannot read lock file {path}: {str(err).splitlines()[0]}") from None
        return value if isinstance(value, dict) else None

    def _create_exclusive(self, path: str, body: bytes, token: str) -> bool:
        """Create ``path`` holding ``body`` unless it exists (atomic locally, best effort remotely)."""
        if not self.is_local:
            if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
                return False
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(path) as f:
                f.write(body)
            return (self._read_json(path) or {}).get("token") == token
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.{token}")
        tmp.write_bytes(body)  # complete before it appears under the lock's name
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: O_EXCL, written right after
            return self._create_excl_open(path, body)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _create_excl_open(path: str, body: bytes) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        return True

    def _drop_stale(self, path: str, owner: dict) -> None:
        """Remove a stale lock, unless another run replaced it meanwhile (then put theirs back)."""
        if not self.is_local:
            self.fs.delete_file(path)
            return
        trash = Path(f"{path}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return  # another run took it over first; the next attempt sees its lock
        try:
            if json.loads(trash.read_text()) != owner:
                with contextlib.suppress(FileExistsError):
                    os.link(trash, path)
        finally:
            trash.unlink(missing_ok=True)

    def staging_dir(self, group_dir: str) -> Path:
        """A fresh local staging directory (next to the target on local roots, so rename is atomic)."""
        if self.is_local:
            parent = Path(group_dir).parent
            parent.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=f".{Path(group_dir).name}.staging-", dir=parent))
        return Path(tempfile.mkdtemp(prefix="raysam-staging-"))
