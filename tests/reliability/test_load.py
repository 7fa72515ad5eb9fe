"""Load: a region of more than 2,000 chips runs to completion with flat memory and a spill report.

Two runs of ``python -m raysam.run`` (each its own process, so its own local Ray and fresh
workers) on the synthetic catalog, one date, the demo model with a 2 x 2 point grid, masks
only: a small region (169 chips) and a large one (2,160 chips), both inside tile 16TBM at
``spatial_overlap`` 0.98 (a 20 px chip stride, so the demo catalog's 20 km tile yields
thousands of full 1024 x 1024 chips, each read, segmented and merged like any other). The
region grows 13x. Both fit in one merge cell (4 chips and a 1-chip halo: 6,144 px), so the
merge holds all of a region's masks at once, 13x more for the large one: harsher on the
merge than a real region at overlap 0.5, whose cells see at most ~150 chips. The peak memory of the
driver and the peak private memory of the chip reads, SAM actors and sink tasks must not grow
with it (< 1.5x); the merge's (measured per task) grows with its cell's masks, by a compact
mask's share each. Private, because a worker's peak RSS also
counts the pages of Ray's shared object store it has written into, which grow with the
number of objects it wrote until they reach the store's size (raysam.runstats.memory_mb).
A worker's private memory saws up and down by ~100 MB from chip to chip (sampled once per
chip, watched from outside: it plateaus within the first hundred or so chips), so the small
region has enough chips to see its highs. The
manifests carry the figures; the test prints them (``-s``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ONE_DATE = "region.time_range=[2024-07-01,2024-07-01]"  # the cloud-free date
OVERLAP = "sam.spatial_overlap=0.98"
SMALL_AOI = "-89.99,41.785,-89.845,41.895"  # 169 chips at this overlap (dry run)
LARGE_AOI = "-90.04,41.758,-89.812,41.922"  # 2,160 chips
MIN_LARGE_CHIPS = 2000
MIN_CHIP_RATIO = 10
MAX_MEMORY_RATIO = 1.5
ROLES = ("read", "sam", "merge", "sink")
FLAT_ROLES = ("read", "sam", "sink")  # the merge's work is a cell's masks: test_the_merge_holds_compact_masks_only
MERGE_MAX_KB_PER_MASK = 64  # measured ~29 kB per mask (329 -> 504 MB for 6,143 more masks)


def _run(demo_catalog, out: Path, aoi: str) -> tuple[dict, float]:
    """One run in a fresh process; returns its (single) manifest and wall seconds."""
    cmd = [
        sys.executable, "-m", "raysam.run", "region=demo", "model=demo", f"region.geometry='{aoi}'", ONE_DATE,
        OVERLAP, "sam.points_per_side=2", "sam.points_per_batch=4", "output.sinks=[segmentation_mask]",
        f"stac.demo_root={demo_catalog.root.parent}", f"model.path={demo_catalog.root.parent / 'models' / 'demo'}",
        f"output.root={out}", f"hydra.run.dir={out}/_hydra",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    wall_s = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    (manifest,) = [json.loads(p.read_text()) for p in out.glob("demo/*/*/manifest.json")]
    return manifest, wall_s


def _figures(manifest: dict) -> dict[str, float]:
    """Peak private RSS (MB) per worker role, and the driver's peak RSS (its own VmHWM)."""
    resources = manifest["counts"]["resources"]
    return {**resources["peak_private_mb"], "driver": resources["peak_rss_mb"]["driver"]}


@pytest.fixture(scope="module")
def runs(demo_catalog, tmp_path_factory):
    out = tmp_path_factory.mktemp("load")
    return {name: _run(demo_catalog, out / name, aoi) for name, aoi in (("small", SMALL_AOI), ("large", LARGE_AOI))}


def test_large_region_completes_with_every_chip(runs):
    small, large = runs["small"][0]["counts"], runs["large"][0]["counts"]
    assert large["chips_segmented"] + large["chips_skipped"] >= MIN_LARGE_CHIPS
    assert large["chips_segmented"] >= MIN_CHIP_RATIO * small["chips_segmented"]
    assert large["masks_after_merge"] > 0
    for name, (manifest, wall_s) in runs.items():
        counts = manifest["counts"]
        print(f"{name}: {counts['chips_segmented']} chips segmented, {counts['chips_skipped']} skipped, "
              f"{counts['masks_before_merge']} -> {counts['masks_after_merge']} masks, {wall_s:.0f} s, "
              f"peak private MB {_figures(manifest)}, peak RSS MB (object-store pages included) "
              f"{counts['resources']['peak_rss_mb']}, object store {counts['resources']['object_store']}")


def test_every_process_peak_memory_is_in_the_manifest(runs):
    for manifest, _ in runs.values():
        resources = manifest["counts"]["resources"]
        assert {*ROLES, "driver"} <= set(resources["peak_private_mb"]) == set(resources["peak_rss_mb"])
        assert resources["sam_model_loads"] == len([p for p in resources["processes"] if "sam" in p["roles"]]) >= 1
        for proc in resources["processes"]:
            assert proc["pid"] > 0 and proc["node_id"] and proc["roles"]
            assert 50 < proc["peak_private_mb"] <= proc["peak_rss_mb"] < 8000  # Python with numpy and Ray, MB
        assert resources["peak_rss_mb"]["driver"] > 50
        # Chip reads are CPU tasks apart from the SAM actors (not fused into them).
        sam_pids = {p["pid"] for p in resources["processes"] if "sam" in p["roles"]}
        assert not [p for p in resources["processes"] if "read" in p["roles"] and p["pid"] in sam_pids]


def test_peak_memory_is_flat_in_region_size(runs):
    small, large = _figures(runs["small"][0]), _figures(runs["large"][0])
    for role in (*FLAT_ROLES, "driver"):
        assert large[role] < MAX_MEMORY_RATIO * small[role], f"{role}: {small[role]:.0f} -> {large[role]:.0f} MB"


def test_the_merge_holds_compact_masks_only(runs):
    """Both regions are one merge cell, so the merge task holds 13x more masks in the large one:
    its memory grows with the masks of a cell (flat in the area: scripts/bench_scale.py, 9 cells
    against 1), by no more than a compact mask's share each. A dense 1024 x 1024 mask is 1 MB
    (128 kB bit-packed); a record's bit-packed crop is a few kB."""
    (small, _), (large, _) = runs["small"], runs["large"]
    masks = large["counts"]["masks_before_merge"] - small["counts"]["masks_before_merge"]
    grown_kb = (_figures(large)["merge"] - _figures(small)["merge"]) * 1024
    assert masks > 5000 and grown_kb / masks < MERGE_MAX_KB_PER_MASK, f"{grown_kb / masks:.0f} kB per mask"


def test_object_store_spilling_is_reported(runs):
    for manifest, _ in runs.values():
        store = manifest["counts"]["resources"]["object_store"]
        assert set(store) == {"spilled_bytes", "spilled_objects", "restored_bytes"}
        assert all(v >= 0 for v in store.values())


def test_spilled_bytes_are_measured_when_the_object_store_overflows(gpu_cluster):
    """Overfill the head's 200 MB object store: the run's RunStats reports what was spilled."""
    import numpy as np
    import ray

    from raysam.runstats import RunStats

    stats = RunStats.remote()
    before = ray.get(stats.resources.remote())["object_store"]
    chunk = np.ones(40 * 1024**2, np.uint8)  # 40 MB each, all kept alive: 320 MB in a 200 MB store
    refs = [ray.put(chunk + i) for i in range(8)]
    after = ray.get(stats.resources.remote())["object_store"]
    assert after["spilled_bytes"] - before["spilled_bytes"] >= 100 * 1024**2
    assert after["spilled_objects"] > before["spilled_objects"]
    assert int(ray.get(refs[0])[0]) == 1 and int(ray.get(refs[-1])[0]) == 8  # restored intact
    ray.kill(stats)
