"""Where outputs live: a local filesystem or an object store, behind one small interface.

Everything under the output root (chip checkpoints, tiles, parts, mosaics, manifests, markers,
locks) is written through a :class:`Storage`. Every write is atomic: a local file is written
under a temporary name in its directory and renamed into place; an object is one PUT (a
multipart upload that completes at close). Readers therefore see a whole file or none.

:class:`LocalStorage` uses the OS (``os.replace``, ``os.link`` for exclusive creation);
:class:`ObjectStorage` uses a pyarrow filesystem (``s3://``, ``gs://``, and anything else
``pyarrow.fs.FileSystem.from_uri`` accepts). Paths are ``/``-separated strings.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pyarrow.fs as pafs

from raysam.errors import ConfigError


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


@contextlib.contextmanager
def _writing(path: str) -> Iterator[None]:
    """Turn a failed write (full disk, quota, permissions, a refused PUT) into :func:`storage_error`'s
    one line: it is not cured by retrying, and every task writing there would fail the same way."""
    try:
        yield
    except OSError as err:
        raise storage_error(path.rsplit("/", 1)[0], err) from None


def _tmp_name(path: str) -> str:
    head, _, name = path.rpartition("/")
    return f"{head}/.{name}.tmp-{uuid.uuid4().hex[:12]}"


class LocalStorage:
    """A directory tree on a filesystem this process can see (one machine, or a shared mount)."""

    is_local = True

    def put_bytes(self, path: str, data: bytes) -> None:
        """Write ``path`` atomically (temporary name in the same directory, then rename)."""
        with self.put_file(path) as local:
            local.write_bytes(data)

    @contextlib.contextmanager
    def put_file(self, path: str) -> Iterator[Path]:
        """Yield a local path to write; on success it replaces ``path`` atomically, else it is removed."""
        with _writing(path):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(_tmp_name(path))
        try:
            with _writing(path):
                yield tmp
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def read_bytes(self, path: str) -> bytes:
        return Path(path).read_bytes()

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    def list_names(self, path: str) -> list[str]:
        """Names of the entries directly in directory ``path`` (none if it does not exist)."""
        try:
            return sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete_file(self, path: str) -> None:
        Path(path).unlink(missing_ok=True)

    def delete_tree(self, path: str) -> None:
        """Remove a directory and everything in it (or a file); nothing if it does not exist."""
        p = Path(path)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)

    def makedirs(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)

    def delete_empty_dir(self, path: str) -> None:
        """Remove a directory only if it is empty (another run may be filling it)."""
        with contextlib.suppress(OSError):
            os.rmdir(path)

    def mtime(self, path: str) -> float | None:
        try:
            return os.stat(path).st_mtime
        except FileNotFoundError:
            return None

    def touch(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)

    def create_exclusive(self, path: str, body: bytes) -> bool:
        """Create ``path`` holding ``body`` unless it exists; atomic (hard link of a complete file)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(_tmp_name(path))
        tmp.write_bytes(body)  # complete before it appears under its name
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: O_EXCL, written right after
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def delete_if_unchanged(self, path: str, expected: dict) -> None:
        """Delete the JSON file ``path`` if it still holds ``expected`` (a stale lock being taken over).

        It is moved aside first, so a replacement written meanwhile by another run is put back.
        """
        trash = Path(f"{path}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return  # another run took it over first
        try:
            if json.loads(trash.read_text()) != expected:
                with contextlib.suppress(FileExistsError):
                    os.link(trash, path)
        finally:
            trash.unlink(missing_ok=True)

    def rename_dir(self, src: str, dst: str) -> None:
        """Move directory ``src`` to ``dst`` (which must not exist); atomic on one filesystem."""
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        if os.stat(src).st_dev == os.stat(Path(dst).parent).st_dev:
            os.rename(src, dst)
            return
        tmp = _tmp_name(dst)
        shutil.copytree(src, tmp)
        os.rename(tmp, dst)
        shutil.rmtree(src, ignore_errors=True)


class ObjectStorage:
    """An object store (or any pyarrow filesystem): one PUT per file, no rename, no exclusive create."""

    is_local = False

    def __init__(self, fs: pafs.FileSystem):
        self.fs = fs

    def put_bytes(self, path: str, data: bytes) -> None:
        with _writing(path), self.fs.open_output_stream(path) as out:
            out.write(data)

    @contextlib.contextmanager
    def put_file(self, path: str) -> Iterator[Path]:
        """Yield a local temporary path to write; on success it is uploaded to ``path`` in one PUT."""
        fd, name = tempfile.mkstemp(prefix="raysam-put-", suffix=Path(path).suffix)
        os.close(fd)
        local = Path(name)
        try:
            yield local
            with _writing(path), self.fs.open_output_stream(path) as out, local.open("rb") as src:
                shutil.copyfileobj(src, out, length=1 << 22)
        finally:
            local.unlink(missing_ok=True)

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def _type(self, path: str) -> pafs.FileType:
        return self.fs.get_file_info(path).type

    def exists(self, path: str) -> bool:
        return self._type(path) != pafs.FileType.NotFound

    def is_dir(self, path: str) -> bool:
        return self._type(path) == pafs.FileType.Directory

    def list_names(self, path: str) -> list[str]:
        selector = pafs.FileSelector(path, allow_not_found=True, recursive=False)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))

    def delete_file(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(path)

    def delete_tree(self, path: str) -> None:
        kind = self._type(path)
        if kind == pafs.FileType.Directory:
            self.fs.delete_dir(path)
        elif kind == pafs.FileType.File:
            self.fs.delete_file(path)

    def makedirs(self, path: str) -> None:
        self.fs.create_dir(path, recursive=True)

    def delete_empty_dir(self, path: str) -> None:
        """Nothing to do: an object store has no empty directories to leave behind."""

    def mtime(self, path: str) -> float | None:
        info = self.fs.get_file_info(path)
        return None if info.type == pafs.FileType.NotFound or info.mtime is None else info.mtime.timestamp()

    def touch(self, path: str) -> None:
        """Rewrite the object with its own bytes, which renews its modification time."""
        if self.exists(path):
            self.put_bytes(path, self.read_bytes(path))

    def create_exclusive(self, path: str, body: bytes) -> bool:
        """Best effort (no create-if-absent on object stores): put unless present, then read it back."""
        if self.exists(path):
            return False
        self.put_bytes(path, body)
        return self.read_bytes(path) == body

    def delete_if_unchanged(self, path: str, expected: dict) -> None:
        with contextlib.suppress(FileNotFoundError, OSError, ValueError):
            if json.loads(self.read_bytes(path)) != expected:
                return
        self.delete_file(path)


Storage = LocalStorage | ObjectStorage


def open_storage(uri: str, timeout_s: float | None = None) -> tuple[Storage, str]:
    """The storage and base path of a local path or URI; raises what pyarrow raises for a bad URI.

    Args:
        uri: a local path (``~`` expanded), ``file://``, ``s3://``, ``gs://`` or another URI
            that ``pyarrow.fs.FileSystem.from_uri`` accepts.
        timeout_s: bound on each object-store request: S3's connect and request timeouts,
            GCS's retry time limit (each unless the URI sets its own). None: the clients' defaults.
    """
    if "://" not in uri or uri.startswith("file://"):
        local = uri[len("file://"):] if uri.startswith("file://") else uri
        return LocalStorage(), str(Path(os.path.expanduser(local)).resolve())
    fs, base = pafs.FileSystem.from_uri(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return LocalStorage(), str(Path(base).resolve())
    return ObjectStorage(with_timeouts(fs, timeout_s)), base.rstrip("/")


def with_timeouts(fs: pafs.FileSystem, timeout_s: float | None) -> pafs.FileSystem:
    """``fs`` rebuilt with its options plus request timeouts (S3, GCS); other filesystems as they are.

    Without them a request to an endpoint that accepts connections but never answers waits
    for as long as the client's retry policy allows (GCS: 15 minutes by default).
    """
    if timeout_s is None or not isinstance(fs, pafs.S3FileSystem | pafs.GcsFileSystem):
        return fs
    options = dict(fs.__reduce__()[1][0])  # the options the URI gave, as pyarrow pickles them
    if isinstance(fs, pafs.S3FileSystem):
        for key in ("connect_timeout", "request_timeout"):
            if options.get(key, -1) < 0:
                options[key] = float(timeout_s)
        return pafs.S3FileSystem(**options)
    if options.get("retry_time_limit") is None:
        options["retry_time_limit"] = timedelta(seconds=max(1.0, float(timeout_s)))
    return pafs.GcsFileSystem(**options)
