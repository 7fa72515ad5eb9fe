"""The STAC Item per date group and the Collection over them: valid (stac-validator, offline),
readable by pystac, relative, and only ever listing published groups."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import pystac
import pytest
import shapely

from raysam.sinks.stac_output import (
    LABEL_BAND, Band, PolygonOutput, Processing, PublishedGroup, QuicklookOutput, RasterOutput, SourceItem,
    group_item, group_item_json, update_collection)
from raysam.sinks import stac_output
from raysam.storage.locks import claim, lock_owner, release
from raysam.storage.root import MARKER, OutputRoot
from tests.sinks.validators import stac_validate

GRID = (10.0, 0.0, 240_000.0, 0.0, -10.0, 4_640_000.0)
PROCESSING = Processing("SAM demo model", {"raysam": "0.1.0", "gdal": "3.10.3"},
                        {"amg": {"points_per_side": 16}, "merge": {"mask_nms_thr": 0.5}},
                        datetime(2024, 8, 1, 12, tzinfo=UTC))


def _group(group_id: str, day: int, **outputs) -> PublishedGroup:
    defaults = dict(
        labels=RasterOutput("labels", LABEL_BAND, cog=True, mosaic=True, style=True),
        polygons=PolygonOutput(single_file=True, parts=True, count=42),
        s2_bands=(RasterOutput("s2/B04", Band("B04", "B04 red", "uint16", 0, 1e-4, -0.1)),),
        quicklook=QuicklookOutput((280, 295), (20.0, 0.0, 240_000.0, 0.0, -20.0, 4_640_000.0)),
        sources=(SourceItem("S2A_16TCM_A", "sentinel-2-l2a",
                            "https://stac.example/collections/sentinel-2-l2a/items/S2A_16TCM_A"),
                 SourceItem("S2A_15TYG_A", "sentinel-2-l2a")),
    )
    return PublishedGroup(group_id, datetime(2024, 7, day, 17, tzinfo=UTC), shapely.box(-90.03, 41.81, -89.96, 41.86),
                          32616, (560, 590), GRID, PROCESSING, **{**defaults, **outputs})


def _publish(collection_dir: Path, group: PublishedGroup, marker: bool = True) -> Path:
    group_dir = collection_dir / group.id
    group_dir.mkdir(parents=True)
    _write_item(group, group_dir)
    if marker:
        (group_dir / MARKER).write_text("{}")
    return group_dir


def _write_item(group: PublishedGroup, group_dir: Path) -> Path:
    path = group_dir / "item.json"
    path.write_text(group_item_json(group, "raysam-demo"))
    return path


def _update(collection_dir: Path):
    return update_collection(OutputRoot.open(str(collection_dir)), str(collection_dir), collection_id="raysam-demo",
                             title="raysam demo", description="Masks of the demo region.")


def test_item_has_the_assets_projection_raster_and_processing_fields():
    item = group_item(_group("demo_20240701", 1), "raysam-demo")
    assert set(item.assets) == {"labels", "labels_mosaic", "labels_style", "polygons", "polygon_parts", "B04",
                                "quicklook", "manifest"}
    labels = item.assets["labels"].to_dict()
    assert labels["href"] == "./labels.tif" and labels["type"] == pystac.MediaType.COG and labels["roles"] == ["data"]
    assert (labels["proj:code"], labels["proj:shape"], labels["proj:transform"]) == ("EPSG:32616", [560, 590], list(GRID))
    assert labels["raster:bands"] == [{"nodata": 0, "data_type": "uint32", "spatial_resolution": 10.0}]
    assert item.assets["labels_mosaic"].href == "./labels.vrt"
    b04 = item.assets["B04"].to_dict()
    assert b04["href"] == "./s2/B04.tif" and b04["raster:bands"][0] | {} == {
        "nodata": 0, "data_type": "uint16", "scale": 1e-4, "offset": -0.1, "spatial_resolution": 10.0}
    assert item.assets["polygon_parts"].href == "./masks/"
    assert item.assets["polygons"].media_type == "application/vnd.apache.parquet"
    assert item.assets["quicklook"].to_dict()["proj:shape"] == [280, 295]
    props = item.properties
    assert props["processing:expression"]["expression"]["amg"] == {"points_per_side": 16}
    assert props["processing:software"]["raysam"] == "0.1.0"
    assert props["raysam:source_items"] == ["S2A_16TCM_A", "S2A_15TYG_A"]
    derived = [link.target for link in item.links if link.rel == "derived_from"]
    assert derived == ["https://stac.example/collections/sentinel-2-l2a/items/S2A_16TCM_A"]  # only where known


def test_only_what_was_written_becomes_an_asset():
    item = group_item(_group("g", 1, labels=RasterOutput("labels", LABEL_BAND, cog=False, mosaic=True),
                             polygons=PolygonOutput(single_file=False, parts=True), s2_bands=(), quicklook=None),
                      "raysam-demo")
    assert set(item.assets) == {"labels", "polygon_parts", "manifest"}
    assert item.assets["labels"].href == "./labels.vrt"  # a big group: the mosaic is the labels


def test_collection_and_items_validate_offline_and_read_back_with_pystac(tmp_path):
    root = tmp_path / "demo" / "demo-abc"
    for day in (1, 14):
        _publish(root, _group(f"demo_202407{day:02d}", day))
    collection = _update(root)
    assert collection is not None
    for path in [root / "collection.json", *sorted(root.glob("*/item.json"))]:
        ok, report = stac_validate(path)
        assert ok, report
    read = pystac.read_file(root / "collection.json")
    assert isinstance(read, pystac.Collection) and read.id == "raysam-demo"
    items = sorted(read.get_items(), key=lambda i: i.id)
    assert [i.id for i in items] == ["demo_20240701", "demo_20240714"]
    assert items[0].assets["labels"].get_absolute_href() == str(root / "demo_20240701" / "labels.tif")
    assert read.extent.temporal.intervals == [[datetime(2024, 7, 1, 17, tzinfo=UTC),
                                               datetime(2024, 7, 14, 17, tzinfo=UTC)]]
    # Every href is relative: the tree moves as a whole.
    moved = tmp_path / "moved"
    shutil.move(root, moved)
    item = next(pystac.read_file(moved / "collection.json").get_items())
    assert item.assets["B04"].get_absolute_href().startswith(str(moved))


def test_stac_validator_rejects_a_broken_item(tmp_path):
    path = _write_item(_group("g", 1), tmp_path)
    item = json.loads(path.read_text())
    item["assets"]["labels"]["proj:shape"] = ["560", 590]
    path.write_text(json.dumps(item))
    ok, report = stac_validate(path)
    assert not ok and "proj:shape" in report, report


def test_stac_validation_is_offline_it_fails_without_the_local_schemas(tmp_path):
    """Without the schema map stac-validator reaches for the network: the guard blocks it and fails the run."""
    path = _write_item(_group("g", 1), tmp_path)
    ok, report = stac_validate(path, schema_map={})
    assert not ok and "exit 3" in report and "network access attempted" in report, report


def test_collection_lists_only_published_groups_and_updates_idempotently(tmp_path):
    root = tmp_path / "run"
    assert _update(root) is None and not (root / "collection.json").exists()  # nothing published: nothing written
    assert list(root.iterdir()) == []  # nor is a lock left
    _publish(root, _group("demo_20240701", 1))
    _publish(root, _group("demo_20240714", 14), marker=False)  # being written (or crashed)
    (root / ".demo_20240728.staging-x").mkdir()
    _update(root)
    first = (root / "collection.json").read_text()
    assert [link["href"] for link in json.loads(first)["links"] if link["rel"] == "item"] == ["./demo_20240701/item.json"]
    _update(root)
    assert (root / "collection.json").read_text() == first  # idempotent
    (root / "demo_20240714" / MARKER).write_text("{}")  # that group publishes
    _update(root)
    hrefs = [link["href"] for link in json.loads((root / "collection.json").read_text())["links"]
             if link["rel"] == "item"]
    assert hrefs == ["./demo_20240701/item.json", "./demo_20240714/item.json"]
    assert not list(root.glob("*.tmp-*"))


def test_a_rewrite_removes_what_a_killed_rewrite_left_and_takes_over_its_lock(tmp_path):
    root = tmp_path / "run"
    _publish(root, _group("demo_20240701", 1))
    (root / ".collection.json.tmp-0123456789ab").write_text("{\"half\": ")  # killed between write and rename
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = lock_owner("dead-run") | {"pid": int(dead.stdout)}  # that pid is gone now
    (root / ".collection.json.lock").write_text(json.dumps(owner))
    assert _update(root) is not None
    assert sorted(p.name for p in root.iterdir()) == ["collection.json", "demo_20240701"]


def test_a_rewrite_waits_for_another_runs_and_gives_up_after_the_wait(tmp_path, monkeypatch, caplog):
    root = tmp_path / "run"
    _publish(root, _group("demo_20240701", 1))
    out = OutputRoot.open(str(root))
    held = claim(out, "collection", str(root / "collection.json"))  # a live run (this one) rewriting it
    release_later = threading.Timer(0.5, release, (out, held))
    release_later.start()
    assert _update(root) is not None  # waited for it
    assert not (root / ".collection.json.lock").exists()
    monkeypatch.setattr(stac_output, "COLLECTION_LOCK_WAIT_S", 0.3)
    (root / "collection.json").unlink()
    held = claim(out, "collection", str(root / "collection.json"))
    assert _update(root) is None and not (root / "collection.json").exists()
    assert "not rewritten: another run held its lock" in caplog.text
    release(out, held)


@pytest.mark.parametrize("rel", ["collection", "parent", "root"])
def test_item_points_to_its_collection_relatively(rel):
    item = group_item(_group("g", 1), "raysam-demo")
    assert [link.target for link in item.links if link.rel == rel] == ["../collection.json"]
