"""Backfills of different time ranges share one collection and each other's finished date groups.

A date group is keyed by what determines its outputs (items, grid, AOI, model, parameters,
sinks), never by the run's time range: the demo's two dates (2024-07-01, 2024-07-11) written
as two "monthly" runs, then as one season run over the same region, land in one collection
directory, and whichever comes second skips what the first finished, in both orders.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from raysam.plan import describe
from raysam.run import run
from tests.reliability.conftest import demo_config

pytestmark = pytest.mark.slow

SMALL_AOI = "-90.035,41.815,-89.965,41.865"  # one chip per date
FIRST_HALF = "region.time_range=[2024-06-28,2024-07-05]"  # holds 2024-07-01
SECOND_HALF = "region.time_range=[2024-07-06,2024-07-14]"  # holds 2024-07-11
SEASON = "region.time_range=[2024-06-28,2024-07-14]"
OVERRIDES = (f"region.geometry='{SMALL_AOI}'", "sam.points_per_side=4", "output.sinks=[segmentation_mask]")


def _run(demo_catalog, root: Path, time_range: str) -> dict:
    return run(demo_config(demo_catalog, root, *OVERRIDES, time_range))


def _published(root: Path) -> dict[str, bytes]:
    """Every published file (path -> bytes) and the collection directories holding them."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "_hydra" not in p.parts}


def _collections(root: Path) -> list[str]:
    return sorted({p.parent.parent.name for p in root.glob("demo/*/*/_COMPLETE.json")})


def test_a_season_run_skips_the_groups_a_monthly_run_finished(demo_catalog, ray_local, tmp_path):
    first = _run(demo_catalog, tmp_path, FIRST_HALF)
    assert first["groups_done"] == 1 and first["groups_skipped"] == 0
    month_files = _published(tmp_path)

    cfg = demo_config(demo_catalog, tmp_path, *OVERRIDES, SEASON, "dry_run=true")
    from raysam.driver import prepare

    report = describe(prepare(cfg).plan)
    assert "demo_20240701" in report and "complete (published)" in report
    assert "to do: 1 date group(s)" in report

    season = _run(demo_catalog, tmp_path, SEASON)
    assert season["groups_skipped"] == 1 and season["groups_done"] == 1  # only the new date is written
    after = _published(tmp_path)
    assert _collections(tmp_path) and len(_collections(tmp_path)) == 1
    assert [p for p in after if p.endswith("_COMPLETE.json")] and len(
        [p for p in after if p.endswith("_COMPLETE.json")]) == 2
    # the monthly run's group is untouched (the collection's STAC file is rewritten as groups join)
    assert {k: v for k, v in month_files.items() if "demo_20240701" in k} == \
           {k: v for k, v in after.items() if "demo_20240701" in k}

    second = _run(demo_catalog, tmp_path, SECOND_HALF)
    assert second["groups_skipped"] == 1 and second["groups_done"] == 0  # the season run finished it


def test_monthly_runs_skip_what_a_season_run_finished(demo_catalog, ray_local, tmp_path):
    season = _run(demo_catalog, tmp_path, SEASON)
    assert season["groups_done"] == 2
    before = _published(tmp_path)
    for half in (FIRST_HALF, SECOND_HALF):
        metrics = _run(demo_catalog, tmp_path, half)
        assert metrics["groups_done"] == 0 and metrics["groups_skipped"] == 1, half
    assert _published(tmp_path) == before
    assert len(_collections(tmp_path)) == 1
