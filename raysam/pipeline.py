"""Ray Data wiring of the front half: chip rows -> chip tasks, read -> SAM actors -> checkpoints.

Each stage wraps a plain function that tests also call without Ray
(:func:`raysam.grid.plan_chip_tasks`, :func:`raysam.read.read_chip`,
:class:`raysam.sam.AutomaticMaskGenerator`, :func:`raysam.records.chip_records`,
:func:`raysam.checkpoint.write_shard`). A SAM actor checkpoints every chip's MaskRecords itself
as soon as the chip is segmented, and reports it to :class:`~raysam.runstats.RunStats`; what leaves
the pipeline is one tiny row per chip. Dense masks and records never cross an operator. On a
re-run, the read stage skips chips whose checkpoint is valid.

Fault tolerance is set here, deliberately (:func:`configure_retries`): lost workers and nodes
are retried and SAM actors restarted without limit, transient I/O errors in our code are
retried a bounded number of times, raysam's own errors fail at once.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import ray

from raysam import checkpoint, records
from raysam.config import RayConfig, RunConfig
from raysam.grid import DEFAULT_CHIP_SIZE
from raysam.layout import GroupSpec
from raysam.model_source import ModelSource
from raysam.preflight import READ_TASK_MEMORY_BYTES
from raysam.runstats import process_info, reset_peak, run_stats
from raysam.tasks import worker_signer

# Test and demo knob: seconds each SAM actor sleeps per chip (default 0). Fault-injection tests
# set it so that "mid-run" (a node removed, an actor killed) is a wide window, not a race.
SAM_CHIP_DELAY_ENV = "RAYSAM_SAM_CHIP_DELAY_S"
SAM_NICE_STEP = 4  # SAM actors run this much nicer than other workers: reads and a finished group's back half go first
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
# Chips per block out of the read stage (configure_blocks). Ray Data's default block is 128 MB:
# a whole chip row of a wide region, up to ~40 chips, which the read worker holds twice while it
# builds the block and the SAM actor once, so their memory grew with the region's width
# (bench_scale: read 1.37x the demo's, whose rows are 4 chips; 1.25x with 8-chip blocks).
# Smaller blocks cost the driver (Ray Data's executor) more: 4.5 % of the run's CPU with 4.
READ_BLOCK_CHIPS = 8
# How far the reads may run ahead of the SAM actors: read blocks per actor (bound_read_ahead).
# Unbounded (Ray Data's budget is half the object store), the reads of every group ran first:
# the demo at spatial_overlap 0.93 read all 160 chips in its first 14 s, while the SAM actor,
# nicer than the reads, took 1.5-2.5 s a chip instead of 0.7; and the next group's reads
# held back the current group's SAM, merge and publish.
READ_AHEAD_BLOCKS_PER_ACTOR = 8
# A read task reserves READ_TASK_MEMORY_BYTES (raysam.preflight, which checks that a node has room
# for it). Differing from the SAM stage's reservation, it also keeps Ray Data from fusing the reads
# into the SAM actors (which it does for operators with equal resources), so chips are read by
# CPU tasks while the actors segment.


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


def plan_row(spec: GroupSpec, row: int, resume: bool, stats: Any) -> list:
    """The chip tasks of one chip row of a date group, less the chips of a resumed group whose
    checkpoint is valid (reported to ``stats`` as resumed); the row is reported as planned."""
    from raysam.grid import plan_chip_tasks

    reset_peak()
    tasks = list(plan_chip_tasks(spec.group, spec.chip_bands, spec.chip_px, spec.spatial_overlap, rows=[row]))
    todo = []
    for task in tasks:
        outcome = checkpoint.resume_outcome(spec.root, spec.work_dir, task.chip_id, spec.fingerprint,
                                            spec.group.id) if resume else None
        if outcome is None:
            todo.append(task)
        else:
            stats.chip_resumed.remote(spec.group.id, records.chip_key(task.chip_id), asdict(outcome))
    stats.row_planned.remote(spec.group.id, row, len(tasks), process_info("read"))  # planned by the read task
    return todo


@functools.lru_cache(maxsize=16)
def _resolved(ref: ray.ObjectRef) -> Any:
    return ray.get(ref)


def _scaling(spec: Any) -> Any:
    """A group's scaling: as given, or the result of the task computing it (once per worker)."""
    return _resolved(spec) if isinstance(spec, ray.ObjectRef) else spec


def read_one(task: Any, shard: checkpoint.ShardTarget, scaling: Any, signer: Any, max_cloud_fraction: float,
             network: Any, stats: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """One chip's pixels, (RGB uint8, valid mask), reported to ``stats`` as read; None for a chip
    skipped (cloud, no data), which is checkpointed as skipped with its reason."""
    from raysam.read import read_chip

    reset_peak()
    t0 = time.perf_counter()
    result = read_chip(task, signer=signer, scaling=scaling, max_cloud_fraction=max_cloud_fraction, network=network)
    chip = records.chip_key(task.chip_id)
    if getattr(result, "rgb", None) is None:
        shard.write(checkpoint.ChipOutcome(tuple(task.chip_id), checkpoint.SKIPPED, result.reason), records.empty_records())
        stats.chip_skipped.remote(task.date_group_id, chip, result.reason, time.perf_counter() - t0, process_info("read"))
        return None
    stats.chip_read.remote(task.date_group_id, chip, time.perf_counter() - t0, process_info("read"))
    return result.rgb, result.valid & ~result.cloud


def read_stage(batch: dict[str, np.ndarray], specs: Mapping[str, GroupSpec], resume: Mapping[str, bool],
               scaling: dict, signer_cfg: Any, max_cloud_fraction: float, network: Any = None) -> Iterator[dict]:
    """(date group, chip row) -> that row's chips, one at a time: planned (:func:`plan_row`, so the
    driver never holds the chip list) and read (:func:`read_one`), each yielded as the task
    (pickled), its RGB uint8 and its bit-packed valid mask. Chips skipped for cloud or no data
    yield nothing."""
    stats = run_stats()
    signer = worker_signer(signer_cfg)
    for gid, row in zip(batch["date_group_id"], batch["chip_row"], strict=True):
        spec = specs[str(gid)]
        for task in plan_row(spec, int(row), resume[str(gid)], stats):
            pixels = read_one(task, spec.shards, _scaling(scaling[spec.group.id]), signer, max_cloud_fraction,
                              network, stats)
            if pixels is not None:
                blob = np.empty(1, object)
                blob[0] = pickle.dumps(task)
                yield {"task": blob, "rgb": pixels[0][None], "valid_bits": np.packbits(pixels[1])[None]}


def lower_cpu_priority(by: int, this_thread_only: bool = False) -> None:
    """Raise the niceness of every thread of this process (or only the calling thread's) by ``by``,
    at most to 19; threads started later inherit it. SAM saturates whatever CPUs it gets; without
    this the light tasks that share its node (chip reads, merges, sink tiles: Ray starts every
    worker at niceness 15) wait behind it and a finished date group publishes late. Where niceness
    cannot be changed it stays as it is."""
    try:
        tids = [0] if this_thread_only else [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]  # not Linux: the calling thread (the process, elsewhere)
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
        except OSError:
            pass


class ChipSegmenter:
    """Segments chips with a loaded generator and checkpoints each chip's MaskRecords at once.

    ``RAYSAM_SAM_CHIP_DELAY_S`` (:data:`SAM_CHIP_DELAY_ENV`) makes it sleep that long per chip: a
    throttle for fault-injection tests, 0 by default.
    """

    def __init__(self, generator: Any, shards: Mapping[str, checkpoint.ShardTarget], stats: Any):
        self.generator, self.shards, self.stats = generator, shards, stats
        self.delay_s = float(os.environ.get(SAM_CHIP_DELAY_ENV) or 0.0)

    def segment(self, task: Any, rgb: np.ndarray, valid: np.ndarray) -> str:
        """Segment one chip, checkpoint its records, report it; ``"<date group>/<chip>"``."""
        reset_peak()
        t0 = time.perf_counter()
        masks = self.generator.generate_compact(rgb, valid)
        chip_records = records.chip_records(task, masks, valid)
        time.sleep(self.delay_s)
        prompts = int(masks.n_prompts)
        seconds = time.perf_counter() - t0
        outcome = checkpoint.ChipOutcome(tuple(task.chip_id), checkpoint.SEGMENTED, "", chip_records.num_rows,
                                         prompts, round(seconds, 3))
        self.shards[task.date_group_id].write(outcome, chip_records)
        chip = records.chip_key(task.chip_id)
        self.stats.chip_segmented.remote(task.date_group_id, chip, chip_records.num_rows, prompts, seconds,
                                         process_info("sam"))
        return f"{task.date_group_id}/{chip}"


class SamStage:
    """Actor: loads the ONNX encoder and decoder once, segments chips, checkpoints their MaskRecords
    (:class:`ChipSegmenter`).

    Each model load is reported to :class:`~raysam.runstats.RunStats` (pid, node), so a restarted
    actor shows as one more load. ONNX Runtime gets ``threads`` intra-op threads (the actor's CPU
    reservation, rounded up), not every core of the node. It runs :data:`SAM_NICE_STEP` nicer
    than the other workers (:func:`lower_cpu_priority`).
    """

    def __init__(self, model_source: ModelSource, amg_params: dict, device: str, shards: Mapping[str, checkpoint.ShardTarget],
                 threads: int | None = None):
        from raysam.sam import AutomaticMaskGenerator, load_model

        lower_cpu_priority(SAM_NICE_STEP)  # before ONNX Runtime starts its threads: they inherit it
        self.model = load_model(model_source.materialise(), device=device, intra_op_threads=threads)
        stats = run_stats()
        self.segmenter = ChipSegmenter(AutomaticMaskGenerator(self.model, **amg_params), shards, stats)
        ray.get(stats.model_loaded.remote(os.getpid(), ray.get_runtime_context().get_node_id()))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = []
        for blob, rgb, valid_bits in zip(batch["task"], batch["rgb"], batch["valid_bits"], strict=True):
            valid = np.unpackbits(valid_bits, count=rgb.shape[0] * rgb.shape[1]).reshape(rgb.shape[:2]).astype(bool)
            done.append(self.segmenter.segment(pickle.loads(blob), rgb, valid))
        out = np.empty(len(done), object)
        out[:] = done
        return {"chip": out}


def chip_nbytes(chip_px: int = DEFAULT_CHIP_SIZE) -> int:
    """Bytes of one read chip as it leaves the read stage: RGB uint8 and the bit-packed valid mask."""
    return chip_px * chip_px * 3 + (chip_px * chip_px + 7) // 8  # np.packbits rounds up


def configure_blocks(ctx: Any) -> None:
    """Close the read stage's output blocks at :data:`READ_BLOCK_CHIPS` chips, whatever a chip row
    holds (Ray Data closes a block once it exceeds ``target_max_block_size``; the plan and SAM
    stages' rows are tiny, so their blocks stay as they are)."""
    ctx.target_max_block_size = READ_BLOCK_CHIPS * chip_nbytes() - 1


def bound_read_ahead(ctx: Any, sam_actors: int) -> None:
    """Bound Ray Data's object-store budget to :data:`READ_AHEAD_BLOCKS_PER_ACTOR` read blocks per
    SAM actor, so reads run a few blocks ahead of SAM instead of through the whole run (Ray Data
    still takes at most half the cluster's object store). Ray Data gives each operator part of
    the budget, so the reads' lead stays below the bound."""
    limit = sam_actors * READ_AHEAD_BLOCKS_PER_ACTOR * READ_BLOCK_CHIPS * chip_nbytes()
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(object_store_memory=limit)


def sam_threads(ray_cfg: RayConfig) -> int:
    """ONNX Runtime threads of a SAM actor: its CPU reservation rounded up (at least 1)."""
    return max(1, math.ceil(ray_cfg.cpus_per_actor))


def chip_dataset(specs: Mapping[str, GroupSpec], cfg: RunConfig, scaling: dict, model_source: ModelSource,
                 resume: Mapping[str, bool]) -> ray.data.Dataset:
    """The lazy chain: chip rows -> chip tasks, read (CPU tasks) -> SAM (actor pool) -> checkpoints.

    Rows are ordered by date group, so groups finish (and publish) one after another.

    Args:
        specs: the date groups to do, in order.
        cfg: the run config, its ``ray.cpus_per_actor`` decided (:meth:`raysam.config.RayConfig.resolved`).
        scaling: each group's RGB scaling, or the ref of the task computing it (a stretch).
        model_source: where actors load the model from.
        resume: per group, whether its work directory already holds checkpoints to skip.
    """
    ctx = ray.data.DataContext.get_current()
    configure_retries(ctx, cfg.ray)
    ctx.enable_progress_bars = False  # the driver shows progress per date group
    configure_blocks(ctx)
    bound_read_ahead(ctx, cfg.ray.sam_actors_max or cfg.ray.sam_actors)

    from raysam.grid import chip_rows
    from raysam.signing import signer_spec

    overlap = cfg.chip.spatial_overlap
    rows = [{"date_group_id": gid, "chip_row": r} for gid, s in specs.items()
            for r in range(chip_rows(s.group.grid, spatial_overlap=overlap))]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 1000)))
    shards = {gid: s.shards for gid, s in specs.items()}
    ds = ds.map_batches(
        read_stage,
        batch_size=1,
        num_cpus=cfg.ray.read_cpus,
        fn_kwargs={"specs": specs, "resume": dict(resume), "scaling": scaling, "signer_cfg": signer_spec(cfg.stac),
                   "max_cloud_fraction": cfg.chip.max_cloud_fraction, "network": cfg.network},
        memory=READ_TASK_MEMORY_BYTES,
        compute=ray.data.TaskPoolStrategy(size=cfg.ray.read_concurrency),
    )
    pool = ray.data.ActorPoolStrategy(min_size=cfg.ray.sam_actors, max_size=cfg.ray.sam_actors_max or cfg.ray.sam_actors)
    return ds.map_batches(
        SamStage,
        batch_size=1,
        compute=pool,
        num_gpus=cfg.ray.gpus_per_actor,
        num_cpus=cfg.ray.cpus_per_actor,
        fn_constructor_kwargs={"model_source": model_source, "amg_params": asdict(cfg.amg), "device": cfg.device,
                               "shards": shards, "threads": sam_threads(cfg.ray)},
    )


def model_source_for(cfg: RunConfig, model_dir: Path) -> ModelSource:
    """Ship the model by path when every worker sees it (local Ray), else by bytes."""
    return ModelSource.from_path(model_dir, ship_bytes=cfg.ray.address is not None)
