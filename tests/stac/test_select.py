"""select_per_date on the demo catalog's items: coverage in metres, skips with one reason each."""

import json
import logging
from datetime import date

import pytest
import shapely
from shapely.geometry import box

from raysam.errors import ConfigError, DataError
from raysam.selection import select_per_date
from raysam.stac import dedupe_reprocessed, parse_item


@pytest.fixture(scope="module")
def items(demo_catalog):
    raw = [json.loads(line) for line in demo_catalog.items_ndjson.read_text().splitlines()]
    return dedupe_reprocessed(parse_item(r) for r in raw)


def _skips(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "raysam.selection" and r.getMessage().startswith("skipping")]


def test_both_tiles_per_date(items, demo_catalog):
    selections = select_per_date(items, box(*demo_catalog.aoi_wgs84))
    assert [s.date.isoformat() for s in selections] == list(demo_catalog.dates)
    for s in selections:
        assert sorted(i.tile_id for i in s.items) == ["15TYG", "16TBM"]
        assert s.aoi_cover == pytest.approx(1.0) and s.relative_orbits == (69,)


def test_one_tile_enough_inside_one_zone(items):
    east = box(-89.94, 41.80, -89.85, 41.86)  # inside 16TBM only
    assert [[i.tile_id for i in s.items] for s in select_per_date(items, east)] == [["16TBM"], ["16TBM"]]


def test_cloudy_date_skipped_with_one_reason(items, demo_catalog, caplog):
    caplog.set_level(logging.INFO, logger="raysam.selection")
    selections = select_per_date(items, box(*demo_catalog.aoi_wgs84), max_cloud_cover=1.0)
    assert [s.date.isoformat() for s in selections] == ["2024-07-01"]
    skips = _skips(caplog)
    assert len(skips) == 1 and skips[0].startswith(f"skipping date {demo_catalog.cloudy_date}: its cloud cover ")
    assert skips[0].endswith("exceeds max_cloud_cover 1.0%")


def test_short_cover_skipped(items, demo_catalog, caplog):
    caplog.set_level(logging.INFO, logger="raysam.selection")
    partial = [i for i in items if not (i.tile_id == "16TBM" and i.datetime_utc.date() == date(2024, 7, 1))]
    aoi = box(*demo_catalog.aoi_wgs84)
    selections = select_per_date(partial, aoi)
    assert [s.date.isoformat() for s in selections] == ["2024-07-11"]
    [skip] = _skips(caplog)
    west_share = next(i for i in items if i.tile_id == "15TYG")  # the 15TYG share of the AOI, in metres
    assert skip.startswith("skipping date 2024-07-01: its tiles cover ") and "below min_tile_cover 95.0%" in skip
    share = float(skip.split("cover ")[1].split("%")[0]) / 100
    lon_share = (shapely.from_wkb(west_share.footprint_wkb).bounds[2] - aoi.bounds[0]) / (aoi.bounds[2] - aoi.bounds[0])
    assert share == pytest.approx(lon_share, abs=0.02)


def test_too_many_tiles_skipped_then_nothing_left(items, demo_catalog, caplog):
    caplog.set_level(logging.INFO, logger="raysam.selection")
    with pytest.raises(DataError, match=r"^none of the 2 acquisition dates covers the region well enough"):
        select_per_date(items, box(*demo_catalog.aoi_wgs84), max_tiles_per_date=1)
    assert all("needs 2 tiles, more than max_tiles_per_date 1" in s for s in _skips(caplog)) and len(_skips(caplog)) == 2


def test_bad_parameters(items):
    with pytest.raises(ConfigError, match=r"min_tile_cover=1.5 must be in \(0, 1\]"):
        select_per_date(items, box(0, 0, 1, 1), min_tile_cover=1.5)
