"""The dry run's cost estimate: per date group wall and GPU time from a measured rate.

The fast tests plant manifests (the fields a finished group's manifest.json holds) under the
run key a dry run of the demo region plans, and check the estimate against numbers worked out by
hand. The slow one measures a real run, then checks that a dry run of a longer time range
estimates from that run's manifest with the rate it recorded.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from raysam.config import RayConfig
from raysam.driver import prepare
from raysam.estimate import duration
from raysam.hydra_config import to_run_config
from raysam.run import CONF_DIR

REPO = Path(__file__).resolve().parents[1]


def _dry_run_config(demo_catalog, out: Path, *overrides: str):
    base = ["region=demo", "model=demo", f"stac.demo_root={demo_catalog.root.parent}",
            f"model.path={demo_catalog.root.parent / 'models' / 'demo'}", f"output.root={out}", "dry_run=true"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_run_config(compose("config", overrides=[*base, *overrides]))


def _plant(collection_dir: str, group: str, finished_at: str, chips: int, chips_per_s: float, sam_s: float,
           sam_actors: int = 1) -> Path:
    path = Path(collection_dir) / group / "manifest.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({
        "config": {"ray": {"sam_actors": sam_actors}, "device": "cpu"}, "finished_at": finished_at,
        "counts": {"chips_segmented": chips, "chips_per_s": chips_per_s, "stage_cpu_s": {"read": 3.0, "sam": sam_s}},
    }))
    return path


def test_without_a_finished_group_the_dry_run_says_it_has_no_rate(demo_catalog, tmp_path):
    cfg = _dry_run_config(demo_catalog, tmp_path / "out")
    lines = prepare(cfg).describe(cfg.ray).splitlines()
    assert lines[-1].startswith("cost: no rate to estimate from: no date group of run demo-")
    assert not (tmp_path / "out").exists()


def test_the_estimate_uses_the_latest_manifest_of_the_run_key(demo_catalog, tmp_path):
    cfg = _dry_run_config(demo_catalog, tmp_path / "out")
    collection = prepare(cfg).plan.collection_dir
    _plant(collection, "demo_20240501", "2024-05-02T00:00:00+00:00", chips=4, chips_per_s=0.1, sam_s=40.0)
    latest = _plant(collection, "demo_20240601", "2024-06-02T00:00:00+00:00", chips=10, chips_per_s=0.5, sam_s=20.0)
    lines = prepare(cfg).describe(cfg.ray).splitlines()
    # two groups of 8 chips; 0.5 chips/s: 16 s each; 20 s / 10 chips = 2 s of SAM per chip: 16 s each
    assert "cost estimate: about 32 s wall and 32 s SAM time on CPUs in all" in lines
    assert "  demo_20240701: 8 chips, about 16 s wall, 16 s SAM time on CPUs" in lines
    assert "  demo_20240711: 8 chips, about 16 s wall, 16 s SAM time on CPUs" in lines
    assert lines[-1] == (f"  based on {latest} (finished 2024-06-02T00:00:00+00:00): 10 chips at 0.5 chips/s with "
                         "1 SAM actor(s), 2 s of SAM per chip, device=cpu")


def test_gpus_count_as_gpu_time_and_more_actors_shorten_the_wall_time(demo_catalog, tmp_path):
    cfg = _dry_run_config(demo_catalog, tmp_path / "out")
    prepared = prepare(cfg)
    _plant(prepared.plan.collection_dir, "demo_20240601", "2024-06-02T00:00:00+00:00", chips=10, chips_per_s=0.5,
           sam_s=20.0)
    # as the cluster run would ask for (this machine cannot host it, so it is not planned with it)
    lines = prepare(cfg).describe(RayConfig(sam_actors=2, gpus_per_actor=0.5)).splitlines()
    # 8 chips at 0.5 chips/s measured with 1 actor, scaled to 2: 8 s; 8 chips x 2 s x 0.5 GPU: 8 GPU-seconds
    assert "  demo_20240701: 8 chips, about 8.0 s wall, 8.0 s GPU time" in lines
    assert "(wall times scaled to this run's ray.sam_actors=2)" in lines[-1]


@pytest.mark.slow
def test_a_real_run_gives_the_rate_the_next_dry_run_estimates_from(demo_catalog, tmp_path):
    out = tmp_path / "out"
    base = [sys.executable, "-m", "raysam.run", "region=demo", "model=demo", f"stac.demo_root={demo_catalog.root.parent}",
            f"model.path={demo_catalog.root.parent / 'models' / 'demo'}", f"output.root={out}",
            "region.geometry='-90.035,41.815,-89.965,41.865'", "sam.points_per_side=2",
            "output.sinks=[segmentation_mask]", f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(REPO)}
    first = subprocess.run([*base, "region.time_range=[2024-06-28,2024-07-05]"], capture_output=True, text=True,
                           timeout=600, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (manifest_path,) = out.rglob("manifest.json")
    counts = json.loads(manifest_path.read_text())["counts"]
    dry = subprocess.run([*base, "dry_run=true"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr[-3000:]
    lines = dry.stdout.splitlines()
    (todo,) = [ln for ln in lines if re.match(r"  demo_20240711: 1 chips, about ", ln)]
    wall_s = 1 / counts["chips_per_s"]  # the one chip still to do, at the measured rate
    sam_s = counts["stage_cpu_s"]["sam"] / counts["chips_segmented"]
    assert todo == f"  demo_20240711: 1 chips, about {duration(wall_s)} wall, {duration(sam_s)} SAM time on CPUs", (
        todo, counts)
    assert lines[-2].startswith(f"  based on {manifest_path} (finished ")  # the last says in process or on Ray
