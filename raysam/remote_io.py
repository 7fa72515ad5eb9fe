"""Remote COG I/O: how chip reads open an asset and survive the network.

:func:`read_asset` opens one band's asset through the href signer, checks that the file is
what its item says, applies a read function and retries as a :class:`NetworkPolicy` says.
Flaky networks meet two deliberate lines of retries: GDAL's own per-request retries
(timeouts, resets, 429/5xx; :func:`gdal_env_options`), then raysam's bounded retries with
backoff around each band read. Open datasets are kept in a small per-thread LRU cache keyed by
the *unsigned* href (a signed URL changes when its token is refreshed); a read that fails with
HTTP 403 drops the cached dataset, re-signs and reopens once. Errors stay one line and never
show a signed URL's query string: messages cut it off, and a logging
filter cuts it from GDAL's log lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import rasterio
from rasterio.errors import RasterioError

from raysam.errors import ConfigError, DataError
from raysam.grid import BandRead

MAX_REASON_CHARS = 200
INTEGER_DN_DTYPES = ("uint16", "uint8", "int16")  # L2A bands (uint16) and SCL (uint8)
# Open datasets kept per thread: a date group's 2-4 items x 4-5 bands, with room for two groups.
DEFAULT_DATASET_CACHE_SIZE = 32

Signer = Callable[[str], str]


@dataclass(frozen=True)
class NetworkPolicy:
    """How COG reads over HTTP survive a flaky network: GDAL's retries first, then raysam's.

    GDAL (``/vsicurl/``) retries each HTTP request itself on 429/5xx, connection resets and
    timeouts (``gdal_retries`` times, the delay starting at ``gdal_retry_delay_s`` and about
    doubling). When a band read still fails, raysam drops the dataset and reopens it, up to
    ``tries`` attempts in all, sleeping ``backoff_s`` doubled per retry (capped at
    ``max_backoff_s``). An HTTP 403 (expired signature) is never retried as is: the href is
    re-signed once (the signer's ``resign``). Permanent answers (400, 401, 404, 410, 416) and
    local files fail at once. So one asset costs at most
    ``(tries + 1) * (gdal_retries + 1)`` requests per byte range before a one-line DataError.

    Attributes:
        timeout_s: GDAL_HTTP_TIMEOUT, seconds one HTTP request may take.
        connect_timeout_s: GDAL_HTTP_CONNECTTIMEOUT, seconds to connect.
        gdal_retries: GDAL_HTTP_MAX_RETRY, GDAL's retries of one request.
        gdal_retry_delay_s: GDAL_HTTP_RETRY_DELAY, GDAL's first delay between retries.
        tries: raysam's attempts per band read (1: no retry beyond GDAL's).
        backoff_s: raysam's first delay between attempts, doubled each retry.
        max_backoff_s: cap on raysam's delay.
    """

    timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    gdal_retries: int = 4
    gdal_retry_delay_s: float = 1.0
    tries: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        if min(self.timeout_s, self.connect_timeout_s) <= 0:
            raise ConfigError(f"read timeouts must be > 0 s, got timeout_s={self.timeout_s}, "
                              f"connect_timeout_s={self.connect_timeout_s}: e.g. 30 and 10")
        if self.gdal_retries < 0 or self.tries < 1:
            raise ConfigError(f"read retries must be gdal_retries >= 0 and tries >= 1, got "
                              f"{self.gdal_retries} and {self.tries}: e.g. 4 and 3")
        if min(self.gdal_retry_delay_s, self.backoff_s, self.max_backoff_s) < 0:
            raise ConfigError("read retry delays must be >= 0 s: e.g. gdal_retry_delay_s=1, "
                              "backoff_s=1, max_backoff_s=30")

    def delay_s(self, retry: int) -> float:
        """raysam's sleep before its ``retry``-th retry (1, 2, ...)."""
        return min(self.backoff_s * 2.0 ** (retry - 1), self.max_backoff_s)


DEFAULT_NETWORK = NetworkPolicy()
# The GDAL options NetworkPolicy sets; one already set in the environment wins (GDAL users' habit).
_POLICY_OPTIONS = {
    "GDAL_HTTP_TIMEOUT": "timeout_s",
    "GDAL_HTTP_CONNECTTIMEOUT": "connect_timeout_s",
    "GDAL_HTTP_MAX_RETRY": "gdal_retries",
    "GDAL_HTTP_RETRY_DELAY": "gdal_retry_delay_s",
}
# HTTP answers that another try cannot change (403 is handled by re-signing).
PERMANENT_HTTP = (400, 401, 404, 405, 410, 416)


# Bounded caches of a reading worker. Measured on one worker reading the 441 chips of a full
# 10,980 px tile, private memory grew 236 -> 1,369 MB with GDAL's defaults (a block cache of 5 %
# of RAM, 25 MB of VSI cache per open file); VSI_CACHE_SIZE=1 MB keeps the second flat. The block
# cache holds what neighbouring chips share (a chip's 3 x 3 blocks of 512 px per band): 32 MB, in
# bytes, since rasterio hands an int GDAL_CACHEMAX to GDALSetCacheMax64. The 64 that stood here
# was 64 bytes, no cache at all, and every chip decoded its blocks again: demo chips read in
# 116 ms without the cache, 97 ms with 32 MB, 99 ms with 64 MB; 95 / 75 / 77 ms at overlap 0.93.
GDAL_CACHEMAX_BYTES = 32 * 2**20
GDAL_CACHES = {"GDAL_CACHEMAX": GDAL_CACHEMAX_BYTES, "VSI_CACHE_SIZE": "1000000"}  # bytes, both


def gdal_env_options(policy: NetworkPolicy | None = None) -> dict[str, Any]:
    """GDAL options for reading COGs over HTTP (used as ``rasterio.Env(**options)``).

    The retry and timeout options come from ``policy``; the caches are bounded
    (:data:`GDAL_CACHES`), since a worker reads chip after chip across a whole region and GDAL's
    defaults (a block cache of 5 % of the node's RAM, 25 MB per open file, and up to
    :data:`DEFAULT_DATASET_CACHE_SIZE` files kept open) made its memory grow with the area read.
    Options already set as environment variables win (``GDAL_HTTP_TIMEOUT=5`` in the environment).
    """
    policy = policy or DEFAULT_NETWORK
    options = {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no directory listing per open
        "GDAL_HTTP_MULTIRANGE": "YES",  # one request for several byte ranges
        "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
        "VSI_CACHE": "TRUE",
        "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF",
        **{k: v for k, v in GDAL_CACHES.items() if k not in os.environ},
    }
    for option, attr in _POLICY_OPTIONS.items():  # GDAL retries 429/5xx, resets, timeouts
        if option not in os.environ:
            value = getattr(policy, attr)
            options[option] = f"{value:g}"
    return options


def check_source(item_id: str, band: BandRead, src: rasterio.DatasetReader) -> None:
    """Refuse a file that is not what its item says (permanent: a DataError is never retried)."""
    if src.dtypes[0] not in INTEGER_DN_DTYPES:
        raise DataError(f"item {item_id} asset {band.key}: {_without_query(band.href)} holds "
                        f"{src.dtypes[0]} pixels, not Sentinel-2 L2A integer DNs "
                        f"({', '.join(INTEGER_DN_DTYPES)}): fix the catalog's href")
    file_epsg = src.crs.to_epsg() if src.crs else None
    if band.epsg is not None and file_epsg != band.epsg:
        raise DataError(f"item {item_id} asset {band.key}: {_without_query(band.href)} is in "
                        f"{src.crs.to_string() if src.crs else 'no CRS'}, but the item declares "
                        f"EPSG:{band.epsg} (proj:epsg/proj:code): fix the catalog or the file")


def read_asset(item_id: str, band: BandRead, signer: Signer | None,
               fn: Callable[[rasterio.DatasetReader], Any],
               policy: NetworkPolicy | None = None) -> Any:
    """Apply ``fn`` to the band's open dataset (cached, checked), retrying as ``policy`` says.

    The dataset is refused first if it is not what the item says (:func:`check_source`). After an HTTP 403 the href is re-signed and reopened, once. A block read from a dataset
    opened earlier fails with no status code in the error (GDAL only logs the 403), so the
    first failure of a cached dataset also counts as a possible expiry. Other failures of a
    remote asset are retried with backoff on a freshly opened dataset, up to ``policy.tries``
    attempts; permanent ones (404, a corrupt file, a local path) are not.

    Raises:
        DataError: one line naming the item, the asset and the unsigned href (never a token).
    """
    policy = policy or DEFAULT_NETWORK
    href = None  # None: the cached dataset, or the signer's href
    was_cached = _DATASETS.holds(band.href)
    tries = resigned = 0
    while True:
        try:
            with _uncached_if_failed(band.href, retry=tries > 0), \
                    _DATASETS.dataset(band.href, href or (signer or _unsigned),
                                      fresh=tries > 0) as src:
                check_source(item_id, band, src)
                return fn(src)
        except (RasterioError, OSError) as err:
            if _is_remote(band.href):
                _FAILED_REMOTE.add(band.href)
            tries += 1
            resign = getattr(signer, "resign", None)
            if not resigned and resign is not None and (
                    _is_forbidden(err) or (was_cached and tries == 1)):
                href, resigned = resign(band.href), 1
                continue
            retries = tries - resigned
            if retries >= policy.tries or not _retryable(band.href, err):
                raise DataError(f"item {item_id} asset {band.key}: cannot read "
                                f"{_without_query(band.href)}: {_reason(err)} "
                                f"(after {tries} tries)") from None
            time.sleep(policy.delay_s(retries))


# Remote hrefs that failed in this process. GDAL's /vsicurl/ remembers a failed URL for the life
# of the process and answers later opens with the same error without asking the server again,
# so a retry (or a later chip) must bypass its cache: CPL_VSIL_CURL_NON_CACHED. GDAL splits
# that option's value on ':', so a URL there stands for its scheme prefix (/vsicurl/http): the
# bypass covers every HTTP asset, but only for the few attempts that follow a failure.
_FAILED_REMOTE: set[str] = set()


def _uncached_if_failed(href: str, retry: bool) -> contextlib.AbstractContextManager:
    """A rasterio.Env bypassing GDAL's cache for a remote href that failed before, else a no-op."""
    if not _is_remote(href) or not (retry or href in _FAILED_REMOTE):
        return contextlib.nullcontext()
    return rasterio.Env(CPL_VSIL_CURL_NON_CACHED=_vsi_path(href))


def _vsi_path(href: str) -> str:
    """GDAL's name for a remote href (``/vsicurl/https://...``)."""
    scheme = href.split("://", 1)[0] if "://" in href else ""
    prefix = {"s3": "/vsis3/", "gs": "/vsigs/", "az": "/vsiaz/"}.get(scheme)
    return prefix + href.split("://", 1)[1] if prefix else href if href.startswith("/vsi") else f"/vsicurl/{href}"


def _retryable(href: str, err: BaseException) -> bool:
    """True if another try may succeed: a remote asset and no permanent HTTP answer or 403."""
    if not _is_remote(href):
        return False
    return not _http_codes(_error_chain_text(err)) & {403, *PERMANENT_HTTP}


def _is_remote(href: str) -> bool:
    """True for URLs GDAL reads over the network (http(s), s3, gs, az, /vsicurl/ ...)."""
    return "://" in href or href.startswith(("/vsicurl", "/vsis3", "/vsigs", "/vsiaz", "/vsiadls"))


def _error_chain_text(err: BaseException | None, depth: int = 8) -> str:
    """The texts of an error and the ones it was raised from, joined."""
    texts = []
    while err is not None and len(texts) < depth:
        texts.append(str(err))
        err = err.__cause__ or err.__context__
    return " | ".join(texts)


def _without_query(text: str) -> str:
    """``text`` with every URL's query string (a SAS token) cut off."""
    return re.sub(r"((?:https?|s3|gs|az)://[^\s?'\"]+)\?[^\s'\"]*", r"\1", text)


class _RedactQueries(logging.Filter):
    """Cuts URL query strings (SAS tokens) out of GDAL's log lines (retries name the URL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "?" in message:
            record.msg, record.args = _without_query(message), None
        return True


for _name in ("rasterio._env", "rasterio._err", "rasterio._io", "rasterio._base"):
    logging.getLogger(_name).addFilter(_RedactQueries())


def _unsigned(href: str) -> str:
    """The identity signer."""
    return href


class _DatasetCache(threading.local):
    """Open rasterio datasets per thread, least recently used first out.

    Keyed by the unsigned href (plus size and mtime for local files, so a rewritten file is
    reopened); the dataset keeps the signed URL it was opened with until a read fails.
    """

    def __init__(self) -> None:
        self.max_open = DEFAULT_DATASET_CACHE_SIZE
        self.open: OrderedDict[tuple, rasterio.DatasetReader] = OrderedDict()

    @contextmanager
    def dataset(self, href: str, signed: str | Signer,
                fresh: bool = False) -> Iterator[rasterio.DatasetReader]:
        """The dataset for ``href``: cached, or opened at ``signed`` (a URL or a signer).

        ``fresh`` drops any cached one first. A failed read drops it too.
        """
        key = _cache_key(href)
        if fresh:
            self.drop(key)
        src = self.open.pop(key, None)
        if src is None:
            src = rasterio.open(signed if isinstance(signed, str) else signed(href))
        try:
            yield src
        except BaseException:
            src.close()
            raise
        self._keep(key, src)

    def holds(self, href: str) -> bool:
        """True if a dataset for ``href`` is open in the cache."""
        return _cache_key(href) in self.open

    def _keep(self, key: tuple, src: rasterio.DatasetReader) -> None:
        """Put ``src`` back as most recent; close the oldest beyond ``max_open``."""
        self.open[key] = src
        self.trim()

    def trim(self) -> None:
        """Close the least recently used datasets beyond ``max_open``."""
        while len(self.open) > self.max_open:
            self.open.popitem(last=False)[1].close()

    def drop(self, key: tuple) -> None:
        """Close and forget one dataset."""
        src = self.open.pop(key, None)
        if src is not None:
            src.close()

    def clear(self) -> None:
        """Close every dataset."""
        while self.open:
            self.open.popitem()[1].close()


def _cache_key(href: str) -> tuple:
    """Cache key: the href, plus (size, mtime) for a local file."""
    if "://" in href or href.startswith("/vsi"):
        return (href,)
    try:
        stat = os.stat(href)
    except OSError:
        return (href,)
    return (href, stat.st_size, stat.st_mtime_ns)


_DATASETS = _DatasetCache()


def set_dataset_cache_size(max_open: int) -> None:
    """Keep at most ``max_open`` datasets open in this thread (0: close each after its read)."""
    if max_open < 0:
        raise ConfigError(f"dataset cache size {max_open} must be >= 0; e.g. 32")
    _DATASETS.max_open = max_open
    _DATASETS.trim()


def clear_dataset_cache() -> None:
    """Close this thread's cached datasets (e.g. before deleting the files)."""
    _DATASETS.clear()


def _is_forbidden(err: BaseException | None) -> bool:
    """True if a GDAL error, or one it was raised from, is an HTTP 403 (expired SAS token).

    A failed open says so itself; a failed block read says ``Read failed`` and chains the
    ``response_code=403`` error.
    """
    text = _error_chain_text(err)
    return 403 in _http_codes(text) or "Forbidden" in text


def _http_codes(text: str) -> set[int]:
    """HTTP status codes GDAL reports in an error text."""
    return {int(c) for c in re.findall(r"(?:HTTP response code|response_code)\s*[:=]\s*(\d{3})", text)}


def _reason(err: Exception) -> str:
    """The first line of an error, bounded in length."""
    lines = _without_query(str(err)).strip().splitlines() or [type(err).__name__]
    return lines[0][:MAX_REASON_CHARS]

