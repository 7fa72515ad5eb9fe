"""Sinks on known inputs: polygons, GeoParquet 1.1, the label COG, atomic publishing."""

import json
from datetime import UTC, datetime
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
from affine import Affine

from raysam.errors import ConfigError
from raysam.sinks.geoparquet import GeoParquetWriter, polygon_table
from raysam.sinks.labels import LabelRasterWriter
from raysam.sinks.polygons import ToWgs84, mask_to_polygon_utm
from raysam.sinks.store import MARKER, OutputRoot

GRID = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 4_600_000.0)  # 10 m UTM 15N grid


def test_polygon_of_a_mask_with_a_hole_has_exact_area_and_place():
    mask = np.zeros((30, 40), bool)
    mask[5:25, 10:30] = True
    mask[10:15, 15:20] = False  # a 5x5 hole
    box = (100, 200, 139, 229)  # the crop's inclusive box on the grid
    geom = mask_to_polygon_utm(mask, box, GRID)
    assert geom.area == pytest.approx((400 - 25) * 100.0)
    assert geom.bounds == pytest.approx((500_000 + 110 * 10, 4_600_000 - 225 * 10, 500_000 + 130 * 10, 4_600_000 - 205 * 10))
    lonlat = ToWgs84(32615)(geom)
    assert -94 < lonlat.centroid.x < -92 and 41 < lonlat.centroid.y < 42  # 15N, ~41.5 N


def _rows(geoms, first_id=1):
    """Polygon rows of merged records (the columns GroupWriter.add reads) for ``geoms``."""
    n = len(geoms)
    bounds = np.array([g.bounds for g in geoms])
    records = pa.table({
        "area_m2": np.full(n, 1.0), "perimeter_m": np.full(n, 4.0), "predicted_iou": np.full(n, 0.9, np.float32),
        "stability_score": np.full(n, 0.97, np.float32), "chip_row": [0] * n, "chip_col": [0] * n,
        "geometry": [shapely.to_wkb(g) for g in geoms],
        **{f"bbox_{k}": bounds[:, i] for i, k in enumerate(("xmin", "ymin", "xmax", "ymax"))},
    })
    return polygon_table(records, np.arange(first_id, first_id + n), datetime(2024, 7, 1, 17, tzinfo=UTC), 32615)


def test_geoparquet_is_1_1_and_reads_back_in_geopandas(tmp_path):
    geoms = [shapely.box(-93.0 + i * 0.01, 41.0, -92.995 + i * 0.01, 41.005) for i in range(5)]
    writer = GeoParquetWriter(tmp_path / "m.parquet", "g1", row_group_size=2)
    writer.write(_rows(geoms[:3]))
    writer.write(_rows(geoms[3:], first_id=4))
    writer.close()
    geo = json.loads(pq.read_schema(tmp_path / "m.parquet").metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["columns"]["geometry"]["encoding"] == "WKB"
    assert geo["columns"]["geometry"]["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    assert pq.ParquetFile(tmp_path / "m.parquet").metadata.num_row_groups == 2  # 3 rows reached row_group_size, then the last 2
    df = gpd.read_parquet(tmp_path / "m.parquet")
    assert df.crs.to_epsg() == 4326 and len(df) == 5
    assert all(a.equals(b) for a, b in zip(df.geometry, geoms))


def test_labels_smaller_mask_wins_whatever_the_order_and_file_is_a_cog(tmp_path):
    big = np.ones((60, 60), bool)
    small = np.ones((10, 10), bool)
    for order in ([(1, (0, 0, 59, 59), big, 3600), (2, (20, 20, 29, 29), small, 100)],
                  [(2, (20, 20, 29, 29), small, 100), (1, (0, 0, 59, 59), big, 3600)]):
        out = tmp_path / f"labels-{order[0][0]}.tif"
        writer = LabelRasterWriter(out, 100, 80, GRID, 32615, tmp_path)
        for args in order:
            writer.paint(*args)
        writer.close()
        with rasterio.open(out) as src:
            labels = src.read(1)
            assert src.dtypes[0] == "uint32" and src.nodata == 0 and src.crs.to_epsg() == 32615
            assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert (labels[20:30, 20:30] == 2).all()
        assert (labels[:60, :60] != 0).all() and (labels[:60, :60] == 1).sum() == 3600 - 100
        assert (labels[60:, :] == 0).all() and (labels[:, 60:] == 0).all()
    assert not list(tmp_path.glob("*.npy"))


def test_publish_is_atomic_and_marks_completion(tmp_path):
    root = OutputRoot.open(str(tmp_path / "out"))
    root.check_writable()
    group_dir = root.path("demo", "run", "g1")
    assert not root.is_complete(group_dir, "fp")
    staging = root.staging_dir(group_dir)
    (staging / "masks.parquet").write_bytes(b"x")
    assert not Path(group_dir).exists()  # nothing visible before publish
    root.publish(staging, group_dir, {"fingerprint": "fp"})
    assert root.is_complete(group_dir, "fp") and not root.is_complete(group_dir, "other")
    assert sorted(p.name for p in Path(group_dir).iterdir()) == [MARKER, "masks.parquet"]
    assert [p.name for p in Path(group_dir).parent.iterdir()] == ["g1"]  # no staging left
    staging = root.staging_dir(group_dir)  # a re-run replaces the directory as a whole
    (staging / "labels.tif").write_bytes(b"y")
    root.publish(staging, group_dir, {"fingerprint": "fp2"})
    assert sorted(p.name for p in Path(group_dir).iterdir()) == [MARKER, "labels.tif"]


def test_file_in_the_way_of_the_root_fails_before_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        OutputRoot.open(str(tmp_path / "file" / "out")).check_writable()


def test_aborted_group_writer_leaves_nothing_behind(tmp_path):
    from datetime import date

    from raysam.grid import make_date_group
    from raysam.sinks.group import GroupSinkSpec, GroupWriter

    group = make_date_group("t", date(2024, 7, 1), (), shapely.box(-93.01, 41.0, -93.0, 41.01))
    root = OutputRoot.open(str(tmp_path / "out"))
    spec = GroupSinkSpec(group, root.path("t", "run", group.id), ("segmentation_mask",), (), "fp", "run")
    writer = GroupWriter(spec, root)
    assert list((tmp_path / "out" / "t" / "run").iterdir())  # the staging directory exists ...
    writer.abort()
    assert not list((tmp_path / "out" / "t" / "run").iterdir())  # ... and is gone, nothing published
