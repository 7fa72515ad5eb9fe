"""Every file of a real demo run through the third-party validators, offline.

One small demo run (two dates, one chip each) through the command line, shared by the module.
:func:`files_by_kind` finds what to check wherever it lies, so single files, tiles, parts and
mosaics are all covered as the layout grows: ``*.tif`` (COG and COG tiles), ``*.vrt``,
``*.parquet`` (single files and the parts under ``masks/``), ``masks/`` folders, ``*.json`` STAC.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import geopandas as gpd
import numpy as np
import pystac
import pytest
import rasterio

from tests.sinks.validators import (cogeo_validate, duckdb_connection, fiboa_validate, geoparquet_validate,
                                    stac_validate)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SMALL_AOI = "-90.035,41.815,-89.965,41.865"  # straddles lon -90 (two UTM zones); one chip per date


@pytest.fixture(scope="module")
def collection_dir(tmp_path_factory, demo_catalog) -> Path:
    """The collection directory (``<root>/demo/<run key>``) of one demo run, all sinks on."""
    tmp = tmp_path_factory.mktemp("validate")
    args = [f"stac.demo_root={demo_catalog.root.parent}", f"model.path={demo_catalog.root.parent / 'models' / 'demo'}",
            f"hydra.run.dir={tmp / 'hydra'}", "region=demo", "model=demo", f"region.geometry='{SMALL_AOI}'",
            f"output.root={tmp / 'out'}", "sam.points_per_side=8", "sam.points_per_batch=64", "ray.read_cpus=0.5"]
    result = subprocess.run([sys.executable, "-m", "raysam.run", *args], cwd=tmp, capture_output=True, text=True,
                            timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = [p for p in (tmp / "out" / "demo").iterdir() if p.is_dir()]
    (tmp / "console.txt").write_text(result.stdout + result.stderr)  # what the user saw
    return run_dir


def test_a_run_outside_a_terminal_prints_a_few_lines_and_the_summary(collection_dir):
    """Progress and per-group summaries, no Ray chatter, no GDAL noise: a few lines, not hundreds."""
    lines = (collection_dir.parents[2] / "console.txt").read_text().splitlines()
    assert len(lines) <= 24, "\n".join(lines)
    assert sum(ln.startswith("raysam: published demo_2024") for ln in lines) == 2
    assert sum(ln.startswith("raysam: 2 date group(s) written, 0 already complete;") for ln in lines) == 1
    assert not [ln for ln in lines if "INFO" in ln or "ZSTD_LEVEL" in ln or "Traceback" in ln]


def files_by_kind(collection_dir: Path) -> dict[str, list[Path]]:
    """What each validator checks under a collection directory (published groups only)."""
    groups = sorted(p.parent for p in collection_dir.glob("*/_COMPLETE.json"))
    under = [p for g in groups for p in sorted(g.rglob("*")) if p.is_file()]
    return {
        "groups": groups,
        "cog": [p for p in under if p.suffix == ".tif"],
        "vrt": [p for p in under if p.suffix == ".vrt"],
        "geoparquet": [p for p in under if p.suffix == ".parquet"],
        "parquet_folders": [p for g in groups for p in [g / "masks"] if p.is_dir()],
        "stac": [collection_dir / "collection.json", *(g / "item.json" for g in groups)],
    }


def _failures(check, paths) -> list[str]:
    results = {p: check(p) for p in paths}
    return [f"{p}:\n{report}" for p, (ok, report) in results.items() if not ok]


def test_the_run_published_two_groups_with_every_kind_of_output(collection_dir):
    files = files_by_kind(collection_dir)
    assert len(files["groups"]) == 2
    assert {p.name for p in files["cog"]} >= {"labels.tif", "B04.tif", "B03.tif", "B02.tif"}
    assert {p.name for p in files["geoparquet"]} >= {"masks.parquet"} and files["parquet_folders"] and files["vrt"]


def test_every_raster_is_a_strict_cog_with_band_descriptions(collection_dir):
    files = files_by_kind(collection_dir)
    assert not _failures(cogeo_validate, files["cog"]), _failures(cogeo_validate, files["cog"])
    for path in files["cog"] + files["vrt"]:
        with rasterio.open(path) as src:
            assert all(src.descriptions), f"{path}: a band without a description"


def test_every_geoparquet_file_and_folder_passes_fiboa_and_geoparquet_validator(collection_dir):
    files = files_by_kind(collection_dir)
    ok, report = fiboa_validate(*files["geoparquet"])
    assert ok and report.count(": VALID") == len(files["geoparquet"]), report
    failures = _failures(geoparquet_validate, files["geoparquet"] + files["parquet_folders"])
    assert not failures, failures


def test_stac_collection_and_items_validate_and_their_assets_exist(collection_dir):
    files = files_by_kind(collection_dir)
    failures = _failures(stac_validate, files["stac"])
    assert not failures, failures
    collection = pystac.read_file(collection_dir / "collection.json")
    items = list(collection.get_items())
    assert sorted(i.id for i in items) == sorted(g.name for g in files["groups"])
    for item in items:
        assert {"labels", "polygons", "B04", "quicklook", "manifest", "labels_style"} <= set(item.assets)
        for key, asset in item.assets.items():
            assert Path(asset.get_absolute_href()).exists(), f"{item.id}/{key}: {asset.href} is missing"
        with rasterio.open(item.assets["labels"].get_absolute_href()) as src:
            labels = item.assets["labels"].to_dict()
            assert labels["proj:code"] == f"EPSG:{src.crs.to_epsg()}" and labels["proj:shape"] == [src.height,
                                                                                                  src.width]
            assert labels["proj:transform"] == list(src.transform)[:6]
        assert item.properties["processing:expression"]["expression"]["amg"]["points_per_side"] == 8
        manifest = json.loads(Path(item.assets["manifest"].get_absolute_href()).read_text())
        assert item.properties["raysam:source_items"] == manifest["date_group"]["items"]


def test_duckdb_reads_every_geoparquet_file_with_the_spatial_extension_loaded_by_path(collection_dir):
    files = files_by_kind(collection_dir)
    con = duckdb_connection()
    for path in files["geoparquet"]:
        columns = dict(con.sql(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM '{path}')").fetchall())
        assert columns["geometry"] == "GEOMETRY('EPSG:4326')" and columns["label_id"] == "UINTEGER"
        n, valid, min_id, max_id = con.sql(
            f"SELECT count(*), count_if(ST_IsValid(geometry)), min(label_id), max(label_id) FROM '{path}'").fetchone()
        assert n == valid == max_id == len(gpd.read_parquet(path)) and min_id == 1


def test_labels_style_colours_every_id_in_the_raster(collection_dir):
    for group in files_by_kind(collection_dir)["groups"]:
        with rasterio.open(group / "labels.tif") as src:
            ids = set(np.unique(src.read(1)).tolist()) - {0}
        palette = ET.parse(group / "labels.qml").getroot().findall("pipe/rasterrenderer/colorPalette/paletteEntry")
        assert ids and ids <= {int(e.get("value")) for e in palette}


def test_quicklook_is_georeferenced_over_the_labels(collection_dir):
    for group in files_by_kind(collection_dir)["groups"]:
        with rasterio.open(group / "labels.tif") as labels, rasterio.open(group / "quicklook.png") as quicklook:
            assert quicklook.crs == labels.crs and quicklook.count == 3
            assert quicklook.bounds == pytest.approx(labels.bounds, abs=1e-6)
