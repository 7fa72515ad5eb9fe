"""Download model checkpoints: resumable (HTTP Range on a ``.part`` file) and checksummed.

No torch here; :mod:`raysam.export` and ``scripts/export_sam_models.py`` use it to fetch the
official SAM weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import requests

from raysam.errors import ModelError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 16  # what a dropped connection can lose; the rest is resumed
SAM_URL_BASE = "https://dl.fbaipublicfiles.com/segment_anything/"


@dataclass(frozen=True)
class Checkpoint:
    """One downloadable checkpoint.

    Attributes:
        url: where to download it.
        sha256: the expected hex digest, or None when no published value is known (then only
            the size is checked, with a warning).
        bytes: the expected size in bytes, or None.
    """

    url: str
    sha256: str | None
    bytes: int | None = None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


# The official checkpoints (URLs from the segment-anything README). Meta publishes no digests;
# these sha256 values and sizes are the ones public code verifies the files against, e.g.
# computational-cell-analytics/micro-sam (``_CHECKSUMS``) and several download scripts.
SAM_CHECKPOINTS: dict[str, Checkpoint] = {
    "vit_h": Checkpoint(SAM_URL_BASE + "sam_vit_h_4b8939.pth",
                        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2564550879),
    "vit_l": Checkpoint(SAM_URL_BASE + "sam_vit_l_0b3195.pth",
                        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1249524607),
    "vit_b": Checkpoint(SAM_URL_BASE + "sam_vit_b_01ec64.pth",
                        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375042383),
}


def sha256_file(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_once(url: str, part: Path, timeout_s: float) -> bool:
    """Append the rest of ``url`` to ``part`` (Range from its size); True when the body is complete."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout_s) as response:
        if response.status_code == 416:  # nothing left to fetch: the part file is already whole
            return True
        response.raise_for_status()
        mode = "ab" if offset and response.status_code == 206 else "wb"  # 200: server ignored Range
        with open(part, mode) as f:
            for chunk in response.iter_content(CHUNK_BYTES):
                f.write(chunk)
    return True


def _verify(part: Path, checkpoint: Checkpoint) -> None:
    """Check size and sha256 of a finished download; delete it and raise ModelError on mismatch."""
    size = part.stat().st_size
    if checkpoint.bytes is not None and size != checkpoint.bytes:
        part.unlink()
        raise ModelError(f"download of {checkpoint.url} has {size} bytes, expected {checkpoint.bytes}: "
                         "the partial file was deleted, run the command again")
    if checkpoint.sha256 is None:
        log.warning("NO PUBLISHED SHA256 for %s: checked the size only (%d bytes)", checkpoint.url, size)
        return
    digest = sha256_file(part)
    if digest != checkpoint.sha256:
        part.unlink()
        raise ModelError(f"checksum mismatch for {checkpoint.url} (sha256 {digest}, expected "
                         f"{checkpoint.sha256}): the file was deleted, run the command again or check the URL")


def download_checkpoint(checkpoint: Checkpoint, dest_dir: str | Path, *, retries: int = 5,
                        timeout_s: float = 30.0) -> Path:
    """Download ``checkpoint`` into ``dest_dir`` unless a verified copy is already there.

    The body goes to ``<name>.part``; a download interrupted after some progress is resumed
    with an HTTP Range request (up to ``retries`` times, and on the next call); a URL that
    cannot be reached at all fails at once. The finished file is checked
    against the expected size and sha256, then renamed to ``<name>``.

    Args:
        checkpoint: URL, sha256 and size.
        dest_dir: the cache folder (created).
        retries: attempts after a dropped connection.
        timeout_s: connect/read timeout of each request.

    Returns:
        The path of the verified file.

    Raises:
        ModelError: unreachable URL (offline), HTTP error, or size/checksum mismatch.
    """
    dest_dir = Path(dest_dir).expanduser()
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / checkpoint.filename
    if dest.exists() and (checkpoint.sha256 is None or sha256_file(dest) == checkpoint.sha256):
        return dest
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        size_before = part.stat().st_size if part.exists() else 0
        try:
            _fetch_once(checkpoint.url, part, timeout_s)
            break
        except requests.HTTPError as err:
            raise ModelError(f"cannot download {checkpoint.url}: HTTP {err.response.status_code}; "
                             f"check the URL, or put {dest.name} into {dest_dir} by hand") from err
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
            made_progress = part.exists() and part.stat().st_size > size_before
            if attempt == retries or not made_progress:  # unreachable: say so at once
                raise ModelError(f"cannot download {checkpoint.url} ({type(err).__name__}); are you offline? "
                                 f"connect and re-run (the download resumes), or put {dest.name} into {dest_dir}") from err
            log.warning("download of %s interrupted (%s), resuming", checkpoint.url, type(err).__name__)
    _verify(part, checkpoint)
    os.replace(part, dest)
    return dest
