#!/usr/bin/env python
"""Chip read speed on the demo region: warping every band vs the aligned fast path + dataset cache.

Reads the demo catalog's 1024 px chips (R, G, B + 20 m SCL; the zone 16 grid, so one tile is
aligned and the other, in zone 15, is warped) N times round-robin per configuration, checks
that the configurations give identical chips, and prints seconds per chip and the ratio.

    .venv/bin/python scripts/bench_read.py [--chips 12] [--root demo_data/catalog] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import shapely

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysam import read, remote_io  # noqa: E402
from raysam.demo.catalog import DEMO_AOI_WGS84, DEMO_ROOT, make_demo_catalog  # noqa: E402
from raysam.grid import ChipTask, make_date_group, plan_chip_tasks  # noqa: E402
from raysam.selection import select_per_date  # noqa: E402
from raysam.stac import dedupe_reprocessed, parse_item  # noqa: E402

CONFIGS = {  # name: (fast_path, open datasets kept per thread)
    "warp, reopen per read (before)": (False, 0),
    "warp + dataset cache": (False, remote_io.DEFAULT_DATASET_CACHE_SIZE),
    "fast path + dataset cache (now)": (True, remote_io.DEFAULT_DATASET_CACHE_SIZE),
}


def demo_tasks(root: Path) -> list[ChipTask]:
    """Chip tasks of every demo date (catalog items parsed from its JSON files, no server)."""
    info = make_demo_catalog(root, seed=0)
    items = dedupe_reprocessed(parse_item(json.loads(p.read_text()))
                               for p in sorted(info.items_dir.glob("*.json")))
    aoi = shapely.box(*DEMO_AOI_WGS84)
    tasks = []
    for sel in select_per_date(items, aoi):
        group = make_date_group("demo", sel.date, sel.items, aoi)
        tasks += list(plan_chip_tasks(group, ("R", "G", "B", "SCL")))
    return tasks


def time_reads(tasks: list[ChipTask], n: int, fast_path: bool,
               cache_size: int) -> tuple[float, list]:
    """Seconds per chip over ``n`` reads (round-robin over tasks), and the chips read."""
    remote_io.clear_dataset_cache()
    remote_io.set_dataset_cache_size(cache_size)
    chips = []
    start = time.perf_counter()
    for i in range(n):
        chips.append(read.read_chip(tasks[i % len(tasks)], fast_path=fast_path,
                                    max_cloud_fraction=1.0))
    return (time.perf_counter() - start) / n, chips


def time_band(task: ChipTask, fast_path: bool, n: int = 5) -> float:
    """Seconds per read of one 10 m band of the task's grid-aligned item (cached dataset)."""
    item = next(i for i in task.items if f"T{_zone(task)}" in i.item_id)
    band = item.band("B04")
    box = (slice(0, task.window_px[3]), slice(0, task.window_px[2]))
    read_band = read._band_reader(task, None, fast_path)
    read_band(item.item_id, band, read.Resampling.bilinear, box)  # open and cache
    start = time.perf_counter()
    for _ in range(n):
        read_band(item.item_id, band, read.Resampling.bilinear, box)
    return (time.perf_counter() - start) / n


def _zone(task: ChipTask) -> str:
    """The UTM zone number of the task's grid (326zz)."""
    return str(task.epsg)[-2:]


def same(a: list, b: list) -> bool:
    """True if two runs read identical chips."""
    return all(type(x) is type(y) and (x.rgb is None or (np.array_equal(x.rgb, y.rgb)
               and np.array_equal(x.valid, y.valid) and np.array_equal(x.cloud, y.cloud)))
               for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chips", type=int, default=12, help="chip reads per configuration")
    ap.add_argument("--root", type=Path, default=DEMO_ROOT)
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration (best kept)")
    args = ap.parse_args()
    tasks = demo_tasks(args.root)
    print(f"demo: {len(tasks)} chip tasks (1024 px, R G B + SCL), {args.chips} reads per config")
    time_reads(tasks, 2, True, 0)  # warm the OS file cache and imports
    results = {}
    for name, (fast, cache) in CONFIGS.items():
        runs = [time_reads(tasks, args.chips, fast, cache) for _ in range(args.repeat)]
        results[name] = min(runs, key=lambda r: r[0])
    base_s, base_chips = results[next(iter(CONFIGS))]
    print(f"{'configuration':<34}{'s/chip':>9}{'speed-up':>10}{'identical':>11}")
    for name, (sec, chips) in results.items():
        print(f"{name:<34}{sec:>9.3f}{base_s / sec:>9.2f}x{str(same(chips, base_chips)):>11}")
    remote_io.set_dataset_cache_size(remote_io.DEFAULT_DATASET_CACHE_SIZE)
    warp_s, fast_s = time_band(tasks[0], False), time_band(tasks[0], True)
    print(f"one aligned 1024 px band: warp {warp_s * 1e3:.1f} ms, windowed read "
          f"{fast_s * 1e3:.1f} ms, ratio {warp_s / fast_s:.1f}x (every demo chip also warps "
          f"its other-zone item)")


if __name__ == "__main__":
    main()
