"""Driver-side planning: region -> STAC search -> per-date selection -> date groups -> chips.

No Ray and no pixel reads: this is what ``dry_run=true`` prints, so a user can size a
backfill (items, chips, km², what an existing output already covers) before paying for GPUs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from raysam.config import RunConfig, check_path_component
from raysam.grid import ChipTask, DateGroup, make_date_group, plan_chip_tasks
from raysam.region import Region
from raysam.sinks.store import GroupLock, OutputRoot

log = logging.getLogger(__name__)

SCL_BAND = "SCL"
PLAN_VERSION = 1  # bump when output contents change for the same config


@dataclass(frozen=True)
class GroupPlan:
    """One date group and where its outputs go."""

    group: DateGroup
    out_dir: str
    n_chips: int
    area_km2: float
    complete: bool


@dataclass(frozen=True)
class RunPlan:
    """Everything the driver knows before any pixel is read."""

    region: Region
    run_key: str
    fingerprint: str
    groups: tuple[GroupPlan, ...]

    @property
    def todo(self) -> tuple[GroupPlan, ...]:
        """The date groups that still need work."""
        return tuple(g for g in self.groups if not g.complete)


def chip_bands(cfg: RunConfig) -> tuple[str, ...]:
    """The bands a chip read needs: the three RGB bands plus SCL for the cloud mask."""
    return (*cfg.chip.scaling.band_names, SCL_BAND)


def run_fingerprint(cfg: RunConfig, model_manifest: dict) -> str:
    """A hash of everything that changes the outputs (not secrets, not Ray resources)."""
    payload = {
        "v": PLAN_VERSION,
        "region": asdict(cfg.region) if hasattr(cfg.region, "__dataclass_fields__") else repr(cfg.region),
        "collection": cfg.stac.collection,
        "model": {"type": cfg.model.type, "files": {k: model_manifest.get(k, {}).get("sha256") for k in ("encoder", "decoder")}},
        "amg": {k: v for k, v in asdict(cfg.amg).items() if k != "point_grids"},
        "chip": asdict(cfg.chip),
        "merge": asdict(cfg.merge),
        "output": {"sinks": list(cfg.output.sinks), "s2_bands": list(cfg.output.s2_bands)},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def plan_run(cfg: RunConfig, region: Region, items: list, model_manifest: dict, root: OutputRoot) -> RunPlan:
    """Select items per date, build each date group's grid and count its chips.

    Args:
        cfg: the run config.
        region: the loaded region.
        items: parsed STAC items for the region and time range.
        model_manifest: the model's manifest (its file hashes enter the fingerprint).
        root: the output root, to see which date groups are already complete.
    """
    from raysam.stac import select_per_date

    fingerprint = run_fingerprint(cfg, model_manifest)
    run_key = check_path_component(f"{cfg.model.type}-{fingerprint[:10]}", "run key")
    selections = select_per_date(
        items, region.aoi_wgs84, min_tile_cover=region.min_tile_cover,
        max_tiles_per_date=region.max_tiles_per_date, max_cloud_cover=region.max_cloud_cover,
    )
    groups = []
    for sel in selections:
        group = make_date_group(region.name, sel.date, sel.items, region.aoi_wgs84, epsg=region.utm_epsg)
        out_dir = root.path(region.name, run_key, group.id)
        n_chips = sum(1 for _ in iter_chip_tasks(cfg, group))
        complete = not cfg.output.overwrite and root.is_complete(out_dir, fingerprint)
        groups.append(GroupPlan(group, out_dir, n_chips, group.aoi_utm.area / 1e6, complete))
    return RunPlan(region, run_key, fingerprint, tuple(groups))


def claim_todo(plan: RunPlan, root: OutputRoot, overwrite: bool = False
               ) -> tuple[tuple[GroupPlan, ...], dict[str, GroupLock]]:
    """Lock every incomplete date group, then drop those another run completed meanwhile.

    Locks are taken in date-group order, all or none, so two runs on one root never deadlock;
    once a group's lock is held, whatever an interrupted run left next to it is removed.

    Args:
        plan: the run plan (its ``todo`` groups are claimed).
        root: the output root holding the groups and their locks.
        overwrite: redo groups even if complete (``output.overwrite``).

    Returns:
        The groups still to do and their locks (release each with :meth:`OutputRoot.release`).

    Raises:
        ConfigError: another run holds a group's lock (names the group and the lock file).
    """
    locks: dict[str, GroupLock] = {}
    try:
        for g in plan.todo:
            locks[g.group.id] = root.claim(g.group.id, g.out_dir)
    except BaseException:
        release_all(root, locks)
        raise
    todo = []
    for g in plan.todo:
        if not overwrite and root.is_complete(g.out_dir, plan.fingerprint):
            log.info("date group %s was completed by another run meanwhile: skipped", g.group.id)
            root.release(locks.pop(g.group.id))
            continue
        if removed := root.remove_leftovers(g.out_dir):
            log.info("date group %s: removed %d leftover staging entr%s of an interrupted run",
                     g.group.id, removed, "y" if removed == 1 else "ies")
        todo.append(g)
    return tuple(todo), locks


def release_all(root: OutputRoot, locks: dict[str, GroupLock]) -> None:
    """Release every lock still held (on success, failure or interrupt)."""
    while locks:
        _, lock = locks.popitem()
        try:
            root.release(lock)
        except Exception as err:  # noqa: BLE001 - releasing must not hide the run's own error
            log.warning("could not release lock %s (%s); delete it before the next run", lock.path, err)


def iter_chip_tasks(cfg: RunConfig, group: DateGroup) -> Iterator[ChipTask]:
    """The group's chip tasks, streamed (never a list of millions)."""
    return plan_chip_tasks(group, chip_bands(cfg), spatial_overlap=cfg.chip.spatial_overlap)


def describe(plan: RunPlan) -> str:
    """The dry-run report: one line per date group and a total."""
    lines = [f"run {plan.run_key} for region {plan.region.name}: {len(plan.groups)} date group(s)"]
    for g in plan.groups:
        covered = g.n_chips if g.complete else 0
        lines.append(
            f"  {g.group.id}: {len(g.group.items)} item(s) [{', '.join(i.id for i in g.group.items)}], "
            f"{g.n_chips} chips, {g.area_km2:,.1f} km², EPSG:{g.group.grid.epsg}, "
            f"{covered}/{g.n_chips} chips covered by existing output -> {g.out_dir}"
        )
    todo = plan.todo
    lines.append(f"to do: {len(todo)} date group(s), {sum(g.n_chips for g in todo)} chips")
    return "\n".join(lines)
