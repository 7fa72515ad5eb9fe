"""Pipeline vs bare chip loop on the demo region, and driver memory as the chip count grows.

    .venv/bin/python scripts/bench_pipeline.py [--points-per-side 16] [--skip-memory]

1. Throughput: the same chips (demo region, both dates, demo model) go through
   (a) the bare loop in this process: plan -> read_chip -> generate_compact -> MaskRecord rows, and
   (b) the whole Ray pipeline (``python -m raysam.run region=demo model=demo``): reads, SAM actor
       pool, cross-chip merge and the segmentation_mask sinks.
   It prints chips/s for both and pipeline / bare (goal >= 0.8 on one machine).
2. Driver memory: peak RSS of the driver process (``manifest.json`` ``driver_peak_rss_mb``) for
   the demo region and for the same region planned with ~10x the chips (spatial_overlap 0.95),
   with a tiny point grid so the run stays short. Flat = the driver streams, never collects.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _run_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from raysam.hydra_config import to_run_config
    from raysam.run import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_run_config(compose("config", overrides=["region=demo", "model=demo", *overrides]))


def bare_loop(overrides: list[str]) -> tuple[int, float]:
    """Chips and seconds for plan -> read -> SAM -> records, one chip after another, no Ray."""
    from raysam import records
    from raysam.driver import _scaling, prepare
    from raysam.plan import iter_chip_tasks
    from raysam.read import read_chip
    from raysam.sam import AutomaticMaskGenerator, load_model

    cfg = _run_config(overrides)
    prepared = prepare(cfg)
    model = load_model(prepared.model_dir, device=cfg.device)
    generator = AutomaticMaskGenerator(model, **dataclasses.asdict(cfg.amg))
    chips = 0
    t0 = time.perf_counter()
    for g in prepared.plan.groups:
        scaling = _scaling(cfg, g.group, None)
        for task in iter_chip_tasks(cfg, g.group):
            pixels = read_chip(task, scaling=scaling, max_cloud_fraction=cfg.chip.max_cloud_fraction)
            if pixels.rgb is None:
                continue
            records.chip_mask_rows(task, generator.generate_compact(pixels.rgb), pixels.valid & ~pixels.cloud)
            chips += 1
    return chips, time.perf_counter() - t0


def pipeline_run(overrides: list[str], out: Path) -> dict:
    """Run ``python -m raysam.run`` in a fresh process; return the first date group's manifest + wall time."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "raysam.run", "region=demo", "model=demo", f"output.root={out}",
           f"hydra.run.dir={out}/_hydra", *overrides]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    manifests = [json.loads(p.read_text()) for p in sorted(out.glob("demo/*/*/manifest.json"))]
    chips = sum(m["counts"]["chips_read"] for m in manifests)
    return {"wall_s": wall, "chips": chips, "driver_peak_rss_mb": manifests[0]["driver_peak_rss_mb"],
            "sam_s": sum(m["timings_s"].get("sam", 0) for m in manifests[:1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    overrides = [f"sam.points_per_side={args.points_per_side}", "sam.points_per_batch=64",
                 "output.sinks=[segmentation_mask]"]
    with tempfile.TemporaryDirectory() as tmp:
        _run_config(overrides)  # validate before timing anything
        pipe = pipeline_run(overrides, Path(tmp) / "pipe")  # also builds the demo catalog/model once
        chips, bare_s = bare_loop(overrides)
        bare_rate = chips / bare_s
        pipe_rate = pipe["chips"] / pipe["wall_s"]
        print(f"bare loop : {chips} chips in {bare_s:.1f} s = {bare_rate:.3f} chips/s")
        print(f"pipeline  : {pipe['chips']} chips in {pipe['wall_s']:.1f} s (process wall, Ray start and sinks "
              f"included) = {pipe_rate:.3f} chips/s")
        print(f"ratio pipeline/bare = {pipe_rate / bare_rate:.2f} (goal >= 0.8)")
        if args.skip_memory:
            return
        small = pipeline_run(["sam.points_per_side=4", "output.sinks=[segmentation_mask]"], Path(tmp) / "m1")
        big = pipeline_run(["sam.points_per_side=4", "output.sinks=[segmentation_mask]", "sam.spatial_overlap=0.95"],
                           Path(tmp) / "m10")
        print(f"driver peak RSS: {small['chips']} chips -> {small['driver_peak_rss_mb']:.0f} MB; "
              f"{big['chips']} chips -> {big['driver_peak_rss_mb']:.0f} MB "
              f"(x{big['chips'] / max(small['chips'], 1):.1f} chips, x{big['driver_peak_rss_mb'] / small['driver_peak_rss_mb']:.2f} RSS)")


if __name__ == "__main__":
    main()
