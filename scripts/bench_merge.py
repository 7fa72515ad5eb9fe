"""Cross-chip merge speed on a region-sized synthetic date group: global vs grouped.

Builds the test suite's perfect-segmenter scene (tests/test_merge.py: known objects cut to
1024 px chips at 50 % overlap, sloppy duplicates, noise) large enough for ~50k MaskRecords,
then times :func:`raysam.merge.merge_masks` (one global merge) against
:func:`raysam.merge.merge_grouped` (per-cell merges with a one-chip halo, run serially here;
Ray runs the cells in parallel) and checks both keep the same records.

    .venv/bin/python scripts/bench_merge.py [--chips 16] [--objects 12000] [--cell-chips 4]
        [--mode mask|box] [--overlapping]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysam.merge import cell_keys, merge_cells, merge_grouped, merge_masks  # noqa: E402
from tests.test_merge import make_scene  # noqa: E402


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chips", type=int, default=16, help="chips per side (1024 px, 50 %% overlap)")
    ap.add_argument("--objects", type=int, default=12000)
    ap.add_argument("--cell-chips", type=int, default=4, help="cell side in chip steps (512 px)")
    ap.add_argument("--mode", default="mask", choices=["mask", "box"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overlapping", action="store_true", help="objects may overlap (harder than fields)")
    args = ap.parse_args()

    scene, gen_s = _timed(make_scene, args.seed, n_chips=(args.chips, args.chips), n_objects=args.objects,
                          size_px=(10, 160), n_large=20, n_noise=200, dup_fraction=0.2,
                          disjoint=not args.overlapping)
    table, _ = _timed(scene.table)
    n = len(table)
    print(f"scene: {args.chips}x{args.chips} chips, grid {scene.grid_hw_px} px, {len(scene.objects)} objects, "
          f"{n} records (generated in {gen_s:.1f} s)")

    keep_g, t_global = _timed(merge_masks, table, iou_mode=args.mode, grid_hw_px=scene.grid_hw_px)
    cell_px = args.cell_chips * scene.step_px
    rec, _ = cell_keys(table.box_xyxy, cell_px, scene.chip_size, scene.grid_hw_px)
    keep_c, t_grouped = _timed(merge_grouped, table, cell_px, grid_hw_px=scene.grid_hw_px, iou_mode=args.mode)
    results = merge_cells(table, cell_px, scene.chip_size, scene.grid_hw_px, iou_mode=args.mode)
    unresolved = sum(len(r.unresolved_uids) for r in results)
    slowest_cell = max(len(r.kept_uids) + len(r.dropped_uids) + len(r.unresolved_uids) for r in results)
    objects_found = len({scene.sources()[i] for i in keep_g if scene.sources()[i].startswith("obj")})

    print(f"{'merge':<28}{'seconds':>10}{'records/s':>12}{'kept':>8}")
    print(f"{'global (merge_masks)':<28}{t_global:>10.2f}{n / t_global:>12.0f}{len(keep_g):>8}")
    print(f"{'grouped, serial':<28}{t_grouped:>10.2f}{n / t_grouped:>12.0f}{len(keep_c):>8}")
    print(f"grouped/global time ratio: {t_grouped / t_global:.2f} (cells of {cell_px} px, halo {scene.chip_size} px, "
          f"records replicated x{len(rec) / n:.2f}; {len(results)} cells, at most {slowest_cell} owned records each)")
    print(f"records left unresolved by the one-chip halo (decided by resolve_pending): {unresolved}")
    print(f"identical kept sets: {np.array_equal(keep_g, keep_c)}; objects represented: "
          f"{objects_found}/{len(scene.objects)}")


if __name__ == "__main__":
    main()
