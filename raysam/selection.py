"""Per-date tile selection: which parsed items cover the AOI on each acquisition date.

Owns :class:`DateSelection` and :func:`select_per_date` (FarmVibes' coverage selection): items
are grouped per UTC date (optionally per relative orbit), and each group is reduced to the
fewest footprints that cover the AOI (:func:`greedy_cover`), measured in metres in the AOI's
UTM zone. A date whose cover, tile count or AOI-weighted cloud cover falls short is skipped
with one INFO line. Pure: parsed items and geometry in, selections out; no I/O.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date

import numpy as np
import shapely
from pyproj import Transformer

from raysam.errors import ConfigError, DataError
from raysam.grid import utm_epsg_for
from raysam.items import ParsedItem

__all__ = ["DEFAULT_MIN_TILE_COVER", "DateSelection", "greedy_cover", "select_per_date"]

log = logging.getLogger(__name__)

# A date is used when its tiles cover this share of the AOI (FarmVibes' select_necessary_coverage_items
# asks 0.99; 0.95 leaves room for footprints simplified at the AOI's edge).
DEFAULT_MIN_TILE_COVER = 0.95


@dataclass(frozen=True)
class DateSelection:
    """The items chosen for one acquisition date (optionally one relative orbit).

    Attributes:
        date: UTC acquisition date.
        items: the smallest greedy set of items covering the AOI, largest new cover first.
        aoi_cover: fraction of the AOI area they cover (0..1).
        relative_orbits: distinct ``sat:relative_orbit`` values of the items.
        cloud_cover: AOI-area-weighted ``eo:cloud_cover`` of the items (percent), if known.
    """

    date: date
    items: tuple[ParsedItem, ...]
    aoi_cover: float
    relative_orbits: tuple[int, ...] = ()
    cloud_cover: float | None = None


def _to_metric(geom_wgs84: shapely.Geometry, transformer: Transformer) -> shapely.Geometry:
    """Reproject lon/lat to metres, densifying edges (0.01 deg) so long edges stay faithful."""

    def project(xy: np.ndarray) -> np.ndarray:
        return np.column_stack(transformer.transform(xy[:, 0], xy[:, 1]))

    return shapely.transform(shapely.segmentize(geom_wgs84, 0.01), project)


def greedy_cover(aoi_m: shapely.Geometry, footprints_m: dict[str, shapely.Geometry]) -> tuple[list[str], float]:
    """Smallest greedy set of footprints covering the AOI, largest new coverage first.

    Returns:
        (ids in pick order, covered fraction of the AOI area).
    """
    remaining, picked = aoi_m, []
    min_gain_m2 = 1e-6 * aoi_m.area
    while not remaining.is_empty and len(picked) < len(footprints_m):
        gains = {k: remaining.intersection(f).area for k, f in footprints_m.items() if k not in picked}
        best = max(gains, key=lambda k: (gains[k], k))
        if gains[best] <= min_gain_m2:
            break
        picked.append(best)
        remaining = remaining.difference(footprints_m[best])
    return picked, 1.0 - remaining.area / aoi_m.area


def _weighted_cloud(items: list[ParsedItem], aoi_m: shapely.Geometry, footprints_m: dict[str, shapely.Geometry]) -> float | None:
    """AOI-area-weighted eo:cloud_cover of the items (None if any lacks it)."""
    if not items or any(i.cloud_cover is None for i in items):
        return None
    weights = [aoi_m.intersection(footprints_m[i.id]).area for i in items]
    return sum(w * i.cloud_cover for w, i in zip(weights, items)) / max(sum(weights), 1e-9)


def _group_key(item: ParsedItem, by_orbit: bool) -> tuple[date, int | None]:
    return item.datetime_utc.date(), (item.relative_orbit if by_orbit else None)


def _select_group(key: tuple[date, int | None], items: list[ParsedItem], aoi_m: shapely.Geometry, to_m: Transformer,
                  min_tile_cover: float, max_tiles_per_date: int | None, max_cloud_cover: float | None) -> DateSelection | None:
    """Cover the AOI with one date's items, or log one INFO line saying why the date is skipped."""
    footprints_m = {i.id: _to_metric(shapely.from_wkb(i.footprint_wkb), to_m) for i in items}
    picked_ids, cover = greedy_cover(aoi_m, footprints_m)
    by_id = {i.id: i for i in items}
    picked = [by_id[k] for k in picked_ids]
    cloud = _weighted_cloud(picked, aoi_m, footprints_m)
    label = f"date {key[0].isoformat()}" + (f" orbit {key[1]}" if key[1] is not None else "")
    reason = None
    if cover < min_tile_cover:
        reason = f"its tiles cover {cover:.1%} of the region, below min_tile_cover {min_tile_cover:.1%}"
    elif max_tiles_per_date is not None and len(picked) > max_tiles_per_date:
        reason = f"covering the region needs {len(picked)} tiles, more than max_tiles_per_date {max_tiles_per_date}"
    elif max_cloud_cover is not None and cloud is not None and cloud > max_cloud_cover:
        reason = f"its cloud cover {cloud:.1f}% exceeds max_cloud_cover {max_cloud_cover}%"
    if reason:
        log.info("skipping %s: %s", label, reason)
        return None
    orbits = tuple(sorted({i.relative_orbit for i in picked if i.relative_orbit is not None}))
    return DateSelection(key[0], tuple(picked), cover, orbits, cloud)


def select_per_date(items: Iterable[ParsedItem], aoi_wgs84: shapely.Geometry, min_tile_cover: float = DEFAULT_MIN_TILE_COVER,
                    max_tiles_per_date: int | None = None, max_cloud_cover: float | None = None,
                    split_by_orbit: bool = False) -> list[DateSelection]:
    """Per UTC acquisition date, the fewest items covering the AOI (FarmVibes' coverage selection).

    Coverage is measured in the AOI's UTM zone (metres), never in degrees. A date is skipped,
    with one INFO log line saying why, when its items cover less than ``min_tile_cover`` of
    the AOI area, need more than ``max_tiles_per_date`` items, or their AOI-weighted
    ``eo:cloud_cover`` exceeds ``max_cloud_cover``.

    Args:
        items: parsed (and deduplicated) items.
        aoi_wgs84: the region in EPSG:4326.
        min_tile_cover: minimum covered fraction of the AOI area, in (0, 1].
        max_tiles_per_date: maximum items per date, or None.
        max_cloud_cover: maximum cloud cover in percent, or None.
        split_by_orbit: one group per (date, relative orbit) instead of per date.

    Returns:
        One selection per kept date (or date and orbit), in time order.

    Raises:
        ConfigError: parameters out of range.
        DataError: no date is kept.
    """
    if not 0.0 < min_tile_cover <= 1.0:
        raise ConfigError(f"min_tile_cover={min_tile_cover} must be in (0, 1]: e.g. 0.95")
    if max_tiles_per_date is not None and max_tiles_per_date < 1:
        raise ConfigError(f"max_tiles_per_date={max_tiles_per_date} must be >= 1 or null")
    centroid = aoi_wgs84.centroid
    to_m = Transformer.from_crs(4326, utm_epsg_for(centroid.x, centroid.y), always_xy=True)
    aoi_m = _to_metric(aoi_wgs84, to_m)
    groups: dict[tuple[date, int | None], list[ParsedItem]] = defaultdict(list)
    for item in items:
        if shapely.from_wkb(item.footprint_wkb).intersects(aoi_wgs84):
            groups[_group_key(item, split_by_orbit)].append(item)
    selections = [_select_group(k, groups[k], aoi_m, to_m, min_tile_cover, max_tiles_per_date, max_cloud_cover)
                  for k in sorted(groups, key=lambda k: (k[0], k[1] or 0))]
    kept = [s for s in selections if s is not None]
    if not kept:
        raise DataError(f"none of the {len(groups)} acquisition dates covers the region well enough (see the INFO lines): "
                        "widen the time range, lower min_tile_cover or raise max_tiles_per_date/max_cloud_cover")
    return kept

