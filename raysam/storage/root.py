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
import uuid
from dataclasses import dataclass

from raysam.errors import ConfigError
from raysam.storage.backends import Storage, open_storage, storage_error

MARKER = "_COMPLETE.json"

@dataclass(frozen=True, eq=False)
class OutputRoot:
    """The output root: ``uri`` as configured, its :class:`Storage` and the base path on it."""

    uri: str
    storage: Storage
    base: str

    @classmethod
    def open(cls, uri: str) -> OutputRoot:
        """Resolve a local path or URI (``s3://bucket/prefix``); one line when it cannot be."""
        return _open_cached(uri)

    def __reduce__(self) -> tuple:
        return (OutputRoot.open, (self.uri,))

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

    def check_writable(self) -> None:
        """Create the base and write/delete a probe file, so an unwritable root fails before work."""
        probe = self.path(f".raysam-probe-{uuid.uuid4().hex}")
        try:
            self.storage.makedirs(self.base)
            self.storage.put_bytes(probe, b"ok")
            self.storage.delete_file(probe)
        except Exception as err:
            with contextlib.suppress(Exception):  # a probe created before the write failed
                self.storage.delete_file(probe)
            raise storage_error(self.base, err) from None


@functools.lru_cache(maxsize=8)
def _open_cached(uri: str) -> OutputRoot:
    try:
        storage, base = open_storage(uri)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError with long texts
        raise ConfigError(f"output.root={uri!r} cannot be opened: {str(err).splitlines()[0]}") from None
    return OutputRoot(uri, storage, base)
