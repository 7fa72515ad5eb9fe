"""Score every output of a raysam sweep against the demo catalog's ground-truth fields.

Run a Hydra multirun on the demo region, then score it::

    python -m raysam.run -m region=demo model=demo output.root=outputs/sweep \\
        sam.points_per_side=16,32 sam.prompts=grid,coverage
    python scripts/score_sweep.py outputs/sweep [--catalog demo_data/catalog]

Every complete date group under the given roots (``**/_COMPLETE.json``, with its
``masks.parquet`` and ``manifest.json``) is scored against the catalog's ``fields.parquet``,
restricted to the fields lying inside the run's AOI. A field is *found* when a mask overlaps it
with IoU >= 0.5 (areas in the group's UTM CRS); a *duplicate* is a field found by more than one
mask. Runs are told apart by output root and run key (the collection: one per configuration), and
the configuration keys that differ between runs label the rows. The printed table has, per run:
fields found on the catalog's clear date and over all dates, the median IoU of the found fields,
duplicates (all dates), decoder prompts per chip and chips per second (the manifests'
``counts.decoder_prompts``, ``counts.chips_segmented`` + ``counts.chips_resumed``, and
``counts.chips_per_s``, each group's chips over the wall time of its SAM phase, averaged).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import shapely
from pyproj import Transformer

MATCH_IOU = 0.5
CONFIG_SECTIONS = ("amg", "chip", "merge", "region")  # manifest config sections that label a run


@dataclass(frozen=True)
class GroupScore:
    """One date group scored against the fields inside its AOI.

    Attributes:
        date: acquisition date (ISO).
        n_fields: ground-truth fields inside the AOI.
        best_iou: (n_fields,) best mask IoU of each field (0 when no mask overlaps it).
        n_matches: (n_fields,) masks with IoU >= MATCH_IOU of each field.
        chips: chips of the group (segmented by this run or resumed from its checkpoints).
        decoder_prompts: decoder prompts over the group's chips (None if not reported).
    """

    date: str
    n_fields: int
    best_iou: np.ndarray
    n_matches: np.ndarray
    chips: int
    decoder_prompts: int | None


@dataclass(frozen=True)
class RunScore:
    """The date groups of one run (one configuration)."""

    label: dict[str, object]
    groups: list[GroupScore]
    chips_per_s: float

    def found(self, dates: Iterable[str] | None = None) -> tuple[int, int]:
        """(fields found, fields) over the groups of the given dates (all if None)."""
        chosen = [g for g in self.groups if dates is None or g.date in set(dates)]
        return sum(int((g.best_iou >= MATCH_IOU).sum()) for g in chosen), sum(g.n_fields for g in chosen)

    def median_iou(self) -> float:
        """Median best IoU of the found fields, all dates."""
        ious = np.concatenate([g.best_iou[g.best_iou >= MATCH_IOU] for g in self.groups])
        return float(np.median(ious)) if ious.size else float("nan")

    def duplicates(self) -> int:
        """Fields found by more than one mask, all dates."""
        return sum(int((g.n_matches > 1).sum()) for g in self.groups)

    def prompts_per_chip(self) -> float | None:
        """Decoder prompts per chip read, all dates."""
        if any(g.decoder_prompts is None for g in self.groups):
            return None
        chips = sum(g.chips for g in self.groups)
        return sum(g.decoder_prompts for g in self.groups) / chips if chips else 0.0


def read_catalog(catalog_dir: Path) -> tuple[Path, list[str], str | None]:
    """(fields path, dates, cloudy date) from the demo catalog's ``demo_catalog.json``."""
    info = json.loads((catalog_dir / "demo_catalog.json").read_text())
    return Path(info["fields_path"]), list(info["dates"]), info.get("cloudy_date")


def load_fields(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids, EPSG:4326 polygons) of the ground-truth fields."""
    table = pq.read_table(path, columns=["id", "geometry"])
    return np.asarray(table.column("id").to_pylist()), shapely.from_wkb(table.column("geometry").to_pylist())


def _to_crs(geoms: np.ndarray, crs: str) -> np.ndarray:
    to = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    return shapely.transform(geoms, lambda xy: np.column_stack(to.transform(xy[:, 0], xy[:, 1])))


def score_group(group_dir: Path, fields_wgs84: np.ndarray) -> tuple[GroupScore, dict]:
    """Score one complete date group; also return its manifest."""
    manifest = json.loads((group_dir / "manifest.json").read_text())
    aoi = shapely.from_wkt(manifest["region"]["aoi_wgs84_wkt"])
    crs = manifest["date_group"]["grid"]["crs"]
    inside = _to_crs(fields_wgs84[shapely.within(fields_wgs84, aoi)], crs)
    table = pq.read_table(group_dir / "masks.parquet", columns=["geometry"])
    masks = _to_crs(shapely.from_wkb(table.column("geometry").to_pylist()), crs)
    best, n_matches = np.zeros(len(inside)), np.zeros(len(inside), np.int64)
    if len(masks) and len(inside):
        field_idx, mask_idx = shapely.STRtree(masks).query(inside, predicate="intersects")
        inter = shapely.area(shapely.intersection(inside[field_idx], masks[mask_idx]))
        iou = inter / (shapely.area(inside[field_idx]) + shapely.area(masks[mask_idx]) - inter)
        np.maximum.at(best, field_idx, iou)
        np.add.at(n_matches, field_idx, iou >= MATCH_IOU)
    counts = manifest["counts"]
    score = GroupScore(manifest["date_group"]["date"][:10], len(inside), best, n_matches,
                       int(counts["chips_segmented"]) + int(counts["chips_resumed"]), counts.get("decoder_prompts"))
    return score, manifest


def _flat(config: dict) -> dict[str, object]:
    """``section.key`` -> value for the configuration sections that label a run."""
    return {f"{s}.{k}": json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v
            for s in CONFIG_SECTIONS for k, v in (config.get(s) or {}).items()}


def score_runs(roots: list[Path], fields_path: Path) -> list[RunScore]:
    """Score every complete date group under ``roots``, grouped into runs by (root, run key)."""
    _, fields = load_fields(fields_path)
    runs: dict[tuple[str, str], dict] = {}
    for root in roots:
        for marker in sorted(root.glob("**/_COMPLETE.json")):
            score, manifest = score_group(marker.parent, fields)
            config = _flat(manifest.get("config", {}))
            if len(roots) > 1:
                config["output.root"] = str(root)
            run = runs.setdefault((str(root), manifest.get("run_key") or str(marker.parent.parent)),
                                  {"config": config, "groups": [], "rates": []})
            run["groups"].append(score)
            run["rates"].append(manifest["counts"].get("chips_per_s"))
    varying = _varying_keys([r["config"] for r in runs.values()])
    out = []
    for run in runs.values():
        rates = [r for r in run["rates"] if r]
        out.append(RunScore({k: run["config"].get(k) for k in varying}, run["groups"],
                            float(np.mean(rates)) if rates else float("nan")))
    return sorted(out, key=lambda r: [_sort_key(v) for v in r.label.values()])


def _sort_key(value: object) -> tuple[int, float, str]:
    """Numbers in numeric order, before anything else in text order."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _varying_keys(configs: list[dict[str, object]]) -> list[str]:
    keys = sorted({k for c in configs for k in c})
    return [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1]


def format_table(runs: list[RunScore], clear_dates: list[str]) -> str:
    """The sweep as one Markdown table."""
    label_keys = list(runs[0].label) if runs else []
    head = [k.split(".", 1)[1] for k in label_keys] + [
        f"found, clear date ({', '.join(clear_dates)})", "found, all dates", "median IoU", "duplicates",
        "decoder prompts / chip", "chips/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        clear, everywhere = run.found(clear_dates), run.found()
        prompts = run.prompts_per_chip()
        cells = [str(run.label[k]) for k in label_keys] + [
            _pct(*clear), _pct(*everywhere), f"{run.median_iou():.3f}", str(run.duplicates()),
            "n/a" if prompts is None else f"{prompts:.1f}", f"{run.chips_per_s:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(found: int, total: int) -> str:
    return f"{100.0 * found / total:.1f} % ({found}/{total})" if total else "n/a (0/0)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", type=Path, nargs="+", help="output roots (output.root of the runs)")
    parser.add_argument("--catalog", type=Path, default=Path("demo_data/catalog"),
                        help="the demo catalog (its demo_catalog.json names fields.parquet and the dates)")
    args = parser.parse_args(argv)
    fields_path, dates, cloudy = read_catalog(args.catalog)
    runs = score_runs(args.roots, fields_path)
    if not runs:
        print(f"score_sweep: no complete date group (_COMPLETE.json) under {', '.join(map(str, args.roots))}",
              file=sys.stderr)
        return 2
    print(format_table(runs, [d for d in dates if d != cloudy]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
