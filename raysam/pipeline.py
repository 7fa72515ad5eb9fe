"""Ray Data wiring only: chip tasks -> reads -> SAM actors -> cross-chip merge -> merged rows.

Every stage here is a thin wrapper over a plain function that tests also call without Ray:
:func:`raysam.read.read_chip`, :class:`raysam.sam.AutomaticMaskGenerator`,
:func:`raysam.records.chip_mask_rows` and :func:`raysam.records.merge_cell_rows`. Dense masks
never cross an operator: the SAM stage emits bit-packed mask crops (MaskRecord rows).
"""

from __future__ import annotations

import functools
import logging
import pickle
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import ray

from raysam import records
from raysam.config import MergeConfig, RunConfig

log = logging.getLogger(__name__)

STATS_ACTOR = "raysam-run-stats"


@ray.remote(num_cpus=0)
class RunStats:
    """Idempotent per-chip counters (keyed by chip, so retried tasks never double count)."""

    def __init__(self) -> None:
        self.read: dict[str, set] = {}
        self.skipped: dict[str, dict] = {}
        self.masks: dict[str, dict] = {}
        self.seconds: dict[str, float] = {}

    def chip_read(self, group_id: str, chip: str, seconds: float) -> None:
        self.read.setdefault(group_id, set()).add(chip)
        self.seconds["read"] = self.seconds.get("read", 0.0) + seconds

    def chip_skipped(self, group_id: str, chip: str, reason: str) -> None:
        self.skipped.setdefault(group_id, {})[chip] = reason

    def chip_masks(self, group_id: str, chip: str, count: int, seconds: float) -> None:
        self.masks.setdefault(group_id, {})[chip] = count
        self.seconds["sam"] = self.seconds.get("sam", 0.0) + seconds

    def summary(self, group_id: str) -> dict[str, Any]:
        skipped = self.skipped.get(group_id, {})
        reasons: dict[str, int] = {}
        for reason in skipped.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        return {
            "chips_read": len(self.read.get(group_id, ())),
            "chips_skipped": len(skipped),
            "chips_skipped_by_reason": reasons,
            "masks_before_merge": int(sum(self.masks.get(group_id, {}).values())),
        }

    def stage_seconds(self) -> dict[str, float]:
        return dict(self.seconds)


def plan_stage(batch: dict[str, np.ndarray], groups: dict, bands: tuple[str, ...], spatial_overlap: float) -> dict:
    """(date group, chip row) -> that row's chip tasks, so the driver never holds the chip list."""
    from raysam.grid import plan_chip_tasks

    blobs = [
        pickle.dumps(task)
        for gid, row in zip(batch["date_group_id"], batch["chip_row"], strict=True)
        for task in plan_chip_tasks(groups[str(gid)], bands, spatial_overlap=spatial_overlap, rows=[int(row)])
    ]
    tasks = np.empty(len(blobs), object)
    tasks[:] = blobs
    return {"task": tasks}


@functools.lru_cache(maxsize=4)
def _signer(stac_cfg: Any) -> Any:
    """One href signer per worker process, so signed tokens are reused across chips."""
    from raysam.stac import make_href_signer

    return make_href_signer(stac_cfg)


def read_stage(batch: dict[str, np.ndarray], scaling: dict, signer_cfg: Any, max_cloud_fraction: float) -> dict:
    """Chip tasks -> chip pixels (RGB uint8 + valid mask); skipped chips are counted, not emitted."""
    import time

    from raysam.read import read_chip

    stats = ray.get_actor(STATS_ACTOR)
    signer = _signer(signer_cfg)
    out: dict[str, list] = {"task": [], "rgb": [], "valid_bits": []}
    for blob in batch["task"]:
        task = pickle.loads(blob)
        t0 = time.perf_counter()
        result = read_chip(task, signer=signer, scaling=scaling[task.date_group_id], max_cloud_fraction=max_cloud_fraction)
        chip = records.chip_key(task.chip_id)
        if getattr(result, "rgb", None) is None:
            stats.chip_skipped.remote(task.date_group_id, chip, result.reason)
            continue
        stats.chip_read.remote(task.date_group_id, chip, time.perf_counter() - t0)
        out["task"].append(blob)
        out["rgb"].append(result.rgb)
        out["valid_bits"].append(np.packbits(result.valid & ~result.cloud))
    if not out["task"]:
        return {"task": np.empty(0, object), "rgb": np.empty((0, 1, 1, 3), np.uint8), "valid_bits": np.empty((0, 1), np.uint8)}
    tasks = np.empty(len(out["task"]), object)
    tasks[:] = out["task"]
    return {"task": tasks, "rgb": np.stack(out["rgb"]), "valid_bits": np.stack(out["valid_bits"])}


class SamStage:
    """Actor: loads the ONNX encoder and decoder once, runs the chip generator, emits MaskRecords."""

    def __init__(self, model_source: records.ModelSource, amg_params: dict, device: str):
        from raysam.sam import AutomaticMaskGenerator, load_model

        self.model = load_model(model_source.materialise(), device=device)
        self.generator = AutomaticMaskGenerator(self.model, **amg_params)
        self.stats = ray.get_actor(STATS_ACTOR)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import time

        rows: list[dict] = []
        for blob, rgb, valid_bits in zip(batch["task"], batch["rgb"], batch["valid_bits"], strict=True):
            task = pickle.loads(blob)
            t0 = time.perf_counter()
            masks = self.generator.generate_compact(rgb)
            valid = np.unpackbits(valid_bits, count=rgb.shape[0] * rgb.shape[1]).reshape(rgb.shape[:2]).astype(bool)
            chip_rows = records.chip_mask_rows(task, masks, valid)
            self.stats.chip_masks.remote(task.date_group_id, records.chip_key(task.chip_id), len(chip_rows),
                                         time.perf_counter() - t0)
            rows.extend(chip_rows)
        return records.rows_to_columns(rows)


def sam_records(groups: dict, cfg: RunConfig, scaling: dict, model_source: records.ModelSource) -> ray.data.Dataset:
    """Chip rows -> chip tasks -> chip reads (CPU tasks) -> SAM (actor pool) -> MaskRecords, materialised.

    The records are compact (bit-packed crops) and the merge needs all of them anyway, so they
    are materialised once in the object store; the merge (and, rarely, its wider second pass)
    reads them from there.
    """
    ctx = ray.data.DataContext.get_current()
    ctx.max_map_retries = cfg.ray.max_task_retries  # task retries after worker/node loss
    ctx.actor_task_retry_on_errors = False  # errors in our own code fail fast, with their message
    ctx.enable_progress_bars = True

    from raysam.grid import chip_rows
    from raysam.plan import chip_bands

    overlap = cfg.chip.spatial_overlap
    rows = [{"date_group_id": gid, "chip_row": r} for gid, g in groups.items() for r in range(chip_rows(g.grid, spatial_overlap=overlap))]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 1000)))
    ds = ds.map_batches(
        plan_stage, batch_size=1, num_cpus=0.25,
        fn_kwargs={"groups": groups, "bands": chip_bands(cfg), "spatial_overlap": overlap},
    )
    ds = ds.map_batches(
        read_stage,
        batch_size=1,
        num_cpus=cfg.ray.read_cpus,
        fn_kwargs={"scaling": scaling, "signer_cfg": cfg.stac, "max_cloud_fraction": cfg.chip.max_cloud_fraction},
        max_retries=cfg.ray.max_task_retries,
        **({"concurrency": cfg.ray.read_concurrency} if cfg.ray.read_concurrency else {}),
    )
    pool = ray.data.ActorPoolStrategy(min_size=cfg.ray.sam_actors, max_size=cfg.ray.sam_actors_max or cfg.ray.sam_actors)
    ds = ds.map_batches(
        SamStage,
        batch_size=1,
        compute=pool,
        num_gpus=cfg.ray.gpus_per_actor,
        num_cpus=cfg.ray.cpus_per_actor,
        fn_constructor_kwargs={"model_source": model_source, "amg_params": asdict(cfg.amg), "device": cfg.device},
        max_restarts=-1,
        max_task_retries=cfg.ray.max_task_retries,
    )
    return ds.materialize()


def merged_records(mask_records: ray.data.Dataset, merge: MergeConfig, grids: dict[str, records.GridInfo]) -> ray.data.Dataset:
    """The spatial reduce: replicate records into merge cells, merge each cell, sort by group and uid.

    Rows come back with ``status`` ``kept`` or ``unresolved`` (see :func:`resolve_unresolved`).
    """
    ctx = ray.data.DataContext.get_current()
    # The reduce groups rows by (date group, cell) with a hash shuffle: pinned, not left to defaults,
    # with as many partitions as there are cells (capped), not Ray's default 200.
    ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.HASH_SHUFFLE
    n_cells = sum(g.n_cells for g in grids.values())
    merge_params = {"mask_nms_thr": merge.mask_nms_thr, "iou_mode": merge.iou_mode}
    ds = mask_records.map_batches(records.expand_to_cells, batch_format="numpy", fn_kwargs={"grids": grids})
    ds = ds.groupby(["date_group_id", "cell_row", "cell_col"], num_partitions=max(1, min(n_cells, 64))).map_groups(
        records.merge_cell_batch, batch_format="numpy", fn_kwargs={"merge_params": merge_params, "grids": grids}
    )
    return ds.sort(["date_group_id", "uid"])


def resolve_unresolved(mask_records: ray.data.Dataset, group_id: str, pending_uids: list[str], merge: MergeConfig,
                       grid: records.GridInfo) -> set[str]:
    """Which of a date group's ``unresolved`` records the merge keeps (rare: long link chains).

    Reads the group's records back from the materialised dataset and widens the halo until the
    decisions are exact (:func:`raysam.merge.resolve_pending`).
    """
    from ray.data.expressions import col

    from raysam.merge import MaskTable, resolve_pending

    log.warning("date group %s: %d merge decisions outgrew the halo; widening it", group_id, len(pending_uids))
    rows = mask_records.filter(expr=col("date_group_id") == group_id).to_pandas()
    batch = {c: rows[c].to_numpy() for c in rows.columns}
    batch["mask_bits"] = [np.frombuffer(b, np.uint8).reshape(int(bx[3] - bx[1] + 1), -1)
                          for b, bx in zip(batch["mask_bits"], batch["box_xyxy"], strict=True)]
    kept = resolve_pending(MaskTable.from_batch(batch), np.asarray(pending_uids), grid.cell_px, grid.chip_px,
                           (grid.height, grid.width), mask_nms_thr=merge.mask_nms_thr, iou_mode=merge.iou_mode)
    return {str(u) for u in kept}


def model_source_for(cfg: RunConfig, model_dir: Path) -> records.ModelSource:
    """Ship the model by path when every worker sees it (local Ray), else by bytes."""
    return records.ModelSource.from_path(model_dir, ship_bytes=cfg.ray.address is not None)
