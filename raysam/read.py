"""Chip reads: windowed, reprojected reads straight from the COGs, mosaicked per chip.

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

Opening assets (signing, retries, the dataset cache, redaction) is :mod:`raysam.remote_io`'s
job; DN to RGB uint8 is :mod:`raysam.scaling`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.enums import Resampling
from rasterio.features import geometry_mask
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from raysam.errors import DataError
from raysam.grid import BandRead, ChipTask, ItemRead
from raysam.items import canonical_band
from raysam.remote_io import NetworkPolicy, Signer, gdal_env_options, read_asset
from raysam.scaling import ScalingSpec, band_scale, dn_to_uint8

# SCL classes (Sentinel-2 L2A product spec): 3 cloud shadow, 8 cloud medium probability,
# 9 cloud high probability, 10 thin cirrus.
DEFAULT_CLOUD_CLASSES = (3, 8, 9, 10)
DEFAULT_MAX_CLOUD_FRACTION = 0.8  # skip chips cloudier than this (of valid pixels); sam.max_cloud_fraction
SCL = "SCL"
ALIGN_TOL_PX = 1e-6  # grid offsets within this many pixels of an integer count as aligned
# Warps must not depend on the chip window, or overlapping chips (and the s2_raster sink's
# larger windows) see different pixels: GDAL scales the kernel by each chunk's dst/src size
# ratio, which a rotated source window makes < 1 (pin it to 1: we only upsample), and its
# approximate transformer's 0.125 px default error moves samples by window. With 0.001 px,
# overlapping warped chips agree within 2 DN, and within 1 DN on all but < 0.1 % of their
# shared pixels (tests/test_read.py::test_overlapping_warped_chips_see_the_same_pixels).
WARP_TOLERANCE_PX = 0.001
WARP_WINDOW_INDEPENDENT = {"XSCALE": "1", "YSCALE": "1"}

Box = tuple[slice, slice]  # (rows, cols) of a chip: the part of it an item is read for
BandReader = Callable[[str, BandRead, Resampling, Box], np.ndarray]  # -> DN of the box


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
        rgb, valid, scl, used = _mosaic(task, scaling, in_aoi, read)
    cloud = valid & np.isin(scl, np.asarray(cloud_classes, dtype=np.uint8))
    stats = _chip_stats(valid, cloud, used)
    reason = _skip_reason(stats, max_cloud_fraction)
    if reason:
        return SkippedChip(task.date_group_id, task.chip_id, reason, stats)
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
    """First-valid-wins mosaic over the task's items: RGB uint8 (H, W, 3, 0 where not valid),
    valid, SCL, items."""
    shape = in_aoi.shape
    rgb = np.zeros((*shape, 3), dtype=np.uint8)
    valid = np.zeros(shape, dtype=bool)
    scl = np.zeros(shape, dtype=np.uint8)
    used = 0

    def read_item(item: ItemRead, box: Box) -> tuple[np.ndarray, np.ndarray]:
        return _read_item_rgb(item, scaling, read, box)

    for item, item_rgb, take, box in _first_valid(task.items, read_item, in_aoi):
        used += 1
        whole = take.all()  # the usual case, and a plain copy is 10x faster than a masked one
        np.copyto(rgb[box], item_rgb, where=True if whole else take[..., None])
        valid[box] |= take
        if item.band(SCL) is not None:
            np.copyto(scl[box], read(item.item_id, item.band(SCL), Resampling.nearest, box),
                      where=True if whole else take, casting="unsafe")
    return rgb, valid, scl, used


def _read_item_rgb(item: ItemRead, scaling: ScalingSpec, read: BandReader,
                   box: Box) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 (h, w, 3) of one item's bands over a box and where all three have data."""
    layers, valid = [], None
    for i, band_id in enumerate(scaling.band_ids):
        band = item.band(band_id)
        if band is None:
            raise DataError(f"chip task for item {item.item_id} lacks band {band_id}; plan "
                            f"chip tasks with bands {list(scaling.band_names)} + SCL")
        dn = read(item.item_id, band, Resampling.bilinear, box)
        has_data = _has_data(dn, band)
        valid = has_data if valid is None else valid & has_data
        layers.append(dn_to_uint8(dn, *band_scale(band, scaling, i), scaling, i))
    return np.stack(layers, axis=-1), valid


def _has_data(dn: np.ndarray, band: BandRead) -> np.ndarray:
    """Bool: DN differs from the band's nodata (all True without nodata)."""
    return dn != band.nodata if band.nodata is not None else np.ones(dn.shape, bool)




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
        index = _aligned_index(src, band, task, resampling) if fast_path else None
        if index is not None:
            return _read_aligned(src, band, *index)
        return _warp(src, band, task, resampling)

    return read_asset(item_id, band, signer, read, network)



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
