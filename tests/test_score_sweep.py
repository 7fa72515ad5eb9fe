"""The recall/cost sweep as users run it: a Hydra multirun, then scripts/score_sweep.py's table.

The table's numbers are checked against ground truth computed here with geopandas from the
catalog's fields and each date group's polygons, and against the known prompt counts of a grid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely

REPO = Path(__file__).resolve().parents[1]
SMALL_AOI = (-90.035, 41.815, -89.965, 41.865)  # straddles lon -90; one chip per date
CLEAR_DATE = "2024-07-01"
COVERAGE_MAX_POINTS = 150  # conf/sam/default.yaml

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, demo_catalog) -> tuple[Path, list[dict]]:
    """A 2x2 multirun (points per side x prompt mode) on the small AOI; (output root, table rows)."""
    tmp = tmp_path_factory.mktemp("sweep")
    out = tmp / "out"
    result = _run([
        "-m", "raysam.run", "-m", "region=demo", "model=demo", "region.geometry='" + ",".join(map(str, SMALL_AOI)) + "'",
        f"stac.demo_root={demo_catalog.root.parent}", f"model.path={demo_catalog.root.parent / 'models' / 'demo'}",
        f"hydra.sweep.dir={tmp / 'hydra'}", f"output.root={out}", "output.sinks=[segmentation_mask]",
        "sam.points_per_batch=64", "sam.points_per_side=8,16", "sam.prompts=grid,coverage",
    ], tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    table = _run([str(REPO / "scripts" / "score_sweep.py"), str(out), "--catalog", str(demo_catalog.root)], tmp)
    assert table.returncode == 0, table.stderr[-3000:]
    return out, _parse(table.stdout)


def _parse(stdout: str) -> list[dict]:
    """The printed Markdown table as one dict per row (header cells as keys)."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")), strict=True)) for ln in lines[2:]]


def _truth(group_dir: Path, fields: gpd.GeoDataFrame) -> tuple[list[float], int]:
    """(best IoU of each field inside the AOI, fields matched by >= 2 masks) for one date group."""
    masks = gpd.read_parquet(group_dir / "masks.parquet")
    crs = json.loads((group_dir / "manifest.json").read_text())["date_group"]["grid"]["crs"]
    inside = fields[fields.within(shapely.box(*SMALL_AOI))].to_crs(crs)
    masks = masks.to_crs(crs)
    best, dups = [], 0
    for geom in inside.geometry:
        inter = masks.geometry.intersection(geom).area
        iou = (inter / (masks.geometry.area + geom.area - inter)).to_numpy()
        best.append(float(iou.max()) if len(iou) else 0.0)
        dups += int((iou >= 0.5).sum() > 1)
    return best, dups


def test_sweep_table_matches_ground_truth(sweep, demo_catalog):
    out, rows = sweep
    assert [(r["points_per_side"], r["prompts"]) for r in rows] == [
        ("8", "coverage"), ("8", "grid"), ("16", "coverage"), ("16", "grid")]
    fields = gpd.read_parquet(demo_catalog.fields_path)
    runs: dict[tuple[str, str], list[Path]] = {}
    for marker in out.glob("**/_COMPLETE.json"):
        amg = json.loads((marker.parent / "manifest.json").read_text())["config"]["amg"]
        runs.setdefault((str(amg["points_per_side"]), amg["prompts"]), []).append(marker.parent)
    found = {}
    for row in rows:
        groups = runs[(row["points_per_side"], row["prompts"])]
        assert len(groups) == 2  # both dates
        truth = {json.loads((g / "manifest.json").read_text())["date_group"]["date"][:10]: _truth(g, fields)
                 for g in groups}
        clear = np.asarray(truth[CLEAR_DATE][0])
        everywhere = np.concatenate([np.asarray(best) for best, _ in truth.values()])
        assert row[f"found, clear date ({CLEAR_DATE})"] == (
            f"{100 * (clear >= 0.5).mean():.1f} % ({(clear >= 0.5).sum()}/{len(clear)})")
        assert row["found, all dates"] == (
            f"{100 * (everywhere >= 0.5).mean():.1f} % ({(everywhere >= 0.5).sum()}/{len(everywhere)})")
        assert row["median IoU"] == f"{np.median(everywhere[everywhere >= 0.5]):.3f}"
        assert row["duplicates"] == str(sum(d for _, d in truth.values()))
        assert float(row["chips/s"]) > 0
        found[(row["points_per_side"], row["prompts"])] = (clear >= 0.5).sum()
        # One chip per date: a grid decodes exactly its points; coverage adds at most its budget.
        grid_points = int(row["points_per_side"]) ** 2
        prompts = float(row["decoder prompts / chip"])
        if row["prompts"] == "grid":
            assert prompts == grid_points
        else:
            assert grid_points < prompts <= grid_points + COVERAGE_MAX_POINTS
    assert len(clear) >= 20  # the small AOI holds enough fields for the numbers to mean something
    for side in ("8", "16"):
        assert found[(side, "coverage")] > found[(side, "grid")]
