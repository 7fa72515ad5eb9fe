"""Sinks on known inputs: polygons, GeoParquet 1.1, label tiles and their mosaic, quicklook, publishing."""

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
from raysam.records import pack_crop
from raysam.sinks.cog import tile_transform, write_cog
from raysam.sinks.geoparquet import GeoParquetWriter, polygon_table
from raysam.sinks.labels import paint_labels
from raysam.sinks.mosaic import MosaicBand, vrt_xml
from raysam.sinks.polygons import ToWgs84, mask_to_polygon_utm
from raysam.sinks.quicklook import QuicklookFrame, label_preview, rgb_preview
from raysam.storage.publish import LocalPublisher
from raysam.storage.root import MARKER, OutputRoot

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
    """Polygon rows of merged records (the columns a cell shard holds: raysam.cells.CELL_SCHEMA) for ``geoms``."""
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


BIG = ((0, 0, 59, 59), np.ones((60, 60), bool), 3600, 1)  # box, crop, area, id
SMALL = ((20, 20, 29, 29), np.ones((10, 10), bool), 100, 2)


def _paint(window, masks):
    boxes = np.array([m[0] for m in masks]).reshape(-1, 4)
    return paint_labels(window, boxes, [pack_crop(m[1]) for m in masks], np.array([m[2] for m in masks]),
                        np.array([m[3] for m in masks]))


def test_labels_smaller_mask_wins_whatever_the_order():
    for order in ([BIG, SMALL], [SMALL, BIG]):
        labels = _paint((0, 0, 100, 80), order)
        assert labels.dtype == np.uint32 and labels.shape == (80, 100)
        assert (labels[20:30, 20:30] == 2).all()
        assert (labels[:60, :60] != 0).all() and (labels[:60, :60] == 1).sum() == 3600 - 100
        assert (labels[60:, :] == 0).all() and (labels[:, 60:] == 0).all()


def test_equal_areas_go_to_the_lower_id_whatever_the_order():
    a = ((0, 0, 9, 9), np.ones((10, 10), bool), 100, 7)
    b = ((5, 5, 14, 14), np.ones((10, 10), bool), 100, 3)
    for order in ([a, b], [b, a]):
        assert (_paint((0, 0, 20, 20), order)[5:10, 5:10] == 3).all()


def test_tiles_painted_apart_equal_one_painting_and_their_mosaic_opens_as_one_raster(tmp_path):
    rng = np.random.default_rng(3)
    masks = []
    for k in range(60):
        x0, y0 = (int(v) for v in rng.integers(0, 90, 2))
        w, h = (int(v) for v in rng.integers(3, 40, 2))
        crop = rng.random((h, w)) < 0.8
        crop[0, 0] = crop[-1, -1] = True
        masks.append(((x0, y0, x0 + w - 1, y0 + h - 1), crop, int(crop.sum()), k + 1))
    whole = _paint((0, 0, 128, 96), masks)
    root = OutputRoot.open(str(tmp_path))
    tiles = []
    for ty in range(0, 96, 48):
        for tx in range(0, 128, 64):
            window = (tx, ty, min(64, 128 - tx), min(48, 96 - ty))
            part = _paint(window, masks)
            assert np.array_equal(part, whole[ty:ty + window[3], tx:tx + window[2]])
            rel = f"labels/{ty}_{tx}.tif"
            write_cog(root.storage, root.path("labels", f"{ty}_{tx}.tif"), part, tile_transform(GRID, window), 32615,
                      nodata=0, description="mask id", overview_resampling="NEAREST")
            tiles.append((rel, window))
    band = MosaicBand("uint32", 0, "mask id")
    (tmp_path / "labels.vrt").write_text(vrt_xml(128, 96, tuple(GRID)[:6], 32615, band, tiles))
    with rasterio.open(tmp_path / "labels.vrt") as src:
        assert (src.width, src.height, src.count, src.dtypes[0]) == (128, 96, 1, "uint32")
        assert src.crs.to_epsg() == 32615 and src.transform == GRID and src.nodata == 0
        assert src.descriptions == ("mask id",)
        assert np.array_equal(src.read(1), whole)
    with rasterio.open(tmp_path / "labels" / "48_64.tif") as src:
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert src.transform == GRID @ Affine.translation(64, 48)


def test_quicklook_previews_of_tiles_stitch_to_the_preview_of_the_whole():
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 50, (1193, 2365)).astype(np.uint32)
    dn = rng.integers(1, 3000, (3, 1193, 2365)).astype(np.uint16)
    frame = QuicklookFrame(1193, 2365, max_side=400)
    assert frame.shape == (202, 400)
    whole_ids = label_preview(ids, (0, 0, 2365, 1193), frame)
    whole_rgb = rgb_preview(dn, (0, 0, 2365, 1193), frame)
    stitched_ids, stitched_rgb = np.zeros(frame.shape, np.uint32), np.zeros((3, *frame.shape), np.float32)
    for y in range(0, 1193, 512):
        for x in range(0, 2365, 512):
            w = (x, y, min(512, 2365 - x), min(512, 1193 - y))
            (r0, r1, _), (c0, c1, _) = frame.span(w)
            stitched_ids[r0:r1, c0:c1] = label_preview(ids[y:y + w[3], x:x + w[2]], w, frame)
            stitched_rgb[:, r0:r1, c0:c1] = rgb_preview(dn[:, y:y + w[3], x:x + w[2]], w, frame)
    assert np.array_equal(stitched_ids, whole_ids)
    # RGB means are taken over each quicklook pixel's footprint; only pixels cut by a tile edge differ
    assert np.mean(np.isclose(stitched_rgb, whole_rgb)) > 0.9
    step = 2365 / 400
    assert whole_ids[0, 0] == ids[int(0.5 * 1193 / 202), int(0.5 * step)]


def test_publish_is_atomic_and_marks_completion(tmp_path):
    root = OutputRoot.open(str(tmp_path / "out"))
    root.check_writable()
    publisher = LocalPublisher()
    group_dir = root.path("demo", "run", "g1")
    assert not root.is_complete(group_dir, "fp")
    staging = publisher.begin(root, group_dir)
    root.storage.put_bytes(f"{staging}/masks.parquet", b"x")
    assert not Path(group_dir).exists()  # nothing visible before publish
    publisher.publish(root, staging, group_dir, {"fingerprint": "fp"})
    assert root.is_complete(group_dir, "fp") and not root.is_complete(group_dir, "other")
    assert sorted(p.name for p in Path(group_dir).iterdir()) == [MARKER, "masks.parquet"]
    assert [p.name for p in Path(group_dir).parent.iterdir()] == ["g1"]  # no staging left
    staging = publisher.begin(root, group_dir)  # a re-run replaces the directory as a whole
    root.storage.put_bytes(f"{staging}/labels.tif", b"y")
    publisher.publish(root, staging, group_dir, {"fingerprint": "fp2"})
    assert sorted(p.name for p in Path(group_dir).iterdir()) == [MARKER, "labels.tif"]
    staging = publisher.begin(root, group_dir)
    root.storage.put_bytes(f"{staging}/half.tif", b"z")
    publisher.abort(root, staging)  # a failed attempt leaves the published group as it was
    assert sorted(p.name for p in Path(group_dir).parent.iterdir()) == ["g1"]
    assert root.is_complete(group_dir, "fp2")


def test_file_in_the_way_of_the_root_fails_before_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        OutputRoot.open(str(tmp_path / "file" / "out")).check_writable()


def test_an_output_root_travels_to_workers_as_its_uri(tmp_path):
    import pickle

    root = OutputRoot.open(str(tmp_path / "out"))
    blob = pickle.dumps(root)
    assert len(blob) < 200 and pickle.loads(blob).base == root.base
