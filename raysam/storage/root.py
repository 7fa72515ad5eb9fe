"""The run's output root: a storage backend, a base path, safe path joins and completion markers.

A date group counts as done only when its directory holds :data:`MARKER` naming the same
group fingerprint, so an interrupted run never leaves a half-result that looks whole, and a
re-run skips what is complete. An :class:`OutputRoot` pickles as its URI: Ray tasks that get
one reopen the filesystem in their own process, so no credentials travel in task arguments.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from raysam.errors import ConfigError
from raysam.storage.backends import Storage, open_storage, storage_error

MARKER = "_COMPLETE.json"

@dataclass(frozen=True, eq=False)
class OutputRoot:
    """The output root: ``uri`` as configured, its :class:`Storage`, the base path on it, and
    the bound on each object-store request (``output.timeout_s``; None: the clients' own)."""

    uri: str
    storage: Storage
    base: str
    timeout_s: float | None = None

    @classmethod
    def open(cls, uri: str, timeout_s: float | None = None) -> OutputRoot:
        """Resolve a local path or URI (``s3://bucket/prefix``); one line when it cannot be."""
        return _open_cached(uri, timeout_s)

    def __reduce__(self) -> tuple:
        return (OutputRoot.open, (self.uri, self.timeout_s))

    @property
    def is_local(self) -> bool:
        return self.storage.is_local

    def path(self, *parts: str) -> str:
        """Join path components under the base; a component that could leave it is refused."""
        for part in parts:
            if not part or part in (".", "..") or any(c in part for c in "/\\\0"):
                raise ConfigError(f"output path component {part!r} could escape output.root: "
                                  "use letters, digits, '-', '_' and '.' in region names")
        return "/".join([self.base, *parts])

    def read_json(self, path: str) -> dict | None:
        """A JSON object stored at ``path``, or None when it is missing or not a JSON object."""
        try:
            value = json.loads(self.storage.read_bytes(path).decode())
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return None
        except OSError:  # pyarrow's "Path does not exist" is an OSError on some filesystems
            if not self.storage.exists(path):
                return None
            raise
        return value if isinstance(value, dict) else None

    def write_json(self, path: str, value: dict) -> None:
        """Store a JSON object atomically."""
        self.storage.put_bytes(path, json.dumps(value, indent=2, sort_keys=True, default=str).encode())

    def read_marker(self, group_dir: str) -> dict | None:
        """The completion marker of a date-group directory, or None when it is not complete."""
        return self.read_json(f"{group_dir}/{MARKER}")

    def is_complete(self, group_dir: str, fingerprint: str) -> bool:
        """True when ``group_dir`` holds a marker for this group fingerprint."""
        marker = self.read_marker(group_dir)
        return marker is not None and marker.get("fingerprint") == fingerprint

    def missing_dirs(self) -> tuple[str, ...]:
        """The base directory and those of its ancestors that do not exist yet, deepest first
        (local roots; an object store has no directories). A failed run removes them if empty."""
        if not self.is_local:
            return ()
        missing, path = [], Path(self.base)
        while not path.exists() and path != path.parent:
            missing.append(str(path))
            path = path.parent
        return tuple(missing)

    def check_reachable(self) -> None:
        """Fail in one line, within :attr:`timeout_s`, if the root cannot be reached or a local
        root is not a directory that this process can create and write."""
        if self.is_local:
            _check_local_dir(self.uri, Path(self.base))
            return
        try:
            self._bounded(lambda: self.storage.exists(self.base), "reached")
        except ConfigError:
            raise
        except Exception as err:  # pyarrow: OSError with the client's long text
            first = " ".join((str(err).splitlines() or [type(err).__name__])[0].split())[:200]
            raise ConfigError(f"output.root={self.uri!r} cannot be reached ({first}): check the endpoint, the "
                              "network and the credentials") from None

    def check_writable(self) -> None:
        """Create the base and write/delete a probe file, so an unwritable root fails before work.

        Directories the probe had to create are removed again: the run creates what it writes.
        """
        probe = self.path(f".raysam-probe-{uuid.uuid4().hex}")
        created = self.missing_dirs()

        def write_probe() -> None:
            self.storage.makedirs(self.base)
            self.storage.put_bytes(probe, b"ok")
            self.storage.delete_file(probe)

        try:
            self._bounded(write_probe, "written")
        except ConfigError:
            raise
        except Exception as err:
            with contextlib.suppress(Exception):  # a probe created before the write failed
                self.storage.delete_file(probe)
            raise storage_error(self.base, err) from None
        finally:
            for path in created:
                self.storage.delete_empty_dir(path)

    def _bounded(self, call, what: str):
        """``call()`` within :attr:`timeout_s` (unbounded when None); one line if it hangs."""
        if self.timeout_s is None:
            return call()
        from raysam.deadline import bounded

        return bounded(call, self.timeout_s, lambda: ConfigError(
            f"output.root={self.uri!r} could not be {what} within {self.timeout_s:g} s "
            "(output.timeout_s): check the network, the endpoint and the credentials, or raise output.timeout_s"))


def _check_local_dir(uri: str, base: Path) -> None:
    """A local root must be a directory, or creatable in the nearest existing ancestor."""
    path = base
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        where = "is a file" if path == base else f"is under {path}, which is a file"
        raise ConfigError(f"output.root={uri!r} {where}, not a directory: choose a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"output root {str(base)!r} is not writable: {path} does not let this user "
                          "create files; choose another output.root or fix its permissions")


@functools.lru_cache(maxsize=8)
def _open_cached(uri: str, timeout_s: float | None) -> OutputRoot:
    try:
        storage, base = open_storage(uri, timeout_s)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError with long texts
        raise ConfigError(f"output.root={uri!r} cannot be opened: {str(err).splitlines()[0]}") from None
    return OutputRoot(uri, storage, base, timeout_s)
