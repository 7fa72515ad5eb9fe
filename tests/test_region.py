"""Region loading: geometry sources, CRS handling, validation messages, the Iowa outline."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyproj
import pytest
import shapely
import yaml

from raysam.errors import ConfigError, DataError
from raysam.region import RegionSpec, load_region

REPO = Path(__file__).resolve().parents[1]
TIME = ("2024-06-01", "2024-08-31")
# Known lon/lat corners of a quadrilateral straddling the UTM 15/16 boundary (lon -90).
LONLAT = [(-90.30, 41.10), (-89.70, 41.12), (-89.72, 41.55), (-90.28, 41.50)]


def spec(geometry, **kw) -> RegionSpec:
    return RegionSpec(kw.pop("name", "test"), geometry, kw.pop("time_range", TIME), **kw)


def utm_coords(epsg: int) -> list[tuple[float, float]]:
    t = pyproj.Transformer.from_crs(4326, epsg, always_xy=True)
    return [t.transform(x, y) for x, y in LONLAT]


def assert_lonlat_ring(geom, tol=1e-7) -> None:
    got = np.asarray(geom.exterior.coords)[:-1]
    np.testing.assert_allclose(got, np.asarray(LONLAT), atol=tol)


# --- geometry sources -------------------------------------------------------------------------
def test_bbox_string_and_list_give_the_same_box():
    a = load_region(spec("-90.5,41.0,-89.5,41.8")).aoi_wgs84
    b = load_region(spec([-90.5, 41.0, -89.5, 41.8])).aoi_wgs84
    assert a.bounds == b.bounds == (-90.5, 41.0, -89.5, 41.8)
    assert a.equals(b)


def test_wkt_polygon_and_multipolygon():
    wkt = "MULTIPOLYGON (((0 0, 1 0, 1 1, 0 0)), ((5 5, 6 5, 6 6, 5 5)))"
    aoi = load_region(spec(wkt)).aoi_wgs84
    assert aoi.geom_type == "MultiPolygon" and len(aoi.geoms) == 2
    assert aoi.area == pytest.approx(1.0)


def test_geojson_without_crs_is_lonlat(tmp_path):
    path = tmp_path / "aoi.geojson"
    feature = {"type": "Feature", "properties": {},
               "geometry": shapely.geometry.mapping(shapely.Polygon(LONLAT))}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    assert_lonlat_ring(load_region(spec(str(path))).aoi_wgs84)


def test_geojson_with_legacy_crs_is_reprojected(tmp_path):
    path = tmp_path / "aoi_utm.geojson"
    geom = shapely.geometry.mapping(shapely.Polygon(utm_coords(32616)))
    path.write_text(json.dumps({
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32616"}},
        "features": [{"type": "Feature", "properties": {}, "geometry": geom}]}))
    assert_lonlat_ring(load_region(spec(str(path))).aoi_wgs84)


@pytest.mark.parametrize("crs", [{"type": "EPSG", "properties": {"code": 32616}}, "EPSG:32616"],
                         ids=["geojson-2008-epsg", "plain-string"])
def test_geojson_with_older_crs_members_is_reprojected(tmp_path, crs):
    """GeoJSON 2008's ``{"type": "EPSG"}`` and a bare CRS string are read, not taken for lon/lat."""
    path = tmp_path / "aoi_utm.geojson"
    geom = shapely.geometry.mapping(shapely.Polygon(utm_coords(32616)))
    path.write_text(json.dumps({"type": "FeatureCollection", "crs": crs,
                                "features": [{"type": "Feature", "properties": {}, "geometry": geom}]}))
    assert_lonlat_ring(load_region(spec(str(path))).aoi_wgs84)


def test_metres_read_as_degrees_are_named_projected_not_antimeridian():
    wkt = "POLYGON ((600000 4630000, 601000 4630000, 601000 4631000, 600000 4631000, 600000 4630000))"
    with pytest.raises(ConfigError, match="look like projected coordinates") as err:
        load_region(spec(wkt))
    assert "antimeridian" not in str(err.value)


def test_geoparquet_in_utm_is_reprojected(tmp_path):
    gpd = pytest.importorskip("geopandas")
    path = tmp_path / "aoi.parquet"
    gpd.GeoDataFrame(geometry=[shapely.Polygon(utm_coords(32615))], crs=32615).to_parquet(path)
    assert_lonlat_ring(load_region(spec(str(path))).aoi_wgs84)


def test_features_are_unioned(tmp_path):
    path = tmp_path / "two.geojson"
    feats = [{"type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(g)}
             for g in (shapely.box(0, 0, 1, 1), shapely.box(3, 0, 4, 1))]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    aoi = load_region(spec(str(path))).aoi_wgs84
    assert aoi.geom_type == "MultiPolygon" and aoi.area == pytest.approx(2.0)


# --- CRS and file errors ----------------------------------------------------------------------
def test_geoparquet_with_null_crs_is_refused(tmp_path):
    path = tmp_path / "nocrs.parquet"
    geo = {"version": "1.1.0", "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"],
                                    "crs": None}}}
    table = pa.table({"geometry": [shapely.to_wkb(shapely.Polygon(LONLAT))]})
    pq.write_table(table.replace_schema_metadata({"geo": json.dumps(geo)}), path)
    with pytest.raises(DataError, match="declares no CRS"):
        load_region(spec(str(path)))


def test_plain_parquet_without_geo_metadata_is_refused(tmp_path):
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"geometry": [shapely.to_wkb(shapely.Polygon(LONLAT))]}), path)
    with pytest.raises(DataError, match="no GeoParquet 'geo' metadata"):
        load_region(spec(str(path)))


def test_shapefile_without_prj_is_refused(tmp_path):
    gpd = pytest.importorskip("geopandas")
    pytest.importorskip("pyogrio")
    path = tmp_path / "aoi.shp"
    with pytest.warns(UserWarning, match="crs"):
        gpd.GeoDataFrame(geometry=[shapely.Polygon(LONLAT)]).to_file(path)
    with pytest.raises(DataError, match="has no CRS"):
        load_region(spec(str(path)))


def test_missing_file():
    with pytest.raises(DataError, match="does not exist"):
        load_region(spec("/nonexistent/aoi.geojson"))


# --- geometry validation ----------------------------------------------------------------------
def test_self_intersecting_polygon_is_refused_with_reason():
    bowtie = "POLYGON ((0 0, 1 1, 1 0, 0 1, 0 0))"
    with pytest.raises(DataError, match="invalid .*Self-intersection"):
        load_region(spec(bowtie))


def test_empty_geometry_is_refused():
    with pytest.raises(DataError, match="empty"):
        load_region(spec("POLYGON EMPTY"))


@pytest.mark.parametrize("bbox, message", [
    ("-200,0,10,10", "outside lon -180..180"),
    ("0,-95,10,10", "outside lon -180..180"),
    ("10,0,5,10", "empty or reversed"),
    ("0,0,10,0", "empty or reversed"),
])
def test_bad_bbox(bbox, message):
    with pytest.raises(ConfigError, match=message):
        load_region(spec(bbox))


def test_error_messages_are_one_line():
    with pytest.raises(ConfigError) as err:
        load_region(spec("10,0,5,10"))
    assert "\n" not in str(err.value)


# --- time range and names ---------------------------------------------------------------------
def test_end_date_includes_the_whole_day():
    region = load_region(spec("0,0,1,1"))
    assert region.start_utc == datetime(2024, 6, 1, tzinfo=UTC)
    assert region.end_utc == datetime(2024, 8, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert region.stac_datetime.startswith("2024-06-01T00:00:00")


def test_datetimes_with_zones_become_utc():
    region = load_region(spec("0,0,1,1", time_range=("2024-06-01T02:00:00+02:00",
                                                     "2024-06-02T00:00:00Z")))
    assert region.start_utc == datetime(2024, 6, 1, 0, tzinfo=UTC)
    assert region.end_utc == datetime(2024, 6, 2, 0, tzinfo=UTC)


@pytest.mark.parametrize("time_range, message", [
    (("2024-08-31", "2024-06-01"), "before start"),
    (("2024-06-01", "not-a-date"), "cannot parse date"),
    (("2024-06-01",), r"must be \[start, end\]"),
    ((), r"must be \[start, end\]"),
])
def test_bad_time_range(time_range, message):
    with pytest.raises(ConfigError, match=message):
        load_region(spec("0,0,1,1", time_range=time_range))


@pytest.mark.parametrize("name", ["../etc", "a/b", "", "..", "x y", "."])
def test_unsafe_names_are_refused(name):
    with pytest.raises(ConfigError, match="not a safe path component"):
        load_region(spec("0,0,1,1", name=name))


def test_safe_name_is_kept():
    assert load_region(spec("0,0,1,1", name="iowa-2024_v1.0")).name == "iowa-2024_v1.0"


@pytest.mark.parametrize("kw, message", [
    ({"max_cloud_cover": 120}, "not a percentage"),
    ({"min_tile_cover": 0}, r"in \(0, 1\]"),
    ({"max_tiles_per_date": 0}, "positive integer"),
    ({"utm_epsg": 4326}, "not a projected CRS in metres"),
    ({"utm_epsg": 999999}, "not a known EPSG code"),
])
def test_bad_limits(kw, message):
    with pytest.raises(ConfigError, match=message):
        load_region(spec("0,0,1,1", **kw))


# --- Iowa ---------------------------------------------------------------------------------------
def test_iowa_outline_from_config():
    cfg = yaml.safe_load((REPO / "conf/region/iowa.yaml").read_text())
    region = load_region(RegionSpec(cfg["name"], cfg["geometry"], tuple(cfg["time_range"]),
                                    cfg["max_cloud_cover"], cfg["min_tile_cover"],
                                    cfg["max_tiles_per_date"], cfg["utm_epsg"]))
    aoi = region.aoi_wgs84
    assert region.name == "iowa" and aoi.geom_type == "Polygon"
    assert 45 <= len(aoi.exterior.coords) <= 200
    # Iowa's extent: about 96.64 W to 90.14 W, 40.38 N to 43.50 N.
    np.testing.assert_allclose(aoi.bounds, (-96.64, 40.38, -90.14, 43.50), atol=0.05)
    area_km2 = abs(pyproj.Geod(ellps="WGS84").geometry_area_perimeter(aoi)[0]) / 1e6
    assert area_km2 == pytest.approx(145_746, rel=0.02)  # US Census total area of Iowa



def test_point_geometry_is_refused(tmp_path):
    path = tmp_path / "point.geojson"
    path.write_text(json.dumps({"type": "Point", "coordinates": [1.0, 1.0]}))
    with pytest.raises(ConfigError, match="is a Point, not a polygon"):
        load_region(spec(str(path)))


def test_demo_config_matches_the_demo_catalog():
    from raysam.demo.catalog import DEMO_AOI_WGS84, DEMO_TIME_RANGE

    cfg = yaml.safe_load((REPO / "conf/region/demo.yaml").read_text())["region"]
    region = load_region(RegionSpec(cfg["name"], cfg["geometry"], tuple(cfg["time_range"])))
    assert region.aoi_wgs84.bounds == DEMO_AOI_WGS84
    assert tuple(cfg["time_range"]) == DEMO_TIME_RANGE
