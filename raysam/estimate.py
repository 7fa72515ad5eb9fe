"""What a run will cost, for the dry run: wall time and GPU time per date group, from a measured rate.

The rate comes from the most recently finished date group of the same run key (the run key
already encodes the AOI, the model's files and every parameter that changes the masks; see
:func:`raysam.plan.collection_key`): its ``manifest.json`` holds ``counts.chips_per_s`` (chips
segmented per second of the group's SAM stage), ``counts.chips_segmented``,
``counts.stage_cpu_s.sam`` (SAM actor seconds) and the Ray resources it ran with. Without such
a manifest there is no rate, and the dry run says so rather than guess.

* wall time of a group = its chips still to segment / ``chips_per_s``, scaled by the ratio of
  SAM actors (measured / configured) when they differ;
* GPU time = chips x SAM seconds per chip x ``ray.gpus_per_actor`` (on CPUs: SAM actor time).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from raysam.config import RayConfig
from raysam.plan import RunPlan
from raysam.layout import MANIFEST
from raysam.storage.root import OutputRoot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MeasuredRate:
    """The speed of one finished date group, read from its manifest.

    Attributes:
        manifest: where it was read.
        finished_at: when that group was published (ISO 8601).
        chips: chips it segmented.
        chips_per_s: chips segmented per second of its SAM stage.
        sam_s_per_chip: SAM actor seconds per chip.
        sam_actors: the SAM actors it ran with.
        device: its ``device`` setting.
    """

    manifest: str
    finished_at: str
    chips: int
    chips_per_s: float
    sam_s_per_chip: float
    sam_actors: int
    device: str


def rate_from_manifest(path: str, manifest: dict) -> MeasuredRate | None:
    """The rate a manifest measured, or None when it segmented no chip (all resumed or skipped)."""
    counts = manifest.get("counts") or {}
    chips = int(counts.get("chips_segmented") or 0)
    per_s = float(counts.get("chips_per_s") or 0.0)
    sam_s = float((counts.get("stage_cpu_s") or {}).get("sam") or 0.0)
    if chips <= 0 or per_s <= 0:
        return None
    config = manifest.get("config") or {}
    return MeasuredRate(path, str(manifest.get("finished_at") or ""), chips, per_s, sam_s / chips,
                        int((config.get("ray") or {}).get("sam_actors") or 1), str(config.get("device") or "auto"))


def latest_rate(root: OutputRoot, collection_dir: str) -> MeasuredRate | None:
    """The rate of the most recently finished date group under ``collection_dir``, if any."""
    rates = []
    for name in root.storage.list_names(collection_dir):
        if name.startswith("."):
            continue
        path = f"{collection_dir}/{name}/{MANIFEST}"
        manifest = root.read_json(path)
        rate = rate_from_manifest(path, manifest) if manifest else None
        if rate is not None:
            rates.append(rate)
    return max(rates, key=lambda r: r.finished_at, default=None)


def duration(seconds: float) -> str:
    """``0.4 s``, ``45 s``, ``3 min 20 s``, ``2 h 05 min``."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def group_costs(chips: int, rate: MeasuredRate, ray: RayConfig) -> tuple[float, float]:
    """(wall seconds, SAM actor seconds) of segmenting ``chips`` at ``rate`` with ``ray``'s actors."""
    wall_s = chips / rate.chips_per_s * rate.sam_actors / ray.sam_actors
    return wall_s, chips * rate.sam_s_per_chip


def describe_costs(plan: RunPlan, rate: MeasuredRate | None, ray: RayConfig) -> Sequence[str]:
    """The dry run's cost lines: one per date group to do, a total, and what they are based on."""
    todo = [(g.group.id, max((g.n_chips or 0) - g.chips_checkpointed, 0)) for g in plan.todo]
    if not any(chips for _, chips in todo):
        return ["cost: nothing to segment"]
    if rate is None:
        return [f"cost: no rate to estimate from: no date group of run {plan.run_key} has finished under "
                f"{plan.collection_dir} yet (each finished group's manifest.json measures one); run one date "
                "group first (a shorter region.time_range) to get estimates"]
    gpu = ray.gpus_per_actor > 0
    unit = "GPU time" if gpu else "SAM time on CPUs"
    lines, total_wall, total_sam = [], 0.0, 0.0
    for group_id, chips in todo:
        wall_s, sam_s = group_costs(chips, rate, ray)
        sam_s *= ray.gpus_per_actor if gpu else 1.0
        total_wall, total_sam = total_wall + wall_s, total_sam + sam_s
        lines.append(f"  {group_id}: {chips} chips, about {duration(wall_s)} wall, {duration(sam_s)} {unit}")
    lines.insert(0, f"cost estimate: about {duration(total_wall)} wall and {duration(total_sam)} {unit} in all")
    scaled = (f" (wall times scaled to this run's ray.sam_actors={ray.sam_actors})"
              if rate.sam_actors != ray.sam_actors else "")
    lines.append(f"  based on {rate.manifest} (finished {rate.finished_at}): {rate.chips} chips at "
                 f"{rate.chips_per_s:.3g} chips/s with {rate.sam_actors} SAM actor(s){scaled}, "
                 f"{rate.sam_s_per_chip:.3g} s of SAM per chip, device={rate.device}")
    return lines
