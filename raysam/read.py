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
dataset, re-signs and reopens once.

Scaling (the seed's ``band_names``/``band_scaling``/``band_offset``): reflectance =
(DN + offset_dn) * scale, with the item's offset and scale unless overridden per band; then
``mode="reflectance"`` gives clip(reflectance, 0, 1) * 255 (FarmVibes' default) and
``mode="stretch"`` maps per-band low..high reflectance to 0..255, with low/high computed once
per date group by :func:`compute_stretch`, never per chip.
"""

from __future__ import annotations

import math
import os
import threading
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


def gdal_env_options() -> dict[str, Any]:
    """GDAL options for reading COGs over HTTP (used as ``rasterio.Env(**options)``)."""
    return {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no directory listing per open
        "GDAL_HTTP_MAX_RETRY": "4",  # retries on 429/502/503/504
        "GDAL_HTTP_RETRY_DELAY": "1",  # seconds, doubled each retry
        "GDAL_HTTP_MULTIRANGE": "YES",  # one request for several byte ranges
        "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
        "VSI_CACHE": "TRUE",
        "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF",
    }


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
              fast_path: bool = True) -> ChipPixels | SkippedChip:
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

    Returns:
        ChipPixels, or SkippedChip for a chip with no valid pixels or too much cloud.

    Raises:
        DataError: an asset cannot be read (missing, corrupt, refused).
    """
    scaling = scaling or ScalingSpec()
    in_aoi = aoi_mask(task)
    if not in_aoi.any():
        return SkippedChip(task.date_group_id, task.chip_id, "no valid pixels",
                           {"valid_fraction": 0.0})
    with rasterio.Env(**gdal_env_options()):
        refl, valid, scl, used = _mosaic(task, scaling, in_aoi, _band_reader(task, signer,
                                                                             fast_path))
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
                 fast_path: bool = True) -> tuple[np.ndarray, BandRead]:
    """One band's DN on the chip window, mosaicked first valid wins over the task's items.

    Args:
        task: the chip (any window size) and its items in priority order.
        band_id: band id or alias (``B04``, ``R``, ``SCL``).
        signer: href signer, as for :func:`read_chip`.
        resampling: onto the chip grid; nearest for categorical bands (SCL).
        fast_path: as for :func:`read_chip`.

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
    read = _band_reader(task, signer, fast_path)

    def read_item(item: ItemRead, box: Box) -> tuple[np.ndarray, np.ndarray]:
        band = item.band(band_id)
        item_dn = read(item.item_id, band, resampling, box)
        return item_dn, _has_data(item_dn, band)

    with rasterio.Env(**gdal_env_options()):
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


def _band_reader(task: ChipTask, signer: Signer | None, fast_path: bool) -> BandReader:
    """A ``(item_id, band, resampling, box) -> DN`` reader onto a box of this task's chip."""
    col_off, row_off, _, _ = task.window_px

    def read(item_id: str, band: BandRead, resampling: Resampling, box: Box) -> np.ndarray:
        rows, cols = box
        window_px = (col_off + cols.start, row_off + rows.start, cols.stop - cols.start,
                     rows.stop - rows.start)
        return _read_band(item_id, band, replace(task, window_px=window_px), signer,
                          resampling, fast_path)

    return read


def _read_band(item_id: str, band: BandRead, task: ChipTask, signer: Signer | None,
               resampling: Resampling, fast_path: bool = True) -> np.ndarray:
    """One band on the chip grid (aligned read or warp); 403 -> re-sign once; -> DataError."""
    def read(src: rasterio.DatasetReader) -> np.ndarray:
        index = _aligned_index(src, band, task, resampling) if fast_path else None
        if index is not None:
            return _read_aligned(src, band, *index)
        return _warp(src, band, task, resampling)

    return _with_signed_href(item_id, band, signer, read)


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
                      fn: Callable[[rasterio.DatasetReader], Any]) -> Any:
    """Apply ``fn`` to the band's open dataset (cached); re-sign and reopen once on HTTP 403.

    A block read from a dataset opened earlier fails with no status code in the error (GDAL
    only logs the 403), so any failure of a cached dataset also counts as a possible expiry.
    """
    href = None  # None: the cached dataset, or the signer's href
    was_cached = _DATASETS.holds(band.href)
    tries = 0
    while True:
        tries += 1
        try:
            with _DATASETS.dataset(band.href, href or (signer or _unsigned),
                                   fresh=href is not None) as src:
                return fn(src)
        except (RasterioError, OSError) as err:
            resign = getattr(signer, "resign", None)
            if tries == 1 and resign is not None and (was_cached or _is_forbidden(err)):
                href = resign(band.href)
                continue
            raise DataError(f"item {item_id} asset {band.key}: cannot read {band.href}: "
                            f"{_reason(err)} (after {tries} tries)") from None


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
    seen = 0
    while err is not None and seen < 8:
        text = str(err)
        if "403" in text or "Forbidden" in text:
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _reason(err: Exception) -> str:
    """The first line of an error, bounded in length."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    return lines[0][:MAX_REASON_CHARS]


def compute_stretch(group: DateGroup, bands: Sequence[str] = ("R", "G", "B"),
                    percentiles: tuple[float, float] = (2.0, 98.0),
                    signer: Signer | None = None, max_side_px: int = 512,
                    base: ScalingSpec | None = None) -> ScalingSpec:
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

    Returns:
        A ``mode="stretch"`` ScalingSpec; low=0, high=1 if the group has no valid pixel.
    """
    lo_pct, hi_pct = percentiles
    if not 0 <= lo_pct < hi_pct <= 100:
        raise ConfigError(f"stretch percentiles {percentiles} must satisfy 0 <= low < high <= 100")
    spec = replace(base or ScalingSpec(), mode="stretch", band_names=tuple(bands),
                   low=None, high=None)
    samples = _coarse_samples(group, spec, signer, max_side_px)
    if samples.shape[1] == 0:
        return replace(spec, low=(0.0,) * 3, high=(1.0,) * 3)
    low = np.percentile(samples, lo_pct, axis=1)
    high = np.percentile(samples, hi_pct, axis=1)
    return replace(spec, low=tuple(map(float, low)), high=tuple(map(float, high)))


def _coarse_samples(group: DateGroup, spec: ScalingSpec, signer: Signer | None,
                    max_side_px: int) -> np.ndarray:
    """Reflectance (3, N) of valid in-AOI pixels of every item, from decimated reads."""
    per_item = []
    with rasterio.Env(**gdal_env_options()):
        for item in group.items:
            reads = item_read(item, spec.band_ids)
            layers = [_coarse_band(reads.item_id, b, group, signer, max_side_px)
                      for b in reads.bands]
            ok = np.logical_and.reduce([m for _, m in layers])
            per_item.append(np.stack([reflectance(dn[ok], *_band_scale(b, spec, i))
                                      for i, ((dn, _), b) in enumerate(zip(layers, reads.bands))]))
    return np.concatenate(per_item, axis=1) if per_item else np.zeros((3, 0), np.float32)


def _coarse_band(item_id: str, band: BandRead, group: DateGroup, signer: Signer | None,
                 max_side_px: int) -> tuple[np.ndarray, np.ndarray]:
    """A decimated read of one band and its valid-and-in-AOI mask."""
    def read(src: rasterio.DatasetReader) -> tuple[np.ndarray, np.ndarray]:
        factor = max(1, math.ceil(max(src.width, src.height) / max_side_px))
        out_shape = (math.ceil(src.height / factor), math.ceil(src.width / factor))
        dn = src.read(1, out_shape=out_shape, resampling=Resampling.nearest)
        transform = src.transform @ Affine.scale(src.width / out_shape[1],
                                                 src.height / out_shape[0])
        aoi = _aoi_in_crs(group, src.crs)
        inside = geometry_mask([aoi], out_shape=out_shape, transform=transform, invert=True)
        nodata = src.nodata if src.nodata is not None else band.nodata
        return dn, inside & (dn != nodata if nodata is not None else True)

    return _with_signed_href(item_id, band, signer, read)


def _aoi_in_crs(group: DateGroup, crs: Any) -> shapely.Geometry:
    """The group's AOI reprojected from the grid CRS to ``crs``."""
    aoi = group.aoi_utm
    if pyproj.CRS.from_user_input(crs).equals(pyproj.CRS.from_epsg(group.grid.epsg)):
        return aoi
    transformer = pyproj.Transformer.from_crs(group.grid.epsg, crs, always_xy=True)
    return shapely.transform(
        aoi, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))
