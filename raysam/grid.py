"""Target grids and chip planning. Pure geometry: no I/O, no pixels, no Ray.

A date group is processed on one *target grid*: a UTM CRS (the zone of the AOI centroid unless
configured), 10 m pixels, origin snapped outward to a multiple of the resolution so the grid is
aligned with Sentinel-2's own 10 m pixel lattice (tile origins are multiples of 60 m). The grid
is cut into ``chip_size`` square chips stepping ``chip_step_px`` pixels; the last chip of each
row and column is moved back to sit flush with the grid's far edge, so no chip hangs past the
grid unless the grid is smaller than one chip (then one chip anchored at the origin covers it
and reads fill the outside with nodata). Chips not touching the AOI are dropped.

Planning streams: :func:`plan_chips` and :func:`plan_chip_tasks` are generators; a state is a
few thousand chip windows and each :class:`ChipTask` is a few hundred bytes plus its hrefs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime

import numpy as np
import pyproj
import shapely
from shapely.geometry.base import BaseGeometry

from raysam.errors import ConfigError, DataError
from raysam.items import ParsedItem, canonical_band

DEFAULT_RESOLUTION_M = 10.0  # Sentinel-2 finest GSD (B02, B03, B04, B08)
DEFAULT_CHIP_SIZE = 1024  # SAM's encoder input side; the seed's chip size
DEFAULT_OVERLAP = 0.5  # seed parameter spatial_overlap
# Densify lon/lat edges before projecting so long straight borders (a state's 5 degree
# parallel) follow their true curve in UTM; 0.01 degree is about 1 km.
DENSIFY_DEG = 0.01

Affine6 = tuple[float, float, float, float, float, float]
WindowPx = tuple[int, int, int, int]


@dataclass(frozen=True)
class TargetGrid:
    """A north-up pixel grid in a projected CRS.

    Attributes:
        epsg: the grid CRS (a UTM zone, 326zz north / 327zz south).
        resolution_m: pixel size in metres.
        transform: affine (a, b, c, d, e, f) as in ``affine.Affine``/rasterio: x = a*col + c,
            y = e*row + f (b = d = 0, e = -resolution_m).
        width: columns.
        height: rows.
    """

    epsg: int
    resolution_m: float
    transform: Affine6
    width: int
    height: int

    @property
    def crs(self) -> str:
        """The CRS as ``EPSG:<code>``."""
        return f"EPSG:{self.epsg}"

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(minx, miny, maxx, maxy) in the grid CRS."""
        a, _, c, _, e, f = self.transform
        return (c, f + e * self.height, c + a * self.width, f)

    def window_bounds(self, window_px: WindowPx) -> tuple[float, float, float, float]:
        """(minx, miny, maxx, maxy) in the grid CRS of a (col_off, row_off, width, height)."""
        col_off, row_off, width, height = window_px
        a, _, c, _, e, f = self.transform
        return (c + a * col_off, f + e * (row_off + height), c + a * (col_off + width),
                f + e * row_off)

    def window_transform(self, window_px: WindowPx) -> Affine6:
        """The affine of a window's own pixel grid (origin at its top-left corner)."""
        col_off, row_off, _, _ = window_px
        a, b, c, d, e, f = self.transform
        return (a, b, c + a * col_off, d, e, f + e * row_off)


@dataclass(frozen=True)
class ChipWindow:
    """One chip of a grid.

    Attributes:
        chip_id: (row, col) in the chip lattice.
        window_px: (col_off, row_off, width, height) on the target grid.
        bounds: (minx, miny, maxx, maxy) of the chip in the grid CRS.
    """

    chip_id: tuple[int, int]
    window_px: WindowPx
    bounds: tuple[float, float, float, float]


@dataclass(frozen=True)
class DateGroup:
    """One acquisition date of one region, on its target grid.

    Attributes:
        id: deterministic ``<region>_<YYYYMMDD>[_<orbit>]``.
        date: acquisition date (UTC).
        items: the date's items, in priority order (first valid pixel wins when mosaicking).
        grid: the target grid.
        aoi_utm_wkb: the AOI in the grid CRS, as WKB.
    """

    id: str
    date: date
    items: tuple[ParsedItem, ...]
    grid: TargetGrid
    aoi_utm_wkb: bytes

    @property
    def aoi_utm(self) -> BaseGeometry:
        """The AOI in the grid CRS."""
        return shapely.from_wkb(self.aoi_utm_wkb)


@dataclass(frozen=True)
class BandRead:
    """How to read one band of one item for a chip.

    Attributes:
        band: canonical band id (``B04``, ``SCL``).
        key: the catalog's asset key (for error messages).
        href: unsigned asset href.
        offset_dn: DN offset added before scaling.
        scale: reflectance per DN (1.0 for SCL).
        nodata: nodata DN.
        epsg: the CRS the item declares (``proj:epsg``/``proj:code``); the file must match.
    """

    band: str
    key: str
    href: str
    offset_dn: float = 0.0
    scale: float = 1.0
    nodata: float | None = 0
    epsg: int | None = None


@dataclass(frozen=True)
class ItemRead:
    """The bands one chip needs from one item."""

    item_id: str
    bands: tuple[BandRead, ...]

    def band(self, band_id: str) -> BandRead | None:
        """The read for ``band_id`` (canonical), or None if the item lacks it."""
        return next((b for b in self.bands if b.band == band_id), None)


@dataclass(frozen=True)
class ChipTask:
    """Everything a worker needs to read one chip; small and picklable.

    Attributes:
        date_group_id: the group this chip belongs to.
        chip_id: (row, col) in the chip lattice.
        window_px: (col_off, row_off, width, height) on the target grid.
        epsg: target grid CRS.
        transform: the target grid's affine (the chip's own is ``window_transform``).
        items: per item (priority order), only those whose footprint touches the chip.
        aoi_clip_wkb: WKB of AOI ∩ chip box in the grid CRS; None if the chip lies wholly
            inside the AOI.
    """

    date_group_id: str
    chip_id: tuple[int, int]
    window_px: WindowPx
    epsg: int
    transform: Affine6
    items: tuple[ItemRead, ...]
    aoi_clip_wkb: bytes | None

    @property
    def chip_transform(self) -> Affine6:
        """The affine of this chip's pixel grid."""
        col_off, row_off, _, _ = self.window_px
        a, b, c, d, e, f = self.transform
        return (a, b, c + a * col_off, d, e, f + e * row_off)

    @property
    def crs(self) -> str:
        """The CRS as ``EPSG:<code>``."""
        return f"EPSG:{self.epsg}"


def utm_epsg_for(lon: float, lat: float) -> int:
    """EPSG code of the standard UTM zone containing (lon, lat), WGS84 datum.

    Zones are 6 degree bands from -180 (zone 1); latitude >= 0 is north (326zz), else south
    (327zz). The Norway (32V) and Svalbard (31X-37X) exceptions are ignored.
    """
    if not (-180 <= lon <= 180 and -90 <= lat <= 90):
        raise ConfigError(f"lon/lat ({lon}, {lat}) out of range; give degrees")
    zone = min(int(math.floor((lon + 180) / 6)) + 1, 60)
    return (32600 if lat >= 0 else 32700) + zone


def aoi_to_crs(aoi_wgs84: BaseGeometry, epsg: int) -> BaseGeometry:
    """Project a lon/lat AOI to ``epsg`` after densifying its edges (see DENSIFY_DEG)."""
    transformer = pyproj.Transformer.from_crs(4326, epsg, always_xy=True)
    dense = shapely.segmentize(aoi_wgs84, DENSIFY_DEG)
    projected = shapely.transform(
        dense, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))
    return projected if projected.is_valid else shapely.make_valid(projected)


def target_grid(aoi_wgs84: BaseGeometry, epsg: int | None = None,
                resolution_m: float = DEFAULT_RESOLUTION_M) -> TargetGrid:
    """The grid covering an AOI: its bounds in ``epsg`` snapped outward to the resolution.

    Args:
        aoi_wgs84: the AOI in lon/lat.
        epsg: grid CRS; None picks the UTM zone of the AOI centroid.
        resolution_m: pixel size in metres.

    Returns:
        A grid whose origin and far edges are multiples of ``resolution_m``.
    """
    if resolution_m <= 0:
        raise ConfigError(f"resolution_m {resolution_m} must be > 0; Sentinel-2 uses 10")
    if epsg is None:
        centroid = aoi_wgs84.centroid
        epsg = utm_epsg_for(centroid.x, centroid.y)
    minx, miny, maxx, maxy = aoi_to_crs(aoi_wgs84, epsg).bounds
    x0 = math.floor(minx / resolution_m) * resolution_m
    y1 = math.ceil(maxy / resolution_m) * resolution_m
    width = max(1, math.ceil(maxx / resolution_m) - math.floor(minx / resolution_m))
    height = max(1, math.ceil(maxy / resolution_m) - math.floor(miny / resolution_m))
    transform = (float(resolution_m), 0.0, float(x0), 0.0, -float(resolution_m), float(y1))
    return TargetGrid(int(epsg), float(resolution_m), transform, width, height)


def chip_step_px(chip_size: int = DEFAULT_CHIP_SIZE,
                 spatial_overlap: float = DEFAULT_OVERLAP) -> int:
    """Chip stride in pixels: ``round(chip_size * (1 - spatial_overlap))``, at least 1.

    Raises:
        ConfigError: ``spatial_overlap`` outside [0, 1) or a non-positive chip size.
    """
    if not isinstance(chip_size, int) or chip_size < 1:
        raise ConfigError(f"chip_size {chip_size!r} must be a positive integer (SAM uses 1024)")
    if not 0 <= spatial_overlap < 1:
        raise ConfigError(f"spatial_overlap {spatial_overlap} must be in [0.0, 1.0); e.g. 0.5")
    return max(1, round(chip_size * (1 - spatial_overlap)))


def chip_offsets(length_px: int, chip_size: int, step_px: int) -> list[int]:
    """Chip offsets along one axis: 0, step, 2*step, ... and a last one flush with the end.

    ``[0]`` if ``length_px <= chip_size`` (one chip, padded past the grid's end).
    """
    if length_px <= chip_size:
        return [0]
    last = length_px - chip_size
    return list(range(0, last, step_px)) + [last]


def chip_rows(grid: TargetGrid, chip_size: int = DEFAULT_CHIP_SIZE,
              spatial_overlap: float = DEFAULT_OVERLAP) -> int:
    """How many rows of chips the grid has (before dropping chips outside the AOI)."""
    return len(chip_offsets(grid.height, chip_size, chip_step_px(chip_size, spatial_overlap)))


def plan_chips(grid: TargetGrid, aoi_utm: BaseGeometry, chip_size: int = DEFAULT_CHIP_SIZE,
               spatial_overlap: float = DEFAULT_OVERLAP,
               rows: Sequence[int] | None = None,
               cols: Sequence[int] | None = None) -> Iterator[ChipWindow]:
    """Yield the chips of ``grid`` that intersect ``aoi_utm``, row by row.

    Args:
        grid: the target grid.
        aoi_utm: the AOI in the grid CRS.
        chip_size: chip side in pixels.
        spatial_overlap: fraction of a chip shared with its neighbour, in [0, 1).
        rows: only these chip rows (lets workers plan their share; default all).
        cols: only these chip columns (default all).

    Yields:
        ChipWindow per kept chip, in (row, col) order.
    """
    step = chip_step_px(chip_size, spatial_overlap)
    col_offs = chip_offsets(grid.width, chip_size, step)
    row_offs = chip_offsets(grid.height, chip_size, step)
    col_ids = list(range(len(col_offs))) if cols is None else [int(c) for c in cols]
    shapely.prepare(aoi_utm)
    for row in range(len(row_offs)) if rows is None else rows:
        row_off = row_offs[row]
        windows = [(col_offs[c], row_off, chip_size, chip_size) for c in col_ids]
        if not windows:
            continue
        bounds = np.array([grid.window_bounds(w) for w in windows])
        hits = shapely.intersects(aoi_utm, shapely.box(*bounds.T))
        for k in np.flatnonzero(hits):
            yield ChipWindow((row, col_ids[k]), windows[k], tuple(map(float, bounds[k])))


def chip_lattice_px(grid: TargetGrid, chip_size: int = DEFAULT_CHIP_SIZE,
                    spatial_overlap: float = DEFAULT_OVERLAP) -> tuple[list[int], list[int]]:
    """The chip offsets of the grid: (row offsets, column offsets) in pixels."""
    step = chip_step_px(chip_size, spatial_overlap)
    return chip_offsets(grid.height, chip_size, step), chip_offsets(grid.width, chip_size, step)


def date_group_id(region_name: str, day: date | datetime, orbit: int | None = None) -> str:
    """Deterministic date group id ``<region>_<YYYYMMDD>[_<orbit>]``."""
    suffix = f"_{orbit:03d}" if orbit is not None else ""
    return f"{region_name}_{day:%Y%m%d}{suffix}"


def make_date_group(region_name: str, day: date, items: Sequence[ParsedItem],
                    aoi_wgs84: BaseGeometry, epsg: int | None = None,
                    resolution_m: float = DEFAULT_RESOLUTION_M,
                    orbit: int | None = None) -> DateGroup:
    """Build a DateGroup: target grid for the AOI and the AOI projected onto it."""
    grid = target_grid(aoi_wgs84, epsg, resolution_m)
    aoi_utm = aoi_to_crs(aoi_wgs84, grid.epsg)
    return DateGroup(date_group_id(region_name, day, orbit), day, tuple(items), grid,
                     shapely.to_wkb(aoi_utm))


def plan_chip_tasks(group: DateGroup, bands: Sequence[str], chip_size: int = DEFAULT_CHIP_SIZE,
                    spatial_overlap: float = DEFAULT_OVERLAP,
                    rows: Sequence[int] | None = None,
                    cols: Sequence[int] | None = None) -> Iterator[ChipTask]:
    """Yield one ChipTask per chip of the group's grid that touches its AOI.

    Args:
        group: the date group.
        bands: band ids or aliases to read (``R``, ``G``, ``B``, ``SCL``).
        chip_size: chip side in pixels.
        spatial_overlap: fraction of a chip shared with its neighbour, in [0, 1).
        rows: only these chip rows (default all).
        cols: only these chip columns (default all).

    Yields:
        ChipTask with, per item whose footprint touches the chip, the requested bands.

    Raises:
        DataError: an item lacks a requested band.
    """
    windows = WindowPlanner(group, bands)
    for chip in plan_chips(group.grid, windows.aoi_utm, chip_size, spatial_overlap, rows, cols):
        task = windows.task(chip.chip_id, chip.window_px)
        if task is not None:
            yield task


class WindowPlanner:
    """Turns windows of a date group's grid into :class:`ChipTask` reads (items that touch them)."""

    def __init__(self, group: DateGroup, bands: Sequence[str]):
        band_ids = tuple(dict.fromkeys(canonical_band(b) for b in bands))
        self.group = group
        self._item_reads = [item_read(item, band_ids) for item in group.items]
        footprints = [aoi_to_crs(shapely.from_wkb(i.footprint_wkb), group.grid.epsg) for i in group.items]
        self._tree = shapely.STRtree(footprints)
        self.aoi_utm = group.aoi_utm
        shapely.prepare(self.aoi_utm)

    def task(self, chip_id: tuple[int, int], window_px: WindowPx) -> ChipTask | None:
        """The read of ``window_px`` (any size), or None when no item footprint touches it."""
        box = shapely.box(*self.group.grid.window_bounds(window_px))
        hits = sorted(self._tree.query(box, predicate="intersects"))
        if not hits:
            return None
        return ChipTask(self.group.id, chip_id, window_px, self.group.grid.epsg, self.group.grid.transform,
                        tuple(self._item_reads[i] for i in hits), _aoi_clip(self.aoi_utm, box))


def item_read(item: ParsedItem, band_ids: Sequence[str]) -> ItemRead:
    """The ItemRead for the requested canonical band ids of one item (DataError if missing)."""
    reads = []
    for band_id in band_ids:
        asset = item.bands.get(band_id)
        if asset is None:
            raise DataError(f"item {item.id} has no band {band_id} (has "
                            f"{', '.join(sorted(item.bands))}); choose bands the catalog offers")
        reads.append(BandRead(band_id, asset.key, asset.href, asset.offset_dn, asset.scale,
                              asset.nodata, item.epsg))
    return ItemRead(item.id, tuple(reads))


def _aoi_clip(aoi_utm: BaseGeometry, chip_box: BaseGeometry) -> bytes | None:
    """WKB of AOI ∩ chip, or None when the chip lies wholly inside the AOI."""
    if aoi_utm.contains(chip_box):
        return None
    return shapely.to_wkb(shapely.intersection(aoi_utm, chip_box))
