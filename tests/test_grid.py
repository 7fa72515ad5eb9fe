"""Target grids and chip planning: zones, alignment, steps, flush edges, AOI filtering, tasks."""

from __future__ import annotations

import pickle
import time
from datetime import UTC, date, datetime

import numpy as np
import pyproj
import pytest
import shapely

from raysam.errors import ConfigError, DataError
from raysam.grid import (TargetGrid, aoi_to_crs, chip_offsets, chip_step_px, date_group_id,
                         make_date_group, plan_chip_tasks, plan_chips, target_grid, utm_epsg_for)
from raysam.items import BandAsset, ParsedItem
from raysam.region import RegionSpec, load_region


def grid_at(x0: float, y1: float, width: int, height: int, epsg: int = 32615) -> TargetGrid:
    return TargetGrid(epsg, 10.0, (10.0, 0.0, x0, 0.0, -10.0, y1), width, height)


def item(item_id: str, footprint_wgs84, bands=("B02", "B03", "B04", "SCL")) -> ParsedItem:
    assets = {b: BandAsset(key=b.lower(), href=f"/data/{item_id}/{b}.tif", gsd_m=10,
                           offset_dn=-1000.0 if b != "SCL" else 0.0,
                           scale=1e-4 if b != "SCL" else 1.0) for b in bands}
    return ParsedItem(item_id, "sentinel-2-l2a", datetime(2024, 7, 1, 17, tzinfo=UTC), "15TXX",
                      32615, footprint_wgs84.bounds, shapely.to_wkb(footprint_wgs84),
                      bands=assets)


# --- zones ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("lon, lat, epsg", [
    (-93.5, 42.0, 32615),
    (-90.0001, 41.0, 32615),
    (-89.9999, 41.0, 32616),
    (-90.0, 41.0, 32616),  # a zone's west edge belongs to it
    (-180.0, 10.0, 32601),
    (180.0, 10.0, 32660),
    (151.2, -33.9, 32756),  # Sydney
    (3.0, 0.0, 32631),  # the equator counts as north
])
def test_utm_zone(lon, lat, epsg):
    assert utm_epsg_for(lon, lat) == epsg


def test_grid_uses_the_zone_of_the_centroid_unless_configured():
    across = shapely.box(-90.2, 41.0, -89.6, 41.3)  # centroid at -89.9: zone 16
    assert target_grid(across).epsg == 32616
    assert target_grid(across, epsg=32615).epsg == 32615


# --- grid alignment ---------------------------------------------------------------------------------
@pytest.mark.parametrize("epsg", [32615, 32616])
def test_grid_is_snapped_outward_to_10m(epsg):
    aoi = shapely.box(-90.2, 41.0, -89.6, 41.3)
    grid = target_grid(aoi, epsg=epsg)
    a, b, c, d, e, f = grid.transform
    assert (a, b, d, e) == (10.0, 0.0, 0.0, -10.0)
    assert c % 10 == 0 and f % 10 == 0
    # The projected AOI (densified independently by pyproj) fits inside, within 10 m of each edge.
    t = pyproj.Transformer.from_crs(4326, epsg, always_xy=True)
    minx, miny, maxx, maxy = t.transform_bounds(*aoi.bounds, densify_pts=200)
    gminx, gminy, gmaxx, gmaxy = grid.bounds
    assert gminx <= minx < gminx + 10 and gmaxx - 10 < maxx <= gmaxx
    assert gminy <= miny < gminy + 10 and gmaxy - 10 < maxy <= gmaxy
    assert grid.width == round((gmaxx - gminx) / 10) and grid.height == round((gmaxy - gminy) / 10)


def test_grid_follows_curved_parallels():
    # A long parallel bows in UTM: the grid must cover its middle, not just the vertices.
    aoi = shapely.box(-96.0, 43.0, -90.0, 43.5)
    grid = target_grid(aoi, epsg=32615)
    t = pyproj.Transformer.from_crs(4326, 32615, always_xy=True)
    _, y_mid_north = t.transform(-93.0, 43.5)
    assert grid.bounds[3] >= y_mid_north


# --- steps and offsets -------------------------------------------------------------------------------
@pytest.mark.parametrize("overlap, step", [(0.5, 512), (0.0, 1024), (0.25, 768), (0.9, 102)])
def test_chip_step(overlap, step):
    assert chip_step_px(1024, overlap) == step


@pytest.mark.parametrize("overlap", [1.0, -0.1, 1.5])
def test_bad_overlap(overlap):
    with pytest.raises(ConfigError, match=r"spatial_overlap .* must be in \[0.0, 1.0\)"):
        chip_step_px(1024, overlap)


def test_offsets_step_and_last_flush():
    assert chip_offsets(3000, 1024, 512) == [0, 512, 1024, 1536, 1976]
    assert chip_offsets(2048, 1024, 512) == [0, 512, 1024]
    assert chip_offsets(1024, 1024, 512) == [0]
    assert chip_offsets(300, 1024, 512) == [0]


def test_chips_cover_every_grid_pixel_and_stay_inside():
    grid = grid_at(500_000.0, 4_600_000.0, 3000, 2100)
    covered = np.zeros((grid.height, grid.width), dtype=np.uint8)
    chips = list(plan_chips(grid, shapely.box(*grid.bounds), 1024, 0.5))
    for chip in chips:
        col, row, w, h = chip.window_px
        assert (w, h) == (1024, 1024)
        assert col + w <= grid.width and row + h <= grid.height
        covered[row:row + h, col:col + w] = 1
    assert covered.all()
    assert {c.window_px[0] for c in chips} == {0, 512, 1024, 1536, 1976}
    assert {c.window_px[1] for c in chips} == {0, 512, 1024, 1076}
    last = max(chips, key=lambda c: c.chip_id)
    assert last.chip_id == (3, 4) and last.bounds[2] == grid.bounds[2]
    assert last.bounds[1] == grid.bounds[1]


def test_small_grid_gets_one_padded_chip_at_the_origin():
    grid = grid_at(500_000.0, 4_600_000.0, 300, 200)
    chips = list(plan_chips(grid, shapely.box(*grid.bounds)))
    assert len(chips) == 1
    assert chips[0].window_px == (0, 0, 1024, 1024)
    assert chips[0].bounds == (500_000.0, 4_600_000.0 - 10240, 500_000.0 + 10240, 4_600_000.0)


# --- AOI filtering ------------------------------------------------------------------------------------
def test_chips_outside_a_concave_aoi_are_dropped():
    # 4x4 chips of 1024 px (overlap 0) over 40,960 m; an L-shaped AOI leaves the top-right 2x2
    # block empty (shrunk by 5 m so it does not touch those chips' edges).
    x0, y1, size = 500_000.0, 4_600_000.0, 10_240.0
    grid = grid_at(x0, y1, 4096, 4096)
    left = shapely.box(x0 + 5, y1 - 4 * size + 5, x0 + 2 * size - 5, y1 - 5)
    bottom = shapely.box(x0 + 5, y1 - 4 * size + 5, x0 + 4 * size - 5, y1 - 2 * size - 5)
    l_shape = shapely.union(left, bottom)
    ids = {c.chip_id for c in plan_chips(grid, l_shape, 1024, 0.0)}
    expected = {(r, c) for r in range(4) for c in range(4)} - {(0, 2), (0, 3), (1, 2), (1, 3)}
    assert ids == expected


def test_multipolygon_keeps_only_touched_chips():
    x0, y1, size = 500_000.0, 4_600_000.0, 10_240.0
    grid = grid_at(x0, y1, 4096, 4096)
    parts = shapely.MultiPolygon([
        shapely.box(x0 + 3 * size + 100, y1 - size + 100, x0 + 4 * size - 100, y1 - 100),
        shapely.box(x0 + 100, y1 - 4 * size + 100, x0 + size - 100, y1 - 3 * size - 100)])
    assert {c.chip_id for c in plan_chips(grid, parts, 1024, 0.0)} == {(0, 3), (3, 0)}


def test_iowa_chip_count_at_seed_defaults(capsys):
    region = load_region(RegionSpec("iowa", "pkg://raysam/data/iowa.geojson",
                                    ("2024-06-01", "2024-08-31")))
    t0 = time.perf_counter()
    grid = target_grid(region.aoi_wgs84)
    count = sum(1 for _ in plan_chips(grid, aoi_to_crs(region.aoi_wgs84, grid.epsg), 1024, 0.5))
    seconds = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nIowa: EPSG:{grid.epsg} grid {grid.width}x{grid.height} px, {count} chips "
              f"(1024 px, 50 % overlap), planned in {seconds:.2f} s")
    assert grid.epsg == 32615
    # 145,700 km2 at 26.2 km2 of new area per chip is about 5,600, plus a border ring.
    assert 5_500 <= count <= 6_500


# --- date groups and chip tasks -------------------------------------------------------------------------
def test_date_group_id_is_deterministic():
    assert date_group_id("iowa", date(2024, 7, 1)) == "iowa_20240701"
    assert date_group_id("iowa", datetime(2024, 7, 1, 17, tzinfo=UTC), orbit=69) == "iowa_20240701_069"


def test_chip_tasks_list_only_items_touching_the_chip():
    aoi = shapely.box(-93.30, 42.00, -93.00, 42.10)
    west = item("west", shapely.box(-94.0, 41.5, -93.15, 42.5))
    east = item("east", shapely.box(-93.16, 41.5, -92.0, 42.5))
    group = make_date_group("t", date(2024, 7, 1), [west, east], aoi)
    tasks = list(plan_chip_tasks(group, ["R", "G", "B", "SCL"], 1024, 0.5))
    assert tasks and all(t.date_group_id == "t_20240701" for t in tasks)
    t = pyproj.Transformer.from_crs(4326, group.grid.epsg, always_xy=True)
    x_west_edge, _ = t.transform(-93.15, 42.05)
    x_east_edge, _ = t.transform(-93.16, 42.05)
    for task in tasks:
        minx, _, maxx, _ = group.grid.window_bounds(task.window_px)
        ids = [i.item_id for i in task.items]
        assert ("west" in ids) == (minx < x_west_edge)
        assert ("east" in ids) == (maxx > x_east_edge)
        assert ids == sorted(ids, key=["west", "east"].index)  # group order kept
        assert [b.band for b in task.items[0].bands] == ["B04", "B03", "B02", "SCL"]


def test_chip_task_is_small_and_clips_the_aoi():
    aoi = shapely.box(-93.30, 42.00, -93.00, 42.10)
    group = make_date_group("t", date(2024, 7, 1), [item("a", shapely.box(-94, 41, -92, 43))], aoi)
    tasks = list(plan_chip_tasks(group, ["R", "G", "B", "SCL"]))
    for task in tasks:
        blob = pickle.dumps(task)
        assert len(blob) < 1500
        clip = shapely.from_wkb(task.aoi_clip_wkb) if task.aoi_clip_wkb else None
        chip_box = shapely.box(*group.grid.window_bounds(task.window_px))
        expected = shapely.intersection(group.aoi_utm, chip_box)
        assert clip is not None and clip.symmetric_difference(expected).area < 1.0
    # A chip inside a large AOI carries no clip at all.
    big = make_date_group("t", date(2024, 7, 1), [item("a", shapely.box(-94, 41, -92, 43))],
                          shapely.box(-93.6, 41.6, -92.4, 42.4))
    assert any(t.aoi_clip_wkb is None for t in plan_chip_tasks(big, ["R", "G", "B"]))


def test_missing_band_names_item_and_band():
    aoi = shapely.box(-93.30, 42.00, -93.00, 42.10)
    group = make_date_group("t", date(2024, 7, 1),
                            [item("S2A_X", shapely.box(-94, 41, -92, 43), bands=("B02", "B03"))],
                            aoi)
    with pytest.raises(DataError, match="item S2A_X has no band B04"):
        next(plan_chip_tasks(group, ["R", "G", "B"]))


def test_aoi_projection_is_valid_and_close_to_geodesic_area():
    aoi = shapely.box(-90.5, 41.0, -89.5, 41.5)
    utm = aoi_to_crs(aoi, 32616)
    geodesic = abs(pyproj.Geod(ellps="WGS84").geometry_area_perimeter(aoi)[0])
    assert utm.is_valid and utm.area == pytest.approx(geodesic, rel=2e-3)  # UTM scale ~0.9996
