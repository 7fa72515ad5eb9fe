"""The command line as users run it: multirun sweeps, dry runs, --cfg job, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL_AOI = "-90.035,41.815,-89.965,41.865"  # straddles lon -90; one chip per date
ONE_DATE = "region.time_range=[2024-06-28,2024-07-05]"


def raysam(tmp_path: Path, demo_catalog, *args: str, flags: tuple[str, ...] = (), env: dict | None = None
           ) -> subprocess.CompletedProcess:
    """``python -m raysam.run ARGS FLAGS`` on the test's demo catalog, from a scratch cwd."""
    base = [f"stac.demo_root={demo_catalog.root.parent}", f"model.path={demo_catalog.root.parent / 'models' / 'demo'}",
            f"hydra.run.dir={tmp_path / 'hydra'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    return subprocess.run(
        [sys.executable, "-m", "raysam.run", *base, *args, *flags], cwd=tmp_path, capture_output=True, text=True,
        timeout=900, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


@pytest.mark.slow
def test_multirun_two_by_two_writes_four_complete_outputs(tmp_path, demo_catalog):
    out = tmp_path / "out"
    result = raysam(
        tmp_path, demo_catalog, "region=demo", "model=demo", f"region.geometry='{SMALL_AOI}'", ONE_DATE,
        f"output.root={out}", "output.sinks=[segmentation_mask]", "sam.points_per_side=8,16",
        "sam.pred_iou_thresh=0.8,0.88", "sam.points_per_batch=64", flags=("-m",),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(out.glob("demo/*"))
    assert len(runs) == 4, runs
    counts = []
    for run_dir in runs:
        (group,) = [p for p in run_dir.iterdir() if p.is_dir()]  # beside collection.json
        assert (group / "_COMPLETE.json").exists()
        counts.append(len(gpd.read_parquet(group / "masks.parquet")))
    assert len(set(counts)) > 1  # the parameters really reached the generator


def test_dry_run_plans_without_reading_or_writing(tmp_path, demo_catalog):
    out = tmp_path / "out"
    result = raysam(tmp_path, demo_catalog, "region=demo", "model=demo", "dry_run=true", f"output.root={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    groups = [ln for ln in lines if ln.strip().startswith("demo_2024")]
    assert len(groups) == 2 and all("2 item(s)" in ln and "8 chips" in ln and "km²" in ln for ln in groups)
    assert all(ln.endswith(": to do") for ln in groups)  # nothing published or checkpointed yet
    assert "to do: 2 date group(s), 16 chips to segment" in result.stdout
    assert any(ln.startswith("cost: no rate to estimate from") for ln in lines)  # nothing measured yet
    assert lines[-1] == "the run would go in this process, without Ray (ray.in_process_max_chips=64)"
    on_ray = raysam(tmp_path, demo_catalog, "region=demo", "model=demo", "dry_run=true", f"output.root={out}",
                    "ray.in_process_max_chips=15")
    assert on_ray.stdout.splitlines()[-1] == "the run would go on Ray (ray.in_process_max_chips=15)", on_ray.stderr
    assert not out.exists()


def test_cfg_job_shows_config_without_the_key(tmp_path, demo_catalog):
    result = raysam(tmp_path, demo_catalog, "region=iowa", "stac.pc_key=planted-s3cr3t-key", flags=("--cfg", "job"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "points_per_side: 16" in result.stdout and "pc_key:" in result.stdout
    assert "planted-s3cr3t-key" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["region=demo", "model=demo", "sam.spatial_overlap=1.5"], "sam.spatial_overlap=1.5 is out of range"),
        (["region=demo", "model=vit_b", "model.path=does/not/exist"], "export_sam_models.py"),
        (["region=demo", "model=demo", "region.geometry='1,2,3'"], "region"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, demo_catalog, args, message):
    out = tmp_path / "out"
    result = raysam(tmp_path, demo_catalog, *args, f"output.root={out}")
    assert result.returncode == 2
    assert result.stderr.startswith("raysam: error:") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
