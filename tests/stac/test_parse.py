"""parse_item on committed Planetary Computer and earth-search items, and dedupe_reprocessed."""

import copy
import json
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from raysam.errors import DataError
from raysam.stac import dedupe_reprocessed, parse_item

ITEMS = Path(__file__).parents[1] / "data" / "items"
PC = json.loads((ITEMS / "pc_S2A_MSIL2A_20240706T165901_R069_T15TYG.json").read_text())
ES = json.loads((ITEMS / "earth_search_S2B_15TYG_20240709_0_L2A.json").read_text())


def _reflectance(band, dn):
    return (dn + band.offset_dn) * band.scale


@pytest.mark.parametrize("raw, keys", [(PC, ("B04", "B03", "B02")), (ES, ("red", "green", "blue"))])
def test_rgb_resolved_with_offset_applied_once(raw, keys):
    item = parse_item(raw)
    for band, key in zip(("B04", "B03", "B02"), keys):
        asset = item.bands[band]
        assert asset.key == key and asset.href == raw["assets"][key]["href"]
        assert _reflectance(asset, 2500) == pytest.approx(0.15)  # DN 2500 at baseline 05.10: (2500-1000)/1e4
        assert asset.gsd_m == 10
    assert item.bands["SCL"].scale == 1.0 and item.bands["SCL"].offset_dn == 0.0
    assert "visual" not in {a.key for a in item.bands.values()} and "red-jp2" not in {a.key for a in item.bands.values()}
    assert item.epsg == 32615 and item.tile_id == "15TYG" and item.processing_baseline == "05.10"


def test_fields_of_each_layout():
    pc, es = parse_item(PC), parse_item(ES)
    assert pc.datetime_utc == datetime(2024, 7, 6, 16, 59, 1, 24000, tzinfo=timezone.utc)
    assert (pc.cloud_cover, pc.relative_orbit, pc.collection) == (3.21, 69, "sentinel-2-l2a")
    assert pc.processed_utc == datetime(2024, 7, 7, 1, 23, 45, tzinfo=timezone.utc)
    assert es.bands["B08"].key == "nir" and es.relative_orbit is None
    assert pc.bbox_wgs84 == tuple(PC["bbox"])


def test_old_baseline_has_no_offset_and_declared_offset_wins():
    old = copy.deepcopy(PC)
    old["properties"]["s2:processing_baseline"] = "03.01"
    assert parse_item(old).bands["B04"].offset_dn == 0.0
    declared_zero = copy.deepcopy(ES)
    declared_zero["assets"]["red"]["raster:bands"][0]["offset"] = 0
    assert parse_item(declared_zero).bands["B04"].offset_dn == 0.0
    no_baseline = copy.deepcopy(PC)
    del no_baseline["properties"]["s2:processing_baseline"]
    assert parse_item(no_baseline).bands["B04"].offset_dn == -1000.0  # sensed after 2022-01-25


def test_band_resolved_by_eo_bands_name_not_key():
    renamed = copy.deepcopy(PC)
    renamed["assets"]["rouge"] = renamed["assets"].pop("B04")
    assert parse_item(renamed).bands["B04"].key == "rouge"


def test_tile_from_id_when_no_tile_field():
    raw = copy.deepcopy(PC)
    del raw["properties"]["s2:mgrs_tile"]
    assert parse_item(raw).tile_id == "15TYG"


def _without(raw, *path):
    raw = copy.deepcopy(raw)
    target = raw
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return raw


def test_missing_proj_message():
    raw = _without(ES, "properties", "proj:code")
    with pytest.raises(DataError) as err:
        parse_item(raw)
    assert str(err.value) == ("STAC item S2B_15TYG_20240709_0_L2A has no proj:epsg or proj:code (on the item or its assets): "
                              "the catalog must provide it (is this a Sentinel-2 L2A item?)")


def test_missing_assets_message():
    with pytest.raises(DataError) as err:
        parse_item(_without(PC, "assets"))
    assert str(err.value).startswith(f"STAC item {PC['id']} has no asset for band(s) B04, B03, B02 in 'assets'")
    with pytest.raises(DataError, match=r"has no asset for band\(s\) B03 in 'assets'"):
        parse_item(_without(PC, "assets", "B03"))


def test_missing_datetime_and_geometry_messages():
    with pytest.raises(DataError, match=rf"^STAC item {PC['id']} has no properties.datetime: "):
        parse_item(_without(PC, "properties", "datetime"))
    with pytest.raises(DataError, match=rf"^STAC item {PC['id']} has no geometry: "):
        parse_item(_without(PC, "geometry"))


def test_dedupe_keeps_newest_baseline_then_newest_processing(demo_catalog):
    raw = [json.loads(line) for line in demo_catalog.items_ndjson.read_text().splitlines()]
    items = [parse_item(r) for r in raw]
    kept = dedupe_reprocessed(items)
    assert len(kept) == 4 and demo_catalog.duplicate_item_id not in {i.id for i in kept}
    original = next(i for i in items if i.id != demo_catalog.duplicate_item_id)
    newer = replace(original, id="z-reprocessed", processed_utc=datetime(2025, 1, 1, tzinfo=timezone.utc))
    assert newer in dedupe_reprocessed([original, newer]) and original not in dedupe_reprocessed([newer, original])
