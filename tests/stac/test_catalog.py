"""The synthetic catalog: files, COG layout, STAC fields and ground truth that agree with each other."""

import json

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from pyproj import Transformer
from shapely.geometry import box, shape

from raysam.demo.catalog import DEMO_AOI_WGS84

BANDS = ("B02", "B03", "B04", "B08")


def _items(info):
    return [json.loads(line) for line in info.items_ndjson.read_text().splitlines()]


def _sample(href, lon, lat, epsg):
    x, y = Transformer.from_crs(4326, epsg, always_xy=True).transform(lon, lat)
    with rasterio.open(href) as ds:
        return int(next(ds.sample([(x, y)]))[0])


def test_layout_and_size(demo_catalog):
    info = demo_catalog
    assert info.size_bytes < 60e6
    assert len(info.item_ids) == 5 and len(list(info.items_dir.glob("*.json"))) == 5
    assert set(info.tiles.values()) == {32615, 32616}
    assert info.dates == ("2024-07-01", "2024-07-11")
    collection = json.loads(info.collection_path.read_text())
    assert collection["id"] == "sentinel-2-l2a" and collection["type"] == "Collection"


def test_items_have_planetary_computer_fields(demo_catalog):
    for item in _items(demo_catalog):
        props = item["properties"]
        assert props["proj:code"] == f"EPSG:{props['proj:epsg']}"
        assert props["s2:mgrs_tile"] in demo_catalog.tiles
        assert props["platform"] == "Sentinel-2A" and props["sat:relative_orbit"] == 69
        assert set(item["assets"]) == {*BANDS, "SCL"}
        assert item["assets"]["B04"]["eo:bands"][0] == {**item["assets"]["B04"]["eo:bands"][0], "name": "B04", "common_name": "red"}
        assert item["assets"]["SCL"]["proj:shape"] == [1024, 1024] and item["assets"]["B02"]["proj:shape"] == [2048, 2048]
    baselines = sorted(i["properties"]["s2:processing_baseline"] for i in _items(demo_catalog))
    assert baselines == ["05.00", "05.10", "05.10", "05.10", "05.10"]


def test_cogs_are_tiled_with_overviews(demo_catalog):
    item = _items(demo_catalog)[0]
    for band, asset in item["assets"].items():
        with rasterio.open(asset["href"]) as ds:
            assert ds.crs.to_epsg() == item["properties"]["proj:epsg"]
            assert list(ds.transform)[:6] == asset["proj:transform"]
            assert ds.profile["tiled"] and ds.block_shapes[0] == (512, 512)
            assert ds.overviews(1), band
            assert ds.nodata == 0 and ds.dtypes[0] == ("uint8" if band == "SCL" else "uint16")


def test_aoi_crosses_zone_boundary_and_needs_both_tiles(demo_catalog):
    aoi = box(*DEMO_AOI_WGS84)
    feet = [shape(i["geometry"]) for i in _items(demo_catalog)[:2]]
    assert aoi.bounds[0] < -90.0 < aoi.bounds[2]
    assert shapely.union_all(feet).contains(aoi)
    assert not any(f.contains(aoi) for f in feet)


def test_fields_ground_truth_straddles_boundary(demo_catalog):
    fields = gpd.read_parquet(demo_catalog.fields_path)
    assert fields.crs.to_epsg() == 4326 and list(fields.columns) == ["id", "geometry"]
    assert len(fields) == demo_catalog.n_fields > 500
    straddling = fields[(fields.bounds.minx < -90.0) & (fields.bounds.maxx > -90.0)]
    assert set(straddling.id) == set(demo_catalog.boundary_field_ids) and len(straddling) >= 1
    assert fields.geometry.is_valid.all() and not fields.geometry.overlaps(fields.geometry.shift()).any()


def test_a_field_has_the_same_dn_in_both_zones(demo_catalog):
    """A field inside the tile overlap renders with the same reflectance in EPSG:32615 and 32616."""
    fields = gpd.read_parquet(demo_catalog.fields_path)
    items = {i["properties"]["s2:mgrs_tile"]: i for i in _items(demo_catalog)[:2]}
    overlap = shapely.intersection(*[shape(i["geometry"]) for i in items.values()])
    inside = fields[fields.within(overlap)]
    assert len(inside) > 10
    values = []
    for geom in inside.geometry[:5]:
        p = geom.representative_point()
        per_tile = [_sample(it["assets"]["B04"]["href"], p.x, p.y, it["properties"]["proj:epsg"]) for it in items.values()]
        assert abs(per_tile[0] - per_tile[1]) <= 30  # 20 m noise, std 4 DN
        values.append(per_tile[0])
    assert min(values) > 1000  # the +1000 offset of baseline 05.10 is baked in
    assert len(set(values)) > 1  # neighbouring fields differ


def test_cloud_patch_only_on_cloudy_date(demo_catalog):
    info = demo_catalog
    by_date = {}
    for item in _items(info)[:4]:
        if item["properties"]["s2:mgrs_tile"] == "16TBM":
            by_date[item["properties"]["datetime"][:10]] = item
    for day, item in by_date.items():
        with rasterio.open(item["assets"]["SCL"]["href"]) as ds:
            scl = ds.read(1)
        cloudy = np.isin(scl, (8, 9, 10))
        assert cloudy.any() == (day == info.cloudy_date)
        assert abs(cloudy.mean() * 100 - item["properties"]["eo:cloud_cover"]) < 0.01
    clear, cloudy = (by_date[d]["assets"]["B04"]["href"] for d in ("2024-07-01", info.cloudy_date))
    lon, lat = -89.93, 41.86  # the cloud centre
    assert _sample(cloudy, lon, lat, 32616) > _sample(clear, lon, lat, 32616) + 3000


def test_existing_catalog_is_reused(demo_catalog):
    from raysam.demo.catalog import make_demo_catalog

    again = make_demo_catalog(demo_catalog.root, seed=0)
    assert again == demo_catalog


def test_bands_rendered_in_strips_equal_one_full_tile_draw():
    """The strip renderer gives, byte for byte, what one full-tile noise draw gives (the demo's bytes)."""
    from dataclasses import replace

    from raysam.demo.catalog import TILES
    from raysam.demo.scene import GSD_M, band_dn, band_dn_in_strips, cloud_opacity

    tile = replace(TILES[1], size_px=1100)  # not a multiple of the strip height; holds the cloud
    classes = np.random.default_rng(1).integers(0, 5, (1100, 1100)).astype("int32")
    table = np.random.default_rng(2).uniform(0.01, 0.5, (5, 4))
    opacity = cloud_opacity(tile, GSD_M)
    assert opacity.max() > 0.5
    full_rng, strip_rng = np.random.default_rng(7), np.random.default_rng(7)
    for b in range(4):
        noise = full_rng.normal(0.0, 4.0, (550, 550)).repeat(2, 0).repeat(2, 1)
        expected = band_dn(table[classes, b], noise, opacity, b)
        assert np.array_equal(band_dn_in_strips(strip_rng, classes, table, b, tile, cloudy=True), expected)


def test_a_larger_tile_makes_its_own_catalog(tmp_path):
    from dataclasses import replace

    from raysam.demo.catalog import TILES, make_demo_catalog
    from raysam.demo.scene import DemoTile, tile_footprint_wgs84, tile_inner_bbox_wgs84
    from raysam.errors import ConfigError

    tile = replace(TILES[1], size_px=1030)
    aoi = tile_inner_bbox_wgs84(tile, 500.0)
    info = make_demo_catalog(tmp_path / "big", tiles=(tile,), aoi_wgs84=aoi)
    assert box(*aoi).within(tile_footprint_wgs84(tile))
    assert info.aoi_wgs84 == aoi and info.tiles == {"16TBM": 32616} and len(info.item_ids) == 3
    for item in _items(info):
        assert item["assets"]["B02"]["proj:shape"] == [1030, 1030] and item["assets"]["SCL"]["proj:shape"] == [515, 515]
        with rasterio.open(item["assets"]["B08"]["href"]) as ds:
            assert ds.shape == (1030, 1030) and ds.read(1).min() > 0
    assert make_demo_catalog(tmp_path / "big", tiles=(tile,), aoi_wgs84=aoi) == info  # reused
    with pytest.raises(ConfigError, match="size_px=1031"):
        DemoTile("16TBM", 32616, 0.0, 0.0, size_px=1031)


def test_inner_bbox_of_a_full_size_tile_covers_most_of_it():
    from dataclasses import replace

    from raysam.demo.catalog import TILES
    from raysam.demo.scene import tile_footprint_wgs84, tile_inner_bbox_wgs84

    tile = replace(TILES[1], size_px=10980)  # a full MGRS tile, 109.8 km
    footprint, aoi = tile_footprint_wgs84(tile), box(*tile_inner_bbox_wgs84(tile, 500.0))
    assert aoi.within(footprint)
    # (108.8 / 109.8)^2 = 0.98, less the corners a lon/lat box loses to the UTM square's slant
    # (16TBM lies 3 degrees west of its zone's central meridian: about 2 degrees of convergence)
    assert aoi.area > 0.9 * footprint.area
