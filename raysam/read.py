"""Chip reads: windowed, reprojected reads straight from the COGs, and radiometric scaling.

:func:`read_chip` turns one :class:`~raysam.grid.ChipTask` into a SAM-ready RGB uint8 chip plus
valid and cloud masks. Every band of every item is put onto the chip's own pixel grid on the
target grid: bilinear for reflectance bands (20 m bands are upsampled), nearest for the
categorical SCL, nodata 0. Items are mosaicked first valid wins, in the order the date group
lists them; pixels outside the AOI become nodata. :func:`read_band_dn` gives one band's DN
mosaic the same way (for the s2_raster sink).

Two ways onto the chip grid, with identical results where both apply:

* *aligned* (fast): the source is in the grid CRS, north-up, its pixel size an integer
  multiple k of the grid's and its origin on the grid's lattice; then a plain windowed read
  gives the pixels (k = 1, any of nearest/bilinear, whose kernels are exact at pixel centres),
  or a decimated native read repeated k times per axis (k > 1, nearest only: the 20 m SCL).
  Each chip pixel centre lies strictly inside one source pixel, so there are no rounding ties.
* *warped*: anything else (another UTM zone, bilinear upsampling of 20 m bands) goes through
  ``rasterio.vrt.WarpedVRT``.

Open datasets are kept in a small per-thread LRU cache keyed by the *unsigned* href (a signed
URL changes when its token is refreshed); a read that fails with HTTP 403 drops the cached
dataset, re-signs and reopens once. Flaky networks meet two deliberate lines of retries
(:class:`NetworkPolicy`): GDAL's own per-request retries (timeouts, resets, 429/5xx), then
raysam's bounded retries with backoff around each band read; errors stay one line and never
show a signed URL's query string.

Scaling (the seed's ``band_names``/``band_scaling``/``band_offset``): reflectance =
(DN + offset_dn) * scale, with the item's offset and scale unless overridden per band; then
``mode="reflectance"`` gives clip(reflectance, 0, 1) * 255 (FarmVibes' default) and
``mode="stretch"`` maps per-band low..high reflectance to 0..255, with low/high computed once
per date group by :func:`compute_stretch`, never per chip.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyproj
import rasterio
import shapely
from affine import Affine
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.features import geometry_mask
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from raysam.errors import ConfigError, DataError
from raysam.grid import BandRead, ChipTask, DateGroup, ItemRead, item_read
from raysam.items import canonical_band

# SCL classes (Sentinel-2 L2A product spec): 3 cloud shadow, 8 cloud medium probability,
# 9 cloud high probability, 10 thin cirrus.
DEFAULT_CLOUD_CLASSES = (3, 8, 9, 10)
DEFAULT_MAX_CLOUD_FRACTION = 0.8  # raysam.config.ChipConfig.max_cloud_fraction default
SCL = "SCL"
MAX_REASON_CHARS = 200
INTEGER_DN_DTYPES = ("uint16", "uint8", "int16")  # L2A bands (uint16) and SCL (uint8)
# Open datasets kept per thread: a date group's 2-4 items x 4-5 bands, with room for two groups.
DEFAULT_DATASET_CACHE_SIZE = 32
ALIGN_TOL_PX = 1e-6  # grid offsets within this many pixels of an integer count as aligned
# Warps must not depend on the chip window, or overlapping chips (and the s2_raster sink's
# larger windows) see different pixels: GDAL scales the kernel by each chunk's dst/src size
# ratio, which a rotated source window makes < 1 (pin it to 1: we only upsample), and its
# approximate transformer's 0.125 px default error moves samples by window (0.001 px costs
# ~15 % more warp time; measured in tests/test_read.py: overlapping warped chips agree to 1 DN).
WARP_TOLERANCE_PX = 0.001
WARP_WINDOW_INDEPENDENT = {"XSCALE": "1", "YSCALE": "1"}

Signer = Callable[[str], str]
Box = tuple[slice, slice]  # (rows, cols) of a chip: the part of it an item is read for
BandReader = Callable[[str, BandRead, Resampling, Box], np.ndarray]  # -> DN of the box


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


def gdal_env_options(policy: NetworkPolicy | None = None) -> dict[str, Any]:
    """GDAL options for reading COGs over HTTP (used as ``rasterio.Env(**options)``).

    The retry and timeout options come from ``policy``, except those already set as
    environment variables (``GDAL_HTTP_TIMEOUT=5`` in the environment wins).
    """
    policy = policy or DEFAULT_NETWORK
    options = {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no directory listing per open
        "GDAL_HTTP_MULTIRANGE": "YES",  # one request for several byte ranges
        "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
        "VSI_CACHE": "TRUE",
        "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF",
    }
    for option, attr in _POLICY_OPTIONS.items():  # GDAL retries 429/5xx, resets, timeouts
        if option not in os.environ:
            value = getattr(policy, attr)
            options[option] = f"{value:g}"
    return options


@dataclass(frozen=True)
class ScalingSpec:
    """How band DNs become RGB uint8.

    Attributes:
        mode: ``"reflectance"`` (clip(reflectance, 0, 1) * 255) or ``"stretch"``
            ((reflectance - low) / (high - low) clipped to 0..1, * 255).
        band_names: the three bands (ids or aliases: R, G, B) in RGB order.
        band_scaling: per band, reflectance per DN (overrides the item's ``scale``).
        band_offset: per band, DN offset added before scaling (overrides ``offset_dn``).
        low: stretch mode: per band reflectance mapped to 0 (from :func:`compute_stretch`).
        high: stretch mode: per band reflectance mapped to 255.
    """

    mode: str = "reflectance"
    band_names: tuple[str, ...] = ("R", "G", "B")
    band_scaling: tuple[float, ...] | None = None
    band_offset: tuple[float, ...] | None = None
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("reflectance", "stretch"):
            raise ConfigError(f"scaling mode {self.mode!r} is unknown; use reflectance or stretch")
        if len(self.band_names) != 3:
            raise ConfigError(f"band_names {list(self.band_names)} must name 3 bands (R, G, B)")
        for name in ("band_scaling", "band_offset", "low", "high"):
            values = getattr(self, name)
            if values is not None and len(values) != 3:
                raise ConfigError(f"{name} needs one value per band (3), got {list(values)}")

    @property
    def band_ids(self) -> tuple[str, ...]:
        """Canonical band ids in RGB order."""
        return tuple(canonical_band(b) for b in self.band_names)


@dataclass(frozen=True)
class ChipPixels:
    """A read chip.

    Attributes:
        date_group_id, chip_id, window_px: from the task.
        rgb: uint8 (H, W, 3); 0 where not valid.
        valid: bool (H, W): data in every RGB band and inside the AOI.
        cloud: bool (H, W): valid and SCL in the cloud classes (False without SCL).
        stats: valid_fraction, cloud_fraction (of valid pixels), items_read.
    """

    date_group_id: str
    chip_id: tuple[int, int]
    window_px: tuple[int, int, int, int]
    rgb: np.ndarray
    valid: np.ndarray
    cloud: np.ndarray
    stats: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SkippedChip:
    """A chip not worth segmenting, with the reason (``no valid pixels``, ``cloudy ...``)."""

    date_group_id: str
    chip_id: tuple[int, int]
    reason: str
    stats: dict[str, float] = field(default_factory=dict)
    rgb: None = None


def read_chip(task: ChipTask, signer: Signer | None = None,
              scaling: ScalingSpec | None = None,
              cloud_classes: Sequence[int] = DEFAULT_CLOUD_CLASSES,
              max_cloud_fraction: float = DEFAULT_MAX_CLOUD_FRACTION,
              fast_path: bool = True,
              network: NetworkPolicy | None = None) -> ChipPixels | SkippedChip:
    """Read, mosaic, mask and scale one chip.

    Args:
        task: the chip to read.
        signer: turns an href into a readable URL (e.g. Planetary Computer SAS signing); if it
            has ``resign(href)``, that is called once on HTTP 403 before retrying.
        scaling: DN to uint8 conversion; default reflectance R, G, B.
        cloud_classes: SCL classes counted as cloud.
        max_cloud_fraction: skip the chip if more than this fraction of its valid pixels is
            cloud.
        fast_path: read aligned sources with plain windowed reads (same pixels as warping);
            False warps every band (for comparisons).
        network: HTTP timeouts and retries (GDAL's, then raysam's); default NetworkPolicy().

    Returns:
        ChipPixels, or SkippedChip for a chip with no valid pixels or too much cloud.

    Raises:
        DataError: an asset cannot be read (missing, corrupt, refused, or still failing after
            the policy's retries): one line naming the item and the asset.
    """
    scaling = scaling or ScalingSpec()
    in_aoi = aoi_mask(task)
    if not in_aoi.any():
        return SkippedChip(task.date_group_id, task.chip_id, "no valid pixels",
                           {"valid_fraction": 0.0})
    with rasterio.Env(**gdal_env_options(network)):
        read = _band_reader(task, signer, fast_path, network)
        refl, valid, scl, used = _mosaic(task, scaling, in_aoi, read)
    cloud = valid & np.isin(scl, np.asarray(cloud_classes, dtype=np.uint8))
    stats = _chip_stats(valid, cloud, used)
    reason = _skip_reason(stats, max_cloud_fraction)
    if reason:
        return SkippedChip(task.date_group_id, task.chip_id, reason, stats)
    rgb = to_uint8(refl, scaling)
    rgb[~valid] = 0
    return ChipPixels(task.date_group_id, task.chip_id, task.window_px, rgb, valid, cloud, stats)


def aoi_mask(task: ChipTask) -> np.ndarray:
    """Bool (H, W): chip pixels whose centre lies inside the task's AOI clip."""
    _, _, width, height = task.window_px
    if task.aoi_clip_wkb is None:
        return np.ones((height, width), dtype=bool)
    clip = shapely.from_wkb(task.aoi_clip_wkb)
    if clip.is_empty:
        return np.zeros((height, width), dtype=bool)
    return geometry_mask([clip], out_shape=(height, width),
                         transform=Affine(*task.chip_transform), invert=True)


def read_band_dn(task: ChipTask, band_id: str, signer: Signer | None = None,
                 resampling: Resampling = Resampling.bilinear,
                 fast_path: bool = True,
                 network: NetworkPolicy | None = None) -> tuple[np.ndarray, BandRead]:
    """One band's DN on the chip window, mosaicked first valid wins over the task's items.

    Args:
        task: the chip (any window size) and its items in priority order.
        band_id: band id or alias (``B04``, ``R``, ``SCL``).
        signer: href signer, as for :func:`read_chip`.
        resampling: onto the chip grid; nearest for categorical bands (SCL).
        fast_path: as for :func:`read_chip`.
        network: as for :func:`read_chip`.

    Returns:
        (DN (H, W) in the asset's dtype, 0 where no item has data; the BandRead of the first
        item that has the band, for its scale and offset). The AOI is not applied.

    Raises:
        DataError: no item of the task has the band, or an asset cannot be read.
    """
    band_id = canonical_band(band_id)
    items = [item for item in task.items if item.band(band_id) is not None]
    if not items:
        raise DataError(f"chip task {task.chip_id} of {task.date_group_id} has no item with band "
                        f"{band_id}; plan chip tasks with the bands you read")
    _, _, width, height = task.window_px
    dn = None
    read = _band_reader(task, signer, fast_path, network)

    def read_item(item: ItemRead, box: Box) -> tuple[np.ndarray, np.ndarray]:
        band = item.band(band_id)
        item_dn = read(item.item_id, band, resampling, box)
        return item_dn, _has_data(item_dn, band)

    with rasterio.Env(**gdal_env_options(network)):
        wanted = np.ones((height, width), bool)
        for _, item_dn, take, box in _first_valid(items, read_item, wanted):
            dn = np.zeros(wanted.shape, item_dn.dtype) if dn is None else dn
            np.copyto(dn[box], item_dn, where=take)
    return (dn if dn is not None else np.zeros((height, width), np.uint16)), items[0].band(band_id)


def _first_valid(items: Sequence[ItemRead],
                 read_item: Callable[[ItemRead, Box], tuple[np.ndarray, np.ndarray]],
                 wanted: np.ndarray) -> Iterator[tuple[ItemRead, np.ndarray, np.ndarray, Box]]:
    """First-valid-wins mosaicking: yield (item, data, pixels it fills, box) in priority order.

    Each item is read only over the bounding box of the wanted pixels no earlier item filled
    (``read_item(item, box)`` returns its data there and where it is valid); ``take`` (box
    shape) marks the pixels it fills. Stops once every wanted pixel is filled; items filling
    nothing are not yielded. Reads are window independent (aligned reads, pinned warps), so a
    box gives the same pixels as the whole chip.
    """
    remaining = wanted.copy()
    for item in items:
        if not remaining.any():
            return
        box = _bounding_box(remaining)
        data, item_valid = read_item(item, box)
        take = item_valid & remaining[box]
        if take.any():
            remaining[box] &= ~take
            yield item, data, take, box


def _bounding_box(mask: np.ndarray) -> Box:
    """(rows, cols) slices of the smallest box holding every True pixel of a non-empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _mosaic(task: ChipTask, scaling: ScalingSpec, in_aoi: np.ndarray,
            read: BandReader) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """First-valid-wins mosaic over the task's items: reflectance (3, H, W), valid, SCL, items."""
    shape = in_aoi.shape
    refl = np.zeros((3, *shape), dtype=np.float32)
    valid = np.zeros(shape, dtype=bool)
    scl = np.zeros(shape, dtype=np.uint8)
    used = 0

    def read_item(item: ItemRead, box: Box) -> tuple[np.ndarray, np.ndarray]:
        return _read_item_rgb(item, scaling, read, box)

    for item, item_refl, take, box in _first_valid(task.items, read_item, in_aoi):
        used += 1
        np.copyto(refl[(slice(None), *box)], item_refl, where=take)
        valid[box] |= take
        if item.band(SCL) is not None:
            np.copyto(scl[box], read(item.item_id, item.band(SCL), Resampling.nearest, box),
                      where=take, casting="unsafe")
    return refl, valid, scl, used


def _read_item_rgb(item: ItemRead, scaling: ScalingSpec, read: BandReader,
                   box: Box) -> tuple[np.ndarray, np.ndarray]:
    """Reflectance (3, h, w) of one item's RGB bands over a box and where all three have data."""
    layers, valid = [], None
    for i, band_id in enumerate(scaling.band_ids):
        band = item.band(band_id)
        if band is None:
            raise DataError(f"chip task for item {item.item_id} lacks band {band_id}; plan "
                            f"chip tasks with bands {list(scaling.band_names)} + SCL")
        dn = read(item.item_id, band, Resampling.bilinear, box)
        has_data = _has_data(dn, band)
        valid = has_data if valid is None else valid & has_data
        layers.append(reflectance(dn, *_band_scale(band, scaling, i)))
    return np.stack(layers), valid


def _has_data(dn: np.ndarray, band: BandRead) -> np.ndarray:
    """Bool: DN differs from the band's nodata (all True without nodata)."""
    return dn != band.nodata if band.nodata is not None else np.ones(dn.shape, bool)


def _band_scale(band: BandRead, scaling: ScalingSpec, index: int) -> tuple[float, float]:
    """(offset_dn, scale) of a band: the seed's overrides if given, else the item's."""
    offset = scaling.band_offset[index] if scaling.band_offset is not None else band.offset_dn
    scale = scaling.band_scaling[index] if scaling.band_scaling is not None else band.scale
    return float(offset), float(scale)


def reflectance(dn: np.ndarray, offset_dn: float, scale: float) -> np.ndarray:
    """(DN + offset_dn) * scale as float32."""
    out = dn.astype(np.float32)
    out += np.float32(offset_dn)
    out *= np.float32(scale)
    return out


def to_uint8(refl: np.ndarray, scaling: ScalingSpec) -> np.ndarray:
    """(3, H, W) reflectance -> (H, W, 3) uint8, by the scaling mode (rounded to nearest)."""
    if scaling.mode == "stretch":
        if scaling.low is None or scaling.high is None:
            raise ConfigError("stretch scaling has no low/high; compute them once per date "
                              "group with raysam.read.compute_stretch")
        low = np.asarray(scaling.low, np.float32)[:, None, None]
        span = np.maximum(np.asarray(scaling.high, np.float32)[:, None, None] - low, 1e-6)
        unit = (refl - low) / span
    else:
        unit = refl
    u8 = np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(u8, 0, -1))


def _chip_stats(valid: np.ndarray, cloud: np.ndarray, items_read: int) -> dict[str, float]:
    """Fractions describing a chip."""
    n_valid = int(valid.sum())
    return {"valid_fraction": n_valid / valid.size,
            "cloud_fraction": float(cloud.sum()) / n_valid if n_valid else 0.0,
            "items_read": float(items_read)}


def _skip_reason(stats: dict[str, float], max_cloud_fraction: float) -> str | None:
    """Why a chip should be skipped, or None."""
    if stats["valid_fraction"] == 0:
        return "no valid pixels"
    if stats["cloud_fraction"] > max_cloud_fraction:
        return f"cloudy: {stats['cloud_fraction']:.2f} > {max_cloud_fraction:.2f}"
    return None


def _band_reader(task: ChipTask, signer: Signer | None, fast_path: bool,
                 network: NetworkPolicy | None = None) -> BandReader:
    """A ``(item_id, band, resampling, box) -> DN`` reader onto a box of this task's chip."""
    col_off, row_off, _, _ = task.window_px

    def read(item_id: str, band: BandRead, resampling: Resampling, box: Box) -> np.ndarray:
        rows, cols = box
        window_px = (col_off + cols.start, row_off + rows.start, cols.stop - cols.start,
                     rows.stop - rows.start)
        return _read_band(item_id, band, replace(task, window_px=window_px), signer,
                          resampling, fast_path, network)

    return read


def _read_band(item_id: str, band: BandRead, task: ChipTask, signer: Signer | None,
               resampling: Resampling, fast_path: bool = True,
               network: NetworkPolicy | None = None) -> np.ndarray:
    """One band on the chip grid (aligned read or warp), with the network policy's retries."""
    def read(src: rasterio.DatasetReader) -> np.ndarray:
        _check_source(item_id, band, src)
        index = _aligned_index(src, band, task, resampling) if fast_path else None
        if index is not None:
            return _read_aligned(src, band, *index)
        return _warp(src, band, task, resampling)

    return _with_signed_href(item_id, band, signer, read, network)


def _check_source(item_id: str, band: BandRead, src: rasterio.DatasetReader) -> None:
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


def _warp(src: rasterio.DatasetReader, band: BandRead, task: ChipTask,
          resampling: Resampling) -> np.ndarray:
    """Band 1 of ``src`` through a WarpedVRT onto the chip grid."""
    _, _, width, height = task.window_px
    src_nodata = src.nodata if src.nodata is not None else band.nodata
    with WarpedVRT(src, src_nodata=src_nodata, crs=task.crs,
                   transform=Affine(*task.chip_transform), width=width, height=height,
                   resampling=resampling, nodata=band.nodata, tolerance=WARP_TOLERANCE_PX,
                   **WARP_WINDOW_INDEPENDENT) as vrt:
        return vrt.read(1)


def _aligned_index(src: rasterio.DatasetReader, band: BandRead, task: ChipTask,
                   resampling: Resampling) -> tuple[np.ndarray, np.ndarray] | None:
    """Source (rows, cols) holding each chip pixel's centre, or None if the warp is needed.

    Aligned means: same CRS, both north-up, source pixel = k x chip pixel (integer k, square),
    source origin on the chip lattice, nodata as the warp would see it, and a resampling that
    is exact at pixel centres (nearest; bilinear only for k = 1). Then chip pixel i (offset n
    chip pixels from the source origin) has its centre at source coordinate (n + i + 0.5) / k,
    never on a source pixel edge, so the pixel is source index (n + i) // k.
    """
    src_nodata = src.nodata if src.nodata is not None else band.nodata
    if band.nodata is None or src_nodata != band.nodata or src.crs is None:
        return None
    a, b, c, d, e, f = task.chip_transform
    sa, sb, sc, sd, se, sf = tuple(src.transform)[:6]
    if b or d or sb or sd or a <= 0 or sa <= 0 or e != -a or se != -sa:
        return None
    k = _integer(sa / a)
    col_n, row_n = _integer((c - sc) / a), _integer((sf - f) / a)
    if k is None or col_n is None or row_n is None or k < 1:
        return None
    if not (resampling == Resampling.nearest or (k == 1 and resampling == Resampling.bilinear)):
        return None
    if src.crs.to_epsg() != task.epsg:
        return None
    _, _, width, height = task.window_px
    return (row_n + np.arange(height)) // k, (col_n + np.arange(width)) // k


def _integer(value: float) -> int | None:
    """``value`` as an int if it is within ALIGN_TOL_PX of one, else None."""
    nearest = round(value)
    return int(nearest) if abs(value - nearest) <= ALIGN_TOL_PX else None


def _read_aligned(src: rasterio.DatasetReader, band: BandRead, rows: np.ndarray,
                  cols: np.ndarray) -> np.ndarray:
    """Chip pixels from source indices (rows, cols): one windowed read, nodata outside."""
    out = np.full((rows.size, cols.size), band.nodata, dtype=src.dtypes[0])
    row_ok = (rows >= 0) & (rows < src.height)
    col_ok = (cols >= 0) & (cols < src.width)
    if not row_ok.any() or not col_ok.any():
        return out
    r0, r1 = int(rows[row_ok][0]), int(rows[row_ok][-1]) + 1
    c0, c1 = int(cols[col_ok][0]), int(cols[col_ok][-1]) + 1
    data = src.read(1, window=Window(c0, r0, c1 - c0, r1 - r0))
    i0, i1 = np.flatnonzero(row_ok)[[0, -1]]
    j0, j1 = np.flatnonzero(col_ok)[[0, -1]]
    if r1 - r0 == i1 - i0 + 1 and c1 - c0 == j1 - j0 + 1:  # k = 1: the read is the chip part
        out[i0:i1 + 1, j0:j1 + 1] = data
    else:
        out[i0:i1 + 1, j0:j1 + 1] = data[rows[row_ok] - r0][:, cols[col_ok] - c0]
    return out


def _with_signed_href(item_id: str, band: BandRead, signer: Signer | None,
                      fn: Callable[[rasterio.DatasetReader], Any],
                      policy: NetworkPolicy | None = None) -> Any:
    """Apply ``fn`` to the band's open dataset (cached), retrying as ``policy`` says.

    After an HTTP 403 the href is re-signed and reopened, once. A block read from a dataset
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


def compute_stretch(group: DateGroup, bands: Sequence[str] = ("R", "G", "B"),
                    percentiles: tuple[float, float] = (2.0, 98.0),
                    signer: Signer | None = None, max_side_px: int = 512,
                    base: ScalingSpec | None = None,
                    network: NetworkPolicy | None = None) -> ScalingSpec:
    """Per-band contrast stretch for a whole date group, from coarse reads of each item.

    Each item band is read decimated to at most ``max_side_px`` per side (GDAL uses the COG's
    overviews), restricted to valid pixels inside the AOI; low/high are the given percentiles of
    all items' reflectance together. Called once per date group, never per chip.

    Args:
        group: the date group.
        bands: three band ids or aliases in RGB order.
        percentiles: (low, high) percentiles in 0..100.
        signer: href signer, as for :func:`read_chip`.
        max_side_px: longest side of the coarse read.
        base: scaling whose band_scaling/band_offset overrides apply (default none).
        network: as for :func:`read_chip`.

    Returns:
        A ``mode="stretch"`` ScalingSpec; low=0, high=1 if the group has no valid pixel.
    """
    lo_pct, hi_pct = percentiles
    if not 0 <= lo_pct < hi_pct <= 100:
        raise ConfigError(f"stretch percentiles {percentiles} must satisfy 0 <= low < high <= 100")
    spec = replace(base or ScalingSpec(), mode="stretch", band_names=tuple(bands),
                   low=None, high=None)
    samples = _coarse_samples(group, spec, signer, max_side_px, network)
    if samples.shape[1] == 0:
        return replace(spec, low=(0.0,) * 3, high=(1.0,) * 3)
    low = np.percentile(samples, lo_pct, axis=1)
    high = np.percentile(samples, hi_pct, axis=1)
    return replace(spec, low=tuple(map(float, low)), high=tuple(map(float, high)))


def _coarse_samples(group: DateGroup, spec: ScalingSpec, signer: Signer | None,
                    max_side_px: int, network: NetworkPolicy | None = None) -> np.ndarray:
    """Reflectance (3, N) of valid in-AOI pixels of every item, from decimated reads."""
    per_item = []
    with rasterio.Env(**gdal_env_options(network)):
        for item in group.items:
            reads = item_read(item, spec.band_ids)
            layers = [_coarse_band(reads.item_id, b, group, signer, max_side_px, network)
                      for b in reads.bands]
            ok = np.logical_and.reduce([m for _, m in layers])
            per_item.append(np.stack([reflectance(dn[ok], *_band_scale(b, spec, i))
                                      for i, ((dn, _), b) in enumerate(zip(layers, reads.bands))]))
    return np.concatenate(per_item, axis=1) if per_item else np.zeros((3, 0), np.float32)


def _coarse_band(item_id: str, band: BandRead, group: DateGroup, signer: Signer | None,
                 max_side_px: int,
                 network: NetworkPolicy | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A decimated read of one band and its valid-and-in-AOI mask."""
    def read(src: rasterio.DatasetReader) -> tuple[np.ndarray, np.ndarray]:
        _check_source(item_id, band, src)
        factor = max(1, math.ceil(max(src.width, src.height) / max_side_px))
        out_shape = (math.ceil(src.height / factor), math.ceil(src.width / factor))
        dn = src.read(1, out_shape=out_shape, resampling=Resampling.nearest)
        transform = src.transform @ Affine.scale(src.width / out_shape[1],
                                                 src.height / out_shape[0])
        aoi = _aoi_in_crs(group, src.crs)
        inside = geometry_mask([aoi], out_shape=out_shape, transform=transform, invert=True)
        nodata = src.nodata if src.nodata is not None else band.nodata
        return dn, inside & (dn != nodata if nodata is not None else True)

    return _with_signed_href(item_id, band, signer, read, network)


def _aoi_in_crs(group: DateGroup, crs: Any) -> shapely.Geometry:
    """The group's AOI reprojected from the grid CRS to ``crs``."""
    aoi = group.aoi_utm
    if pyproj.CRS.from_user_input(crs).equals(pyproj.CRS.from_epsg(group.grid.epsg)):
        return aoi
    transformer = pyproj.Transformer.from_crs(group.grid.epsg, crs, always_xy=True)
    return shapely.transform(
        aoi, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))
