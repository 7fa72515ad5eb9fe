"""Atomic, idempotent output directories (local paths or pyarrow-filesystem URIs).

Each date group's outputs are written into a local staging directory first and published
at the end: on a local root the staging directory is renamed into place (atomic on one
filesystem); on an object store (s3://, gs://) every file is PUT (atomic per object) and the
completion marker is PUT last. A date group counts as done only when its marker exists and
names the same run fingerprint, so an interrupted run never leaves a half-result that looks
whole, and a re-run skips what is complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from raysam.errors import ConfigError

MARKER = "_COMPLETE.json"


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
        """Join path components under the base."""
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
            raise ConfigError(f"output root {self.base!r} is not writable: {str(err).splitlines()[0]}") from None

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

    def staging_dir(self, group_dir: str) -> Path:
        """A fresh local staging directory (next to the target on local roots, so rename is atomic)."""
        if self.is_local:
            parent = Path(group_dir).parent
            parent.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=f".{Path(group_dir).name}.staging-", dir=parent))
        return Path(tempfile.mkdtemp(prefix="raysam-staging-"))
