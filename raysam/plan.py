"""Driver-side planning: region -> STAC search -> per-date selection -> date groups -> what is done.

No Ray and no pixel reads: this is what ``dry_run=true`` prints, so a user can size a backfill
(items, chips, km², what existing outputs and checkpoints already cover) before paying for GPUs.

A date group is keyed by what determines its outputs, not by the run that asked for it:

* the **collection** (``<root>/<region>/<model type>-<key>/``) by the AOI and target CRS, the
  catalog collection, the model's files, the AMG, chip and merge parameters and the sinks
  (:func:`collection_key`); not by the time range, cloud filters or Ray resources;
* each **group** by its collection, its items (in priority order) and its grid
  (:func:`group_fingerprint`), which its completion marker and work directory carry.

So a month-by-month backfill and a season run of the same region write one collection, and each
skips the groups the other finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import shapely

from raysam import checkpoint
from raysam.config import RunConfig, check_path_component
from raysam.grid import ChipTask, DateGroup, make_date_group, plan_chip_tasks
from raysam.region import Region
from raysam.errors import ConfigError
from raysam.storage.locks import GroupLock, claim, lock_path, release, release_all
from raysam.storage.publish import publisher_for
from raysam.storage.root import OutputRoot

log = logging.getLogger(__name__)

SCL_BAND = "SCL"
LAYOUT_VERSION = 2  # bump when output contents change for the same config (2: tiles, parts, checkpoints)


@dataclass(frozen=True)
class GroupPlan:
    """One date group, where its outputs go and what of it is already done.

    Attributes:
        group: the date group.
        out_dir: its published directory.
        work_dir: its work directory (checkpoints).
        fingerprint: :func:`group_fingerprint`.
        area_km2: the AOI's area.
        complete: its outputs are published for this fingerprint.
        chips_checkpointed: chip checkpoints already in its work directory.
        n_chips: chips to segment (counted for the dry run only; None otherwise).
    """

    group: DateGroup
    out_dir: str
    work_dir: str
    fingerprint: str
    area_km2: float
    complete: bool
    chips_checkpointed: int = 0
    n_chips: int | None = None


@dataclass(frozen=True)
class RunPlan:
    """Everything the driver knows before any pixel is read."""

    region: Region
    run_key: str
    collection_dir: str
    groups: tuple[GroupPlan, ...]

    @property
    def todo(self) -> tuple[GroupPlan, ...]:
        """The date groups that still need work."""
        return tuple(g for g in self.groups if not g.complete)


def chip_bands(cfg: RunConfig) -> tuple[str, ...]:
    """The bands a chip read needs: the three RGB bands plus SCL for the cloud mask."""
    return (*cfg.chip.scaling.band_names, SCL_BAND)


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def collection_key(cfg: RunConfig, region: Region, model_manifest: dict) -> str:
    """A hash of what every date group of the region's outputs depends on, whatever the dates."""
    return _digest({
        "v": LAYOUT_VERSION,
        "aoi_wgs84": shapely.normalize(region.aoi_wgs84).wkb_hex,
        "utm_epsg": region.utm_epsg,
        "collection": cfg.stac.collection,
        "model": {"type": cfg.model.type, "files": {k: model_manifest.get(k, {}).get("sha256") for k in ("encoder", "decoder")}},
        "amg": {k: v for k, v in asdict(cfg.amg).items() if k != "point_grids"},
        "chip": asdict(cfg.chip),
        "merge": asdict(cfg.merge),
        "output": {"sinks": list(cfg.output.sinks), "s2_bands": list(cfg.output.s2_bands),
                   "single_file_max_mpx": cfg.output.single_file_max_mpx},
    })


def group_fingerprint(key: str, group: DateGroup) -> str:
    """A hash of one date group's outputs: its collection, items (in priority order) and grid."""
    return _digest({"collection": key, "group": group.id, "items": [i.id for i in group.items],
                    "grid": asdict(group.grid)})


def plan_run(cfg: RunConfig, region: Region, items: list, model_manifest: dict, root: OutputRoot) -> RunPlan:
    """Select items per date, build each date group's grid and see what is already done.

    Args:
        cfg: the run config.
        region: the loaded region.
        items: parsed STAC items for the region and time range.
        model_manifest: the model's manifest (its file hashes enter the fingerprints).
        root: the output root, to see which date groups are complete or checkpointed.
    """
    from raysam.selection import select_per_date

    key = collection_key(cfg, region, model_manifest)
    run_key = check_path_component(f"{cfg.model.type}-{key[:10]}", "run key")
    collection_dir = root.path(region.name, run_key)
    selections = select_per_date(
        items, region.aoi_wgs84, min_tile_cover=region.min_tile_cover,
        max_tiles_per_date=region.max_tiles_per_date, max_cloud_cover=region.max_cloud_cover,
    )
    groups = []
    for sel in selections:
        group = make_date_group(region.name, sel.date, sel.items, region.aoi_wgs84, epsg=region.utm_epsg)
        out_dir = root.path(region.name, run_key, group.id)
        work_dir = checkpoint.work_dir(collection_dir, group.id)
        fingerprint = group_fingerprint(key, group)
        complete = not cfg.output.overwrite and root.is_complete(out_dir, fingerprint)
        done = 0 if complete or cfg.output.overwrite else checkpoint.checkpointed_chips(root, work_dir, fingerprint)
        n_chips = sum(1 for _ in iter_chip_tasks(cfg, group)) if cfg.dry_run else None
        groups.append(GroupPlan(group, out_dir, work_dir, fingerprint, group.aoi_utm.area / 1e6, complete, done, n_chips))
    return RunPlan(region, run_key, collection_dir, tuple(groups))


def claim_todo(plan: RunPlan, root: OutputRoot, overwrite: bool = False
               ) -> tuple[tuple[GroupPlan, ...], dict[str, GroupLock]]:
    """Lock every incomplete date group, then drop those another run completed meanwhile.

    Locks are taken in date-group order, all or none, so two runs on one root never deadlock.
    Once a group's lock is held, whatever an interrupted run left next to it is removed, and its
    work directory is made ready: kept when it holds checkpoints of the same fingerprint (they
    are resumed), removed when it belongs to another one (or ``overwrite``).

    Args:
        plan: the run plan (its ``todo`` groups are claimed).
        root: the output root holding the groups and their locks.
        overwrite: redo groups even if complete or checkpointed (``output.overwrite``).

    Returns:
        The groups still to do (``chips_checkpointed`` up to date) and their locks.

    Raises:
        ConfigError: another run holds a group's lock (names the group and the lock file).
    """
    locks: dict[str, GroupLock] = {}
    try:
        for g in plan.todo:
            locks[g.group.id] = claim(root, g.group.id, g.out_dir)
    except BaseException:
        release_all(root, locks)
        raise
    tidy_complete(plan, root)
    todo = []
    publisher = publisher_for(root)
    for g in plan.todo:
        if not overwrite and root.is_complete(g.out_dir, g.fingerprint):
            log.info("date group %s was completed by another run meanwhile: skipped", g.group.id)
            release(root, locks.pop(g.group.id))
            continue
        if removed := publisher.remove_leftovers(root, g.out_dir):
            log.info("date group %s: removed %d leftover staging entr%s of an interrupted run",
                     g.group.id, removed, "y" if removed == 1 else "ies")
        if overwrite:
            root.storage.delete_tree(g.work_dir)
        done = checkpoint.prepare_work_dir(root, g.work_dir, g.fingerprint, g.group.id)
        if done:
            log.info("date group %s: resuming from %d chip checkpoint(s)", g.group.id, done)
        todo.append(replace(g, chips_checkpointed=done))
    return tuple(todo), locks


def tidy_complete(plan: RunPlan, root: OutputRoot) -> None:
    """Remove what a run killed right after publishing left of complete groups: its lock, work
    directory or replaced outputs. A group whose lock a live run holds is left alone."""
    publisher = publisher_for(root)
    for g in plan.groups:
        if not g.complete or not (root.storage.exists(lock_path(g.out_dir)) or root.storage.exists(g.work_dir)):
            continue
        try:
            lock = claim(root, g.group.id, g.out_dir)
        except ConfigError:
            continue
        try:
            root.storage.delete_tree(g.work_dir)
            publisher.remove_leftovers(root, g.out_dir)
            log.info("date group %s: tidied what an interrupted run left of it", g.group.id)
        finally:
            release(root, lock)


def iter_chip_tasks(cfg: RunConfig, group: DateGroup) -> Iterator[ChipTask]:
    """The group's chip tasks, streamed (never a list of millions)."""
    return plan_chip_tasks(group, chip_bands(cfg), spatial_overlap=cfg.chip.spatial_overlap)


def describe(plan: RunPlan) -> str:
    """The dry-run report: one line per date group and a total."""
    lines = [f"run {plan.run_key} for region {plan.region.name}: {len(plan.groups)} date group(s) -> {plan.collection_dir}"]
    for g in plan.groups:
        n = g.n_chips if g.n_chips is not None else 0
        if g.complete:
            state = "complete (published)"
        else:
            state = f"{min(g.chips_checkpointed, n)}/{n} chips checkpointed" if g.chips_checkpointed else "to do"
        lines.append(
            f"  {g.group.id}: {len(g.group.items)} item(s) [{', '.join(i.id for i in g.group.items)}], "
            f"{n} chips, {g.area_km2:,.1f} km², EPSG:{g.group.grid.epsg}: {state}"
        )
    todo = plan.todo
    remaining = sum(max((g.n_chips or 0) - g.chips_checkpointed, 0) for g in todo)
    lines.append(f"to do: {len(todo)} date group(s), {remaining} chips to segment")
    return "\n".join(lines)
