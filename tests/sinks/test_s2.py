"""s2_raster sink on the demo catalog: COG layout, grid, nodata outside the AOI, scale/offset
tags giving the generator's field reflectance, and the same pixels as the chip reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pyproj
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.features import geometry_mask
from rasterio.windows import Window

from raysam.demo import scene
from raysam.grid import make_date_group, plan_chip_tasks
from raysam.layout import GroupSpec
from raysam.read import ChipPixels, read_band_dn, read_chip
from raysam.scaling import ScalingSpec, reflectance, to_uint8
from raysam.sinks.quicklook import QuicklookFrame
from raysam.sinks.s2 import band_mosaic_xml, write_s2_tile
from raysam.storage.root import OutputRoot

BANDS = ("R", "G", "B", "SCL")
STRETCH_0_02 = ScalingSpec(mode="stretch", low=(0.0,) * 3, high=(0.2,) * 3)  # 0.00078 per level
SCL_CLASSES = {0, scene.SCL_VEGETATION, scene.SCL_NOT_VEGETATED, scene.SCL_WATER,
               scene.SCL_CLOUD_MEDIUM, scene.SCL_CLOUD_HIGH, scene.SCL_CIRRUS}


@pytest.fixture(scope="module")
def demo_group(demo_selection):
    """The demo region's clear date as a DateGroup (zone 16 grid, both tiles)."""
    region, info, selections = demo_selection
    sel = selections[info.dates[0]]
    return make_date_group("demo", sel.date, sel.items, region.aoi_wgs84), region, info


@pytest.fixture(scope="module")
def s2_dir(demo_group, tmp_path_factory):
    """The s2 tiles of every sink tile and one mosaic (VRT) per band, as the back half writes them."""
    group, _, _ = demo_group
    root = OutputRoot.open(str(tmp_path_factory.mktemp("s2")))
    spec = GroupSpec(group, root, "fp", root.path("g"), root.path("g"), root.path(".work"), BANDS, 0.5)
    tiles = spec.tiling.tiles_in(group.grid, group.aoi_utm)
    assert len(tiles) == 2  # the demo grid is 2365 x 1193 px
    frame = QuicklookFrame(group.grid.height, group.grid.width)
    written = [write_s2_tile(spec, tile, BANDS, frame) for tile in tiles]
    out = root.storage
    for band in ("B04", "B03", "B02", "SCL"):
        out.put_bytes(root.path("g", "s2", f"{band}.vrt"), band_mosaic_xml(group.grid, band, written).encode())
    return Path(root.path("g", "s2"))


def _to(epsg: int, geom):
    t = pyproj.Transformer.from_crs(4326, epsg, always_xy=True)
    return shapely.transform(shapely.segmentize(geom, 0.0005),
                             lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1])))


def test_one_valid_cog_per_band_and_tile_mosaicked_on_the_target_grid(demo_group, s2_dir):
    group, _, _ = demo_group
    descriptions = {
        "B04": "B04 red: L2A digital number; reflectance = DN * scale + offset",
        "B03": "B03 green: L2A digital number; reflectance = DN * scale + offset",
        "B02": "B02 blue: L2A digital number; reflectance = DN * scale + offset",
        "SCL": "SCL: L2A scene classification (categorical)",
    }
    for name in ("B04", "B03", "B02", "SCL"):
        tiles = sorted((s2_dir / name).glob("*.tif"))
        assert [t.name for t in tiles] == ["000_000.tif", "000_001.tif"]
        for tile in tiles:
            with rasterio.open(tile) as src:
                assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
                assert src.overviews(1), f"{tile}: no overviews"
                assert src.descriptions == (descriptions[name],)
        with rasterio.open(s2_dir / f"{name}.vrt") as src:  # the mosaic: one raster on the grid
            assert src.dtypes[0] == "uint16" and src.nodata == 0 and src.count == 1
            assert src.crs.to_epsg() == group.grid.epsg == 32616
            assert tuple(src.transform)[:6] == group.grid.transform
            assert (src.width, src.height) == (group.grid.width, group.grid.height)
            assert src.descriptions == (descriptions[name],)
    assert not list(s2_dir.rglob(".*"))  # no temporary files left


def test_scale_offset_tags_and_nodata_outside_the_aoi(demo_group, s2_dir):
    group, _, _ = demo_group
    with rasterio.open(s2_dir / "B04.vrt") as src:
        assert src.scales == (pytest.approx(1e-4),)
        # Baseline 05.10: reflectance = (DN - 1000) * 1e-4 = DN * 1e-4 - 0.1.
        assert src.offsets == (pytest.approx(-scene.BOA_ADD_OFFSET_DN * 1e-4),)
        dn = src.read(1)
    with rasterio.open(s2_dir / "SCL.vrt") as src:
        assert src.scales == (1.0,) and src.offsets == (0.0,)
        scl = src.read(1)
    in_aoi = geometry_mask([group.aoi_utm], dn.shape, Affine(*group.grid.transform), invert=True)
    assert (dn[~in_aoi] == 0).all() and (scl[~in_aoi] == 0).all()
    assert (dn[in_aoi] > 0).mean() > 0.999  # both tiles cover the AOI
    assert set(np.unique(scl)) <= SCL_CLASSES  # nearest: classes, never blends of them


def test_tagged_reflectance_is_the_known_field_reflectance(demo_group, s2_dir):
    group, region, info = demo_group
    table = pq.read_table(info.fields_path).to_pydict()
    fields = [shapely.from_wkb(g) for g in table["geometry"]]
    inside = [f for f in fields if region.aoi_wgs84.buffer(-0.003).contains(f)]
    field = max(inside, key=lambda f: f.area)
    field_utm = _to(group.grid.epsg, field).buffer(-20)
    refl = []
    for name in ("B04", "B03", "B02"):
        with rasterio.open(s2_dir / f"{name}.vrt") as src:
            win = rasterio.windows.from_bounds(*field_utm.bounds, transform=src.transform)
            win = win.round_offsets().round_lengths()
            dn = src.read(1, window=win).astype(float)
            m = geometry_mask([field_utm], dn.shape, src.window_transform(win), invert=True)
            refl.append(np.median(dn[m]) * src.scales[0] + src.offsets[0])
    # Truth 1: the first item's own DNs, minus the generator's BOA offset.
    first = next(i for i in group.items if shapely.from_wkb(i.footprint_wkb).contains(field))
    truth = []
    for name in ("B04", "B03", "B02"):
        with rasterio.open(first.bands[name].href) as src:
            geom = _to(src.crs.to_epsg(), field).buffer(-20)
            win = rasterio.windows.from_bounds(*geom.bounds, transform=src.transform)
            dn = src.read(1, window=win)
            m = geometry_mask([geom], dn.shape, src.window_transform(win), invert=True)
            truth.append((np.median(dn[m]) - scene.BOA_ADD_OFFSET_DN) * 1e-4)
    np.testing.assert_allclose(refl, truth, atol=3e-4)
    # Truth 2: within the generator's envelope of some land cover (jitter x drift).
    covers = np.array(list(scene.COVER_REFLECTANCE.values()))[:, [2, 1, 0]]
    refl = np.array(refl)
    ok = (refl >= covers * 0.85 * 0.95 - 0.002) & (refl <= covers * 1.15 * 1.05 + 0.002)
    assert ok.all(axis=1).any(), f"field reflectance {refl} fits no land cover"


def test_pixels_match_the_chip_reads(demo_group, s2_dir):
    group, _, _ = demo_group
    tasks = [t for t in plan_chip_tasks(group, BANDS) if len(t.items) == 2]
    task = tasks[len(tasks) // 2]  # a chip needing both tiles
    chip = read_chip(task, scaling=STRETCH_0_02, max_cloud_fraction=1.0)
    assert isinstance(chip, ChipPixels)
    col_off, row_off, width, height = task.window_px
    layers, dns = [], []
    for i, name in enumerate(("B04", "B03", "B02")):
        with rasterio.open(s2_dir / f"{name}.vrt") as src:
            dn = src.read(1, window=Window(col_off, row_off, width, height), boundless=True,
                          fill_value=0)
            dns.append(dn)
            layers.append(reflectance(dn, 0.0, 1.0) * src.scales[0] + src.offsets[0])
    rgb = to_uint8(np.stack(layers), STRETCH_0_02)
    valid = chip.valid
    diff = np.abs(rgb.astype(int) - chip.rgb.astype(int))[valid]
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999
    # DNs: the sink's 2048 px windows and the 1024 px chip agree exactly where the source is
    # aligned with the grid (the zone 16 item) and to float rounding where it is warped.
    chip_dn, _ = read_band_dn(task, "R")
    gap = np.abs(dns[0].astype(int) - chip_dn.astype(int))[valid]
    assert (gap == 0).mean() > 0.99 and gap.max() <= 2
