"""Ray Data wiring only: chip tasks -> reads -> SAM actors -> cross-chip merge -> merged rows.

Every stage here is a thin wrapper over a plain function that tests also call without Ray:
:func:`raysam.read.read_chip`, :class:`raysam.sam.AutomaticMaskGenerator`,
:func:`raysam.records.chip_mask_rows` and :func:`raysam.records.merge_cell_rows`. Dense masks
never cross an operator: the SAM stage emits bit-packed mask crops (MaskRecord rows).

Fault tolerance is set here, deliberately (:func:`configure_retries`): lost workers and nodes
are retried and SAM actors restarted without limit, transient I/O errors in our code are
retried a bounded number of times, raysam's own errors fail at once. Every process that runs
our code reports its peak memory to the run's :class:`RunStats` actor, which also measures
object-store spilling; the driver puts that report in each manifest (``counts.resources``).
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import resource
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import ray

from raysam import records
from raysam.config import MergeConfig, RayConfig, RunConfig

log = logging.getLogger(__name__)

STATS_ACTOR = "raysam-run-stats"
# Test and demo knob: seconds each SAM actor sleeps per chip (default 0). Fault-injection tests
# set it so that "mid-run" (a node removed, an actor killed) is a wide window, not a race.
SAM_CHIP_DELAY_ENV = "RAYSAM_SAM_CHIP_DELAY_S"
# Exceptions from our code that another attempt can cure: transient I/O that escaped
# raysam.read's own bounded retries (sockets, timeouts, GDAL/rasterio I/O). Ray Data matches
# each pattern against "module.Class: message" of the error, after its wrapper
# "UserCodeException: UDF failed to process a data block." (ray.data._internal.util
# iterate_with_retry). The class name is anchored there, so raysam's ConfigError, DataError
# and ModelError never match, even when their message quotes one of these names: they fail on
# the first attempt with their own one line. FileNotFoundError (an OSError) is permanent and
# is not listed.
TRANSIENT_ERRORS = (
    "OSError", "IOError", "ConnectionError", "ConnectionResetError", "ConnectionAbortedError",
    "ConnectionRefusedError", "BrokenPipeError", "TimeoutError", "RasterioIOError", "CPLE_HttpResponseError",
    "RemoteDisconnected", "IncompleteRead", "ProtocolError", "ReadTimeout", "ReadTimeoutError",
)
TRANSIENT_ERROR_PATTERN = (
    r"^(?:[\w.]*UserCodeException: UDF failed to process a data block\. )?(?:\w+\.)*(?:"
    + "|".join(TRANSIENT_ERRORS) + r")(?::|$)"
)
# Heap a chip read needs beyond its worker's baseline: 4 bands of 1024 x 1024 (DN, reflectance
# float32, masks) plus GDAL's warp buffers, ~100 MB; reserved so that many concurrent reads
# cannot oversubscribe a node's memory. Differing from the SAM stage's reservation, it also
# keeps Ray Data from fusing the reads into the SAM actors (which it does for operators with
# equal resources), so chips are read by CPU tasks while the actors segment.
READ_TASK_MEMORY_BYTES = 256 * 1024**2


def configure_retries(ctx: Any, ray_cfg: RayConfig) -> None:
    """Set Ray Data's fault tolerance deliberately, not by defaults.

    Two kinds of failure, two policies:

    * **Lost processes and nodes** (preemption, OOM kill, a SIGKILLed actor): Ray Data's own
      settings for its operators, which we keep: map tasks ``max_retries=-1``, SAM actors
      ``max_restarts=-1`` and ``max_task_retries=-1`` (``ray.data._internal.remote_fn`` and
      ``ActorPoolMapOperator._apply_default_remote_args``), with ``RaySystemError`` added to
      ``retry_exceptions``; lost blocks are rebuilt from lineage. Unbounded, because on
      preemptible nodes the number of losses grows with the length of the run, and these
      count only process deaths, never an exception raised by our code. Ray 2.60 deprecates
      passing ``max_retries``/``max_restarts`` through ``map_batches``, so we do not.
      A SAM actor whose constructor fails is not replaced (``max_consecutive_actor_init_deaths``
      0): Ray Data counts a ModelError raised there as an actor death, and replacing the actor
      would load a bad model again; the driver has verified the model files before Ray starts.
    * **Exceptions in our code**: retried in the task (or actor) that raised them, only when
      they match :data:`TRANSIENT_ERROR_PATTERN`, at most ``ray.max_task_retries`` times with
      Ray Data's jittered exponential backoff (``retried_map_errors``/``max_map_retries``,
      which apply to task and actor UDFs alike). ``actor_task_retry_on_errors`` (Ray core's
      ``retry_exceptions`` on actor tasks) stays off: it would be bounded by the actors'
      unbounded ``max_task_retries``, and would re-run the whole task on any actor. Errors in
      the model constructor are not retried in place (``actor_init_retry_on_errors``): a bad
      model fails the run with its ModelError. No block may fail silently
      (``max_errored_blocks=0``).
    """
    ctx.retried_map_errors = [TRANSIENT_ERROR_PATTERN]
    ctx.max_map_retries = ray_cfg.max_task_retries
    ctx.actor_task_retry_on_errors = False
    ctx.actor_init_retry_on_errors = False
    ctx.max_consecutive_actor_init_deaths = 0
    ctx.max_errored_blocks = 0


def memory_mb() -> tuple[float, float]:
    """This process's (peak RSS, current private RSS) in MB, from ``/proc/self/status`` (Linux).

    Peak RSS is ``VmHWM``: it counts the pages of Ray's shared-memory object store that the
    process has touched (``RssShmem``), which grow with the number of objects it has written
    until they reach the store's size. Private RSS is ``VmRSS - RssShmem``: the process's own
    heap, stacks and libraries, where a leak would show. Elsewhere both are ``ru_maxrss``.
    """
    fields: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssShmem"):
                    fields[key] = int(value.split()[0])  # kB
    except OSError:
        pass
    if "VmHWM" not in fields:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1024**2
        return peak, peak
    return fields["VmHWM"] / 1024, (fields.get("VmRSS", 0) - fields.get("RssShmem", 0)) / 1024


def _process_info(role: str) -> tuple[str, int, str, float, float]:
    """(role, pid, node id, peak RSS MB, private RSS MB) of the calling process (:meth:`RunStats.process_peak`).

    Sent after every chip (reads, SAM) and merge batch, so the highest private RSS seen is the
    process's private peak between chips, sampled once per chip.
    """
    return (role, os.getpid(), ray.get_runtime_context().get_node_id(), *memory_mb())


def with_driver_memory(summary: dict[str, Any]) -> dict[str, Any]:
    """Add the calling (driver) process's peak and current private RSS to a :meth:`RunStats.summary`.

    The driver's peak is ``VmHWM`` of its own process image, unlike ``ru_maxrss``, which a
    process started by fork and exec inherits from a larger parent.
    """
    peak, private = memory_mb()
    summary["resources"]["peak_rss_mb"]["driver"] = round(peak, 1)
    summary["resources"]["peak_private_mb"]["driver"] = round(private, 1)
    return summary


def object_store_totals() -> dict[str, int]:
    """The cluster's cumulative object-store spill/restore totals (bytes and objects).

    Ray has no public API for these; this asks a raylet for the global memory info as
    ``ray memory --stats-only`` does. Returns an empty dict if that private API changes.
    """
    try:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    except Exception as err:  # noqa: BLE001 - a report, never a reason to fail the run
        log.warning("object-store spill statistics unavailable: %s", err)
        return {}
    s = reply.store_stats
    return {"spilled_bytes": int(s.spilled_bytes_total), "spilled_objects": int(s.spilled_objects_total),
            "restored_bytes": int(s.restored_bytes_total)}


# Pinned to the head node (which a preemptible cluster never loses): the counters must
# outlive any worker node. A local Ray's only node is its head.
@ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001})
class RunStats:
    """Idempotent per-chip counters (keyed by chip, so retried tasks never double count),
    model loads, the peak memory of every process that ran our code, and spilled bytes."""

    def __init__(self) -> None:
        self.read: dict[str, set] = {}
        self.skipped: dict[str, dict] = {}
        self.masks: dict[str, dict] = {}
        self.prompts: dict[str, dict] = {}
        self.seconds: dict[str, float] = {}
        self.model_loads: list[tuple[int, str]] = []
        self.processes: dict[int, dict] = {}
        self.store_at_start = object_store_totals()

    def chip_read(self, group_id: str, chip: str, seconds: float, proc: tuple | None = None) -> None:
        self.read.setdefault(group_id, set()).add(chip)
        self.seconds["read"] = self.seconds.get("read", 0.0) + seconds
        if proc:
            self.process_peak(*proc)

    def chip_skipped(self, group_id: str, chip: str, reason: str, proc: tuple | None = None) -> None:
        self.skipped.setdefault(group_id, {})[chip] = reason
        if proc:
            self.process_peak(*proc)

    def chip_masks(self, group_id: str, chip: str, count: int, seconds: float, proc: tuple | None = None,
                   prompts: int = 0) -> None:
        self.masks.setdefault(group_id, {})[chip] = count
        self.prompts.setdefault(group_id, {})[chip] = prompts
        self.seconds["sam"] = self.seconds.get("sam", 0.0) + seconds
        if proc:
            self.process_peak(*proc)

    def model_loaded(self, pid: int, node_id: str) -> None:
        self.model_loads.append((pid, node_id))

    def process_peak(self, role: str, pid: int, node_id: str, rss_mb: float, private_mb: float) -> None:
        """Keep the highest peak and private RSS seen for a process, and every role it played."""
        entry = self.processes.setdefault(
            pid, {"pid": pid, "node_id": node_id, "roles": [], "peak_rss_mb": 0.0, "peak_private_mb": 0.0})
        if role not in entry["roles"]:
            entry["roles"].append(role)
        entry["peak_rss_mb"] = max(entry["peak_rss_mb"], round(rss_mb, 1))
        entry["peak_private_mb"] = max(entry["peak_private_mb"], round(private_mb, 1))

    def chips_done(self) -> int:
        """Chips through the SAM stage so far (all date groups)."""
        return sum(len(m) for m in self.masks.values())

    def sam_pids(self) -> list[int]:
        """Process ids of the SAM actors that loaded a model, in load order."""
        return [pid for pid, _ in self.model_loads]

    def resources(self) -> dict[str, Any]:
        """Run-level resource report: model loads, peak memory per role and process, spilling.

        ``peak_private_mb`` is the figure that must stay flat as regions grow;
        ``peak_rss_mb`` also counts the object-store pages a process touched (shared, capped
        by the store's size). See :func:`memory_mb`.
        """
        self.process_peak(*_process_info("stats"))
        end = object_store_totals()
        return {
            "sam_model_loads": len(self.model_loads),
            "peak_private_mb": self._by_role("peak_private_mb"),
            "peak_rss_mb": self._by_role("peak_rss_mb"),
            "processes": sorted(self.processes.values(), key=lambda e: e["pid"]),
            "object_store": {k: end[k] - self.store_at_start.get(k, 0) for k in end},
        }

    def _by_role(self, key: str) -> dict[str, float]:
        by_role: dict[str, float] = {}
        for entry in self.processes.values():
            for role in entry["roles"]:
                by_role[role] = max(by_role.get(role, 0.0), entry[key])
        return dict(sorted(by_role.items()))

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
            "decoder_prompts": int(sum(self.prompts.get(group_id, {}).values())),
            "resources": self.resources(),
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


def read_stage(batch: dict[str, np.ndarray], scaling: dict, signer_cfg: Any, max_cloud_fraction: float,
               network: Any = None) -> dict:
    """Chip tasks -> chip pixels (RGB uint8 + valid mask); skipped chips are counted, not emitted."""
    import time

    from raysam.read import read_chip

    stats = ray.get_actor(STATS_ACTOR)
    signer = _signer(signer_cfg)
    out: dict[str, list] = {"task": [], "rgb": [], "valid_bits": []}
    for blob in batch["task"]:
        task = pickle.loads(blob)
        t0 = time.perf_counter()
        result = read_chip(task, signer=signer, scaling=scaling[task.date_group_id], max_cloud_fraction=max_cloud_fraction,
                           network=network)
        chip = records.chip_key(task.chip_id)
        if getattr(result, "rgb", None) is None:
            stats.chip_skipped.remote(task.date_group_id, chip, result.reason, _process_info("read"))
            continue
        stats.chip_read.remote(task.date_group_id, chip, time.perf_counter() - t0, _process_info("read"))
        out["task"].append(blob)
        out["rgb"].append(result.rgb)
        out["valid_bits"].append(np.packbits(result.valid & ~result.cloud))
    if not out["task"]:
        return {"task": np.empty(0, object), "rgb": np.empty((0, 1, 1, 3), np.uint8), "valid_bits": np.empty((0, 1), np.uint8)}
    tasks = np.empty(len(out["task"]), object)
    tasks[:] = out["task"]
    return {"task": tasks, "rgb": np.stack(out["rgb"]), "valid_bits": np.stack(out["valid_bits"])}


class SamStage:
    """Actor: loads the ONNX encoder and decoder once, runs the chip generator, emits MaskRecords.

    Each model load is reported to :class:`RunStats` (pid, node), so a restarted actor shows
    as one more load. ``RAYSAM_SAM_CHIP_DELAY_S`` (:data:`SAM_CHIP_DELAY_ENV`) makes it sleep
    that long per chip: a throttle for fault-injection tests, 0 by default.
    """

    def __init__(self, model_source: records.ModelSource, amg_params: dict, device: str):
        from raysam.sam import AutomaticMaskGenerator, load_model

        self.model = load_model(model_source.materialise(), device=device)
        self.generator = AutomaticMaskGenerator(self.model, **amg_params)
        self.delay_s = float(os.environ.get(SAM_CHIP_DELAY_ENV) or 0.0)
        self.stats = ray.get_actor(STATS_ACTOR)
        ray.get(self.stats.model_loaded.remote(os.getpid(), ray.get_runtime_context().get_node_id()))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import time

        rows: list[dict] = []
        for blob, rgb, valid_bits in zip(batch["task"], batch["rgb"], batch["valid_bits"], strict=True):
            task = pickle.loads(blob)
            t0 = time.perf_counter()
            valid = np.unpackbits(valid_bits, count=rgb.shape[0] * rgb.shape[1]).reshape(rgb.shape[:2]).astype(bool)
            masks = self.generator.generate_compact(rgb, valid)
            chip_rows = records.chip_mask_rows(task, masks, valid)
            time.sleep(self.delay_s)
            self.stats.chip_masks.remote(task.date_group_id, records.chip_key(task.chip_id), len(chip_rows),
                                         time.perf_counter() - t0, _process_info("sam"), masks.n_prompts)
            rows.extend(chip_rows)
        return records.rows_to_columns(rows)


def sam_records(groups: dict, cfg: RunConfig, scaling: dict, model_source: records.ModelSource) -> ray.data.Dataset:
    """Chip rows -> chip tasks -> chip reads (CPU tasks) -> SAM (actor pool) -> MaskRecords, materialised.

    The records are compact (bit-packed crops) and the merge needs all of them anyway, so they
    are materialised once in the object store; the merge (and, rarely, its wider second pass)
    reads them from there.
    """
    return sam_dataset(groups, cfg, scaling, model_source).materialize()


def sam_dataset(groups: dict, cfg: RunConfig, scaling: dict, model_source: records.ModelSource) -> ray.data.Dataset:
    """The lazy chain behind :func:`sam_records`, with the retry policy set (:func:`configure_retries`)."""
    ctx = ray.data.DataContext.get_current()
    configure_retries(ctx, cfg.ray)
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
        fn_kwargs={"scaling": scaling, "signer_cfg": cfg.stac, "max_cloud_fraction": cfg.chip.max_cloud_fraction,
                   "network": cfg.network},
        memory=READ_TASK_MEMORY_BYTES,
        compute=ray.data.TaskPoolStrategy(size=cfg.ray.read_concurrency),
    )
    pool = ray.data.ActorPoolStrategy(min_size=cfg.ray.sam_actors, max_size=cfg.ray.sam_actors_max or cfg.ray.sam_actors)
    ds = ds.map_batches(
        SamStage,
        batch_size=1,
        compute=pool,
        num_gpus=cfg.ray.gpus_per_actor,
        num_cpus=cfg.ray.cpus_per_actor,
        fn_constructor_kwargs={"model_source": model_source, "amg_params": asdict(cfg.amg), "device": cfg.device},
    )
    return ds


def expand_stage(batch: dict[str, np.ndarray], grids: dict[str, records.GridInfo]) -> dict[str, np.ndarray]:
    """:func:`raysam.records.expand_to_cells`, reporting this process's peak memory."""
    out = records.expand_to_cells(batch, grids)
    _report_peak("merge")
    return out


def merge_stage(batch: dict[str, np.ndarray], merge_params: dict,
                grids: dict[str, records.GridInfo]) -> dict[str, np.ndarray]:
    """:func:`raysam.records.merge_cell_batch`, reporting this process's peak memory.

    The report is awaited, so it is in :class:`RunStats` before the sorted rows reach the driver.
    """
    out = records.merge_cell_batch(batch, merge_params, grids)
    _report_peak("merge")
    return out


def _report_peak(role: str) -> None:
    """Send this process's peak memory to the run's :class:`RunStats`, if a run is on."""
    try:
        stats = ray.get_actor(STATS_ACTOR)
    except ValueError:  # the merge used on its own (tests, notebooks): nothing to report to
        return
    ray.get(stats.process_peak.remote(*_process_info(role)))


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
    ds = mask_records.map_batches(expand_stage, batch_format="numpy", fn_kwargs={"grids": grids})
    ds = ds.groupby(["date_group_id", "cell_row", "cell_col"], num_partitions=max(1, min(n_cells, 64))).map_groups(
        merge_stage, batch_format="numpy", fn_kwargs={"merge_params": merge_params, "grids": grids}
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
