"""End to end on the demo region and demo model: Ray pipeline, merge, sinks, resume, bad config.

The synthetic catalog's ground-truth fields (``fields.parquet``) give known answers: the output
polygons must recover them, once each, in EPSG:4326 on both sides of the UTM zone boundary.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import rasterio
import shapely
from hydra import compose, initialize_config_dir

from raysam.hydra_config import to_run_config
from raysam.errors import ConfigError
from raysam.run import CONF_DIR, run

pytestmark = pytest.mark.slow

# A sub-region of the demo AOI that still straddles lon -90 (the UTM 15/16 boundary): one
# 1024 chip per date keeps the run short; points_per_side 24 prompts most of its fields.
SMALL_AOI = "-90.035,41.815,-89.965,41.865"
FIELD_IOU_MEDIAN_MIN = 0.8


def run_config(tmp_root: Path, demo_catalog, *overrides: str):
    """A validated RunConfig for the demo on the session's catalog, writing under ``tmp_root``."""
    base = [
        "region=demo", "model=demo", f"region.geometry='{SMALL_AOI}'",
        f"stac.demo_root={demo_catalog.root.parent}", f"model.path={demo_catalog.root.parent / 'models' / 'demo'}",
        f"output.root={tmp_root}", "sam.points_per_side=16", "sam.points_per_batch=64",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_run_config(compose("config", overrides=[*base, *overrides]))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_catalog, ray_local):
    root = tmp_path_factory.mktemp("out")
    metrics = run(run_config(root, demo_catalog))
    return root, metrics


def _group_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("demo/*/*/_COMPLETE.json"))


def _fields(demo_catalog) -> gpd.GeoDataFrame:
    return gpd.read_parquet(demo_catalog.fields_path)


def test_outputs_are_complete_and_open_in_gis_tools(demo_run):
    root, metrics = demo_run
    groups = _group_dirs(root)
    assert len(groups) == 2 == metrics["groups_done"]  # two dates
    for d in groups:
        assert sorted(p.name for p in d.iterdir()) == [
            "_COMPLETE.json", "item.json", "labels", "labels.qml", "labels.tif", "labels.vrt", "manifest.json",
            "masks", "masks.parquet", "quicklook.pgw", "quicklook.png", "quicklook.png.aux.xml", "s2"]
        masks = gpd.read_parquet(d / "masks.parquet")
        assert masks.crs.to_epsg() == 4326 and len(masks) > 0
        assert json.loads(pq.read_schema(d / "masks.parquet").metadata[b"geo"])["version"] == "1.1.0"
        assert list(masks["label_id"]) == list(range(1, len(masks) + 1))  # the label raster's ids
        assert list(masks["id"]) == [str(i) for i in masks["label_id"]]  # fiboa's id: a string
        assert set(masks["determination:method"]) == {"auto-imagery"}
        assert masks.geometry.is_valid.all()
        with rasterio.open(d / "labels.tif") as src:
            assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and src.dtypes[0] == "uint32"
            labels = src.read(1)
            assert set(np.unique(labels)) - {0} <= set(masks["label_id"])
        manifest = json.loads((d / "manifest.json").read_text())
        counts = manifest["counts"]
        assert counts["masks_after_merge"] == len(masks) <= counts["masks_before_merge"]
        assert counts["chips_segmented"] + counts["chips_skipped"] >= 1
        assert counts["chips_planned"] == counts["chips_segmented"] + counts["chips_resumed"]
        assert manifest["model"]["family"] == "demo"
    assert not list(root.rglob(".*")), "work, staging or lock files left behind"


def test_partitioned_and_single_file_outputs_agree(demo_run):
    """The tiles and parts are the outputs; the single files below the threshold are copies of them."""
    root, _ = demo_run
    for d in _group_dirs(root):
        single = gpd.read_parquet(d / "masks.parquet")
        parts = gpd.read_parquet(d / "masks")  # the folder of parts, as geopandas reads a dataset
        assert len(parts) == len(single) and sorted(parts["label_id"]) == list(single["label_id"])
        parts = parts.set_index("label_id").loc[single["label_id"]]
        assert all(a.equals(b) for a, b in zip(parts.geometry, single.geometry, strict=True))
        with rasterio.open(d / "labels.vrt") as mosaic, rasterio.open(d / "labels.tif") as one:
            assert (mosaic.width, mosaic.height, mosaic.crs, mosaic.transform) == (one.width, one.height, one.crs,
                                                                                 one.transform)
            assert np.array_equal(mosaic.read(1), one.read(1))
        tiles = sorted((d / "labels").glob("*.tif"))
        assert len(tiles) == json.loads((d / "manifest.json").read_text())["date_group"]["tiles"] >= 1
        for band in ("B02", "B03", "B04", "B08"):
            with rasterio.open(d / "s2" / f"{band}.vrt") as mosaic, rasterio.open(d / "s2" / f"{band}.tif") as one:
                assert np.array_equal(mosaic.read(1), one.read(1)) and mosaic.scales == one.scales


def test_fields_are_recovered_once_each_across_the_zone_boundary(demo_run, demo_catalog):
    root, _ = demo_run
    fields = _fields(demo_catalog).to_crs(32616)
    clear_day = [d for d in _group_dirs(root) if d.name.endswith("20240701")][0]
    masks = gpd.read_parquet(clear_day / "masks.parquet").to_crs(32616)
    tree = shapely.STRtree(fields.geometry.values)
    best_iou, best_field = [], []
    for geom in masks.geometry:
        hits = tree.query(geom, predicate="intersects")
        ious = [geom.intersection(fields.geometry.iloc[h]).area / geom.union(fields.geometry.iloc[h]).area for h in hits]
        k = int(np.argmax(ious)) if ious else -1
        best_iou.append(ious[k] if ious else 0.0)
        best_field.append(int(fields["id"].iloc[hits[k]]) if ious else -1)
    best_iou, best_field = np.asarray(best_iou), np.asarray(best_field)
    matched = best_iou >= 0.5
    assert matched.sum() >= 20, f"only {matched.sum()} masks match a field"
    assert np.median(best_iou[matched]) >= FIELD_IOU_MEDIAN_MIN
    ids, counts = np.unique(best_field[matched], return_counts=True)
    assert (counts == 1).all(), f"fields represented twice: {ids[counts > 1]}"
    # Fields on both sides of lon -90 are found, and straddling ones land where the truth says.
    lon = gpd.GeoSeries(masks.geometry[matched].centroid, crs=32616).to_crs(4326).x
    assert (lon < -90).any() and (lon > -90).any()
    straddling = set(demo_catalog.boundary_field_ids) & set(best_field[matched].tolist())
    assert straddling, "no straddling field recovered"


def test_no_two_outputs_overlap_beyond_mask_nms_thr(demo_run):
    root, _ = demo_run
    for d in _group_dirs(root):
        geoms = gpd.read_parquet(d / "masks.parquet").to_crs(32616).geometry.values
        tree = shapely.STRtree(geoms)
        i, j = tree.query(geoms, predicate="intersects")
        pairs = i < j
        inter = shapely.area(shapely.intersection(geoms[i[pairs]], geoms[j[pairs]]))
        union = shapely.area(shapely.union(geoms[i[pairs]], geoms[j[pairs]]))
        assert (inter / union <= 0.5 + 1e-6).all()


def test_rerun_skips_complete_groups_and_changes_nothing(demo_run, demo_catalog):
    root, _ = demo_run
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    metrics = run(run_config(root, demo_catalog))
    assert metrics["groups_skipped"] == 2 and metrics["groups_done"] == 0
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert before == after


@pytest.mark.parametrize(
    ("override", "message"),
    [("sam.spatial_overlap=1.5", "spatial_overlap"), ("sam.mask_nms_thr=0", "mask_nms_thr"),
     ("region.time_range=[2024-07-14,2024-06-28]", "time"), ("region.name=../../etc", "safe name")],
)
def test_bad_config_is_refused_while_validating(tmp_path, demo_catalog, override, message):
    with pytest.raises(ConfigError, match=message):
        run_config(tmp_path / "out", demo_catalog, override)


@pytest.mark.parametrize(
    ("override", "message"),
    [("region.geometry='-89.86,41.79,-90.14,41.89'", "is empty or reversed"),  # load_region, first
     ("region.geometry='-100,20,-75,60'", "km², more than"),
     ("output.root={blocked}/out", "which is a file, not a directory")],  # the preflight's path check
)
def test_bad_input_found_by_run_fails_fast_and_writes_nothing(tmp_path, demo_catalog, override, message):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a directory")
    cfg = run_config(tmp_path / "out", demo_catalog, override.format(blocked=blocked))  # valid: run() must find it
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert sorted(tmp_path.iterdir()) == [blocked] and blocked.read_text() == "not a directory"


def _read_like(batch: dict) -> dict:
    """One chip as read_stage returns it (a pickled task, 1024² RGB, the packed valid mask)."""
    task = np.empty(1, object)
    task[0] = b"a pickled ChipTask"
    return {"task": task, "rgb": np.zeros((1, 1024, 1024, 3), np.uint8), "valid_bits": np.zeros((1, 1024 * 128), np.uint8)}


def _read_row_like(batch: dict) -> Iterator[dict]:
    """A chip row of 20 chips as read_stage yields it: one chip at a time."""
    for _ in range(20):
        yield _read_like(batch)


def test_read_blocks_hold_a_bounded_number_of_chips(ray_local):
    """Whatever a chip row holds, the read stage's blocks close at READ_BLOCK_CHIPS chips: here a
    row of 20 chips, yielded as read_stage yields them, comes out as 8 + 8 + 4."""
    from raysam.pipeline import READ_BLOCK_CHIPS, configure_blocks

    configure_blocks(ray.data.DataContext.get_current())
    ds = ray.data.from_items([{"chip_row": 0}]).map_batches(_read_row_like, batch_size=1)
    rows = [meta.num_rows for bundle in ds.iter_internal_ref_bundles() for meta in bundle.metadata]
    assert READ_BLOCK_CHIPS == 8 and rows == [8, 8, 4]


def _chips_read_ahead(tmp_path: Path, name: str, chips: int) -> int:
    """The most chips a read stage had finished and a one-actor consumer (0.15 s a chip) had not
    yet started, over a run of ``chips`` chip-sized rows through real Ray Data."""
    import time

    reads, segmented = tmp_path / f"{name}.reads", tmp_path / f"{name}.sam"

    def stamp(path: Path) -> None:
        with open(path, "a") as f:
            f.write(f"{time.time()}\n")

    def read_like(batch: dict) -> dict:
        stamp(reads)
        return _read_like(batch)

    class SlowSam:
        def __call__(self, batch: dict) -> dict:
            stamp(segmented)
            time.sleep(0.15)
            return {"chip": np.zeros(len(batch["task"]), np.int8)}

    ds = ray.data.from_items([{"chip": i} for i in range(chips)], override_num_blocks=chips)
    ds = ds.map_batches(read_like, batch_size=1, num_cpus=0.25).map_batches(
        SlowSam, batch_size=1, num_cpus=1, compute=ray.data.ActorPoolStrategy(size=1))
    assert sum(len(b["chip"]) for b in ds.iter_batches()) == chips
    read_at = sorted(float(t) for t in reads.read_text().split())
    sam_at = np.sort([float(t) for t in segmented.read_text().split()])
    return max(i + 1 - int(np.searchsorted(sam_at, t, side="right")) for i, t in enumerate(read_at))


def test_reads_run_a_bounded_number_of_chips_ahead_of_sam(ray_local, tmp_path, monkeypatch):
    """With bound_read_ahead (one block per actor here), the reads stay within a block of the SAM
    actor; without it (Ray Data's default budget), they run far ahead (here 4 chips against 27)."""
    from raysam import pipeline

    ctx = ray.data.DataContext.get_current()
    limits_before = ctx.execution_options.resource_limits  # a run in this process bounded them
    pipeline.configure_blocks(ctx)
    chips = 48
    try:
        ctx.execution_options.resource_limits = ray.data.ExecutionResources.for_limits()  # Ray Data's default
        unbounded = _chips_read_ahead(tmp_path, "unbounded", chips)
        monkeypatch.setattr(pipeline, "READ_AHEAD_BLOCKS_PER_ACTOR", 1)
        pipeline.bound_read_ahead(ctx, sam_actors=1)
        bounded = _chips_read_ahead(tmp_path, "bounded", chips)
    finally:
        ctx.execution_options.resource_limits = limits_before
    assert unbounded >= 2 * pipeline.READ_BLOCK_CHIPS, unbounded
    assert bounded <= pipeline.READ_BLOCK_CHIPS, (bounded, unbounded)
