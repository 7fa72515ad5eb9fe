"""Where a SAM actor gets its model: a directory every worker sees, or the files' bytes."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSource:
    """Where an actor gets its model: a directory every worker can see, or the files' bytes.

    Bytes travel through Ray's object store (the dataclass is pickled into the actor's
    constructor arguments) and are written once to a local cache keyed by their hash.
    """

    path: str
    files: tuple[tuple[str, bytes], ...] = ()

    @classmethod
    def from_path(cls, path: Path, ship_bytes: bool) -> ModelSource:
        """Reference ``path``, or read its files to ship them when workers cannot see it."""
        if not ship_bytes:
            return cls(path=str(Path(path).resolve()))
        files = tuple((p.name, p.read_bytes()) for p in sorted(Path(path).iterdir()) if p.is_file())
        return cls(path=str(path), files=files)

    def materialise(self) -> Path:
        """A local directory holding the model (written once per content hash)."""
        if not self.files:
            return Path(self.path)
        digest = hashlib.sha256(b"".join(name.encode() + data for name, data in self.files)).hexdigest()[:16]
        target = Path(tempfile.gettempdir()) / "raysam-models" / digest
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=target.parent))
            for name, data in self.files:
                (staging / name).write_bytes(data)
            try:
                staging.rename(target)
            except OSError:  # another actor on this node won the race
                shutil.rmtree(staging, ignore_errors=True)
        return target
