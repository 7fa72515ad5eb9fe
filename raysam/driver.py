"""The run on the driver: check inputs, plan, start Ray, watch the date groups, publish them.

:func:`prepare` does everything that can fail on bad input before any work (the preflight, which
``dry_run`` shares: paths, model files, Ray's address and resources, the output root, region,
catalog search, planning, bands; see :mod:`raysam.preflight`). :func:`execute` claims the groups and hands them
to a :class:`RunController`, which streams every group's chips through the SAM actors (Ray Data)
and, as soon as a group's last chip is checkpointed, runs its merge and sinks as Ray tasks
(:class:`raysam.groupjob.GroupJob`) while later groups are still being segmented. The driver
only plans, watches small progress counters, writes small metadata and publishes: no process's
memory, disk or CPU time grows with the area.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import raysam
from raysam import interrupt, preflight
from raysam.checkpoint import WORK_DIR
from raysam.config import RayConfig, RunConfig, redacted
from raysam.console import route_ray_logs, route_worker_output
from raysam.errors import ConfigError
from raysam.estimate import MeasuredRate, describe_costs, latest_rate
from raysam.plan import GroupPlan, RunPlan, chip_bands, claim_todo, describe, plan_run
from raysam.progress import RunProgress
from raysam.region import Region, load_region
from raysam.storage.locks import keep_alive, release, release_all
from raysam.storage.root import OutputRoot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """The checked inputs and the plan of a run."""

    plan: RunPlan
    root: OutputRoot
    model_dir: Path
    model_manifest: dict
    n_items: int
    new_dirs: tuple[str, ...] = ()  # output-root directories that did not exist before the run
    rate: MeasuredRate | None = None  # dry run: the measured speed its cost estimate uses

    def describe(self, ray_cfg: RayConfig | None = None) -> str:
        """The dry-run report (with ``ray_cfg``: and the cost estimate)."""
        costs = describe_costs(self.plan, self.rate, ray_cfg) if ray_cfg is not None else ()
        return "\n".join([describe(self.plan), *costs])


def ensure_model(cfg: RunConfig) -> tuple[Path, dict]:
    """The model directory and its verified manifest; the demo model is built on first use."""
    from raysam.sam.model import read_manifest, verify_files

    model_dir = Path(cfg.model.path)
    if cfg.model.type == "demo" and not (model_dir / "manifest.json").exists():
        from raysam.demo.model import build_demo_model

        build_demo_model(model_dir)
    manifest = read_manifest(model_dir)
    verify_files(model_dir, manifest)
    if manifest["model_type"] != cfg.model.type:
        raise ConfigError(
            f"model.path={str(model_dir)!r} holds a {manifest['model_type']} model but model.type is "
            f"{cfg.model.type}: point model.path at a {cfg.model.type} export"
        )
    return model_dir, manifest


@contextlib.contextmanager
def stac_endpoint(cfg: RunConfig) -> Iterator[Any]:
    """The STAC config to search with; ``stac=demo`` builds and serves the synthetic catalog."""
    if cfg.demo_catalog is None:
        yield cfg.stac
        return
    from raysam.demo.catalog import make_demo_catalog
    from raysam.demo.serve import free_port, serve_catalog

    root = Path(cfg.demo_catalog)
    make_demo_catalog(root)
    port = free_port()
    proc = serve_catalog(root / "items.ndjson", port)
    try:
        with interrupt.on_stop(proc.terminate):
            yield replace(cfg.stac, url=f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def search(cfg: RunConfig, region: Region) -> list:
    """Parsed items for the region and time range (one line of error if none)."""
    from raysam.stac import dedupe_reprocessed, search_items

    with stac_endpoint(cfg) as stac_cfg:
        items = search_items(stac_cfg, region.aoi_wgs84, region.start_utc, region.end_utc,
                             max_cloud_cover=region.max_cloud_cover)
    return dedupe_reprocessed(items)


def prepare(cfg: RunConfig) -> Prepared:
    """The preflight and the plan: everything that can fail on bad input, before any work.

    ``dry_run`` runs the same checks (so a dry run that passes means the run will start), then
    reads the latest manifest of the same run key for its cost estimate. Every check that
    waits on the network is bounded: ``ray.timeout_s``, ``output.timeout_s``, ``stac.timeout_s``.
    """
    preflight.check_paths(cfg)
    region = load_region(cfg.region)
    model_dir, manifest = ensure_model(cfg)
    check_ray(cfg, manifest)
    root = OutputRoot.open(cfg.output.root, cfg.output.timeout_s)
    root.check_reachable()
    new_dirs = root.missing_dirs()
    items = search(cfg, region)
    plan = plan_run(cfg, region, items, manifest, root)
    preflight.check_bands(cfg, plan)
    if plan.todo:
        root.check_writable()  # leaves nothing behind, so a dry run checks it too
    rate = latest_rate(root, plan.collection_dir) if cfg.dry_run else None
    return Prepared(plan, root, model_dir, manifest, len(items), new_dirs, rate)


def check_ray(cfg: RunConfig, model_manifest: dict) -> None:
    """The Ray side of the preflight: the cluster answers, and the run's actors and tasks fit.

    A local instance is sized as Ray would size it, without starting it; a cluster at an
    address is connected to (within ``ray.timeout_s``) and its nodes are counted. With
    ``ray.autoscale_wait_s`` the run waits that long for the cluster to grow (a dry run only
    says so).

    Raises:
        ConfigError: unreachable address, or what the run needs does not fit.
    """
    import ray

    model_bytes = preflight.model_bytes(model_manifest)
    if not ray.is_initialized():
        if preflight.ray_address(cfg) is None:
            capacity = preflight.local_capacity(cfg)
            if problem := preflight.unmet_demand(cfg, capacity, model_bytes):
                raise ConfigError(problem)
            return
        init_ray(cfg.ray)
    problem = preflight.unmet_demand(cfg, preflight.connected_capacity(), model_bytes)
    if problem and cfg.ray.autoscale_wait_s is not None:
        if cfg.dry_run:
            log.info("%s; the run will wait up to %g s (ray.autoscale_wait_s) for the cluster to grow",
                     problem, cfg.ray.autoscale_wait_s)
            return
        preflight.wait_for_capacity(cfg, model_bytes)
    elif problem:
        raise ConfigError(problem)


_ray_started: list[bool] = []  # set once init_ray started (True) or connected to (False) Ray in this process


def shutdown_ray() -> None:
    """Stop the Ray instance :func:`init_ray` started (or leave the cluster it connected to);
    Ray that someone else started (a test, a notebook) is left alone."""
    import ray

    if _ray_started and ray.is_initialized():
        started_here = _ray_started[0]
        _ray_started.clear()
        if started_here:
            _kill_autoscaler_monitor()
        with contextlib.suppress(Exception):
            ray.shutdown()


def _kill_autoscaler_monitor() -> None:
    """SIGKILL the autoscaler monitor of the local instance before ``ray.shutdown()``. Ray stops
    its processes one after another, the GCS before the monitor; on SIGTERM the monitor first
    tries to report its end through the GCS that is gone, so every shutdown waited the 1 s
    Ray gives it before killing it anyway (Ray 2.60, ``Node.kill_all_processes``). The monitor
    holds no state of a private single-node instance."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # noqa: SLF001 - no public handle
    for info in getattr(node, "all_processes", {}).get("monitor", []):
        with contextlib.suppress(Exception):
            info.process.kill()
            info.process.wait(timeout=5)


# How long the local Ray instance keeps an idle worker process it would otherwise kill (Ray: 1 s).
# Ray keeps only as many idle workers as the node has free CPUs; the SAM actors hold nearly all of
# a small machine's (1.25 of 2), so Ray killed the worker of every chip read or sink task a second
# after it finished and started a new one for the next task, which imported GDAL, Arrow and raysam
# again (demo, 2 cores: 9 task workers and 16 CPU-s, against 2 workers and 8 CPU-s with this).
# A cluster's nodes take it from RAY_idle_worker_killing_time_threshold_ms at `ray start`.
IDLE_WORKER_KEEP_MS = 60_000


def init_address(ray_cfg: RayConfig) -> str | None:
    """The address :func:`init_ray` passes to ``ray.init``: ``"local"`` for a fresh instance on this
    machine, None for the cluster of ``RAY_ADDRESS`` (``ray job submit``), else ``ray.address``.
    No address is never whatever ``ray start`` cluster happens to run on this machine (use
    ``ray=cluster`` for that)."""
    return ray_cfg.address or (None if os.environ.get("RAY_ADDRESS") else "local")


def init_ray(ray_cfg: RayConfig) -> None:
    """Connect to (or start) Ray; quiet, with the object store size if configured."""
    import ray

    if ray.is_initialized():
        return
    address = init_address(ray_cfg)
    kwargs: dict[str, Any] = {"address": address, "log_to_driver": True, "include_dashboard": False,
                              "configure_logging": False}  # Ray's records go through our handlers (raysam.console)
    if address == "local":
        kwargs["_system_config"] = {"idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS}
        if ray_cfg.object_store_gb:
            kwargs["object_store_memory"] = int(ray_cfg.object_store_gb * 1e9)
    route_ray_logs()
    with contextlib.suppress(ImportError, AttributeError):  # a Ray call from a thread left behind by a
        import ray._private.auto_init_hook as auto_init  # stopped run must not start or join another cluster

        auto_init.enable_auto_connect = False
    try:
        ray.init(**{k: v for k, v in kwargs.items() if v is not None or k == "address"})
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"Ray could not start or connect ({address or 'RAY_ADDRESS'}): {first[:200]}: "
                          "check ray.address and ray.object_store_gb") from None
    _ray_started.append(address == "local")
    if address == "local":  # on a cluster they outlive each job (detached): only a fresh instance gains
        start_ray_data_actors()
    route_worker_output()
    interrupt.install_handlers()  # ray.init replaced the SIGTERM handler with its own


def start_ray_data_actors() -> None:
    """Ask for Ray Data's cluster-wide actors (its stats actor, actor-location tracker and
    autoscaling coordinator) as soon as a local Ray instance is up.

    Ray Data creates them when a dataset first executes, and its executor waits on the tracker
    before it launches the first chip read; asked for here, their worker processes start while the
    driver sets the run up (demo on Ray, 2 cores: 21.4 s against 22.4 s, mean of 4 runs each). They are
    named, detached and created with ``get_if_exists``, as Ray Data creates them, so it finds them.
    These are private Ray Data functions: a Ray version without them leaves the creation to Ray Data.
    """
    with contextlib.suppress(ImportError, AttributeError):
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
        from ray.data._internal.execution.node_trackers import get_or_create_actor_location_tracker
        from ray.data._internal.stats import get_or_create_stats_actor

        for create in (get_or_create_actor_location_tracker, get_or_create_stats_actor,
                       get_or_create_autoscaling_coordinator):
            create()


def versions() -> dict[str, str]:
    """Package versions that matter for reproducing outputs."""
    import numpy
    import onnxruntime
    import pyarrow
    import ray
    import rasterio
    import shapely

    return {
        "raysam": raysam.__version__, "python": platform.python_version(), "ray": ray.__version__,
        "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__, "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__, "shapely": shapely.__version__, "pyarrow": pyarrow.__version__,
    }


def manifest_base(cfg: RunConfig, prepared: Prepared) -> dict[str, Any]:
    """The run-level part of every date group's manifest.json (no secrets)."""
    secrets = [s for s in (cfg.stac.pc_key, os.environ.get("PC_SDK_SUBSCRIPTION_KEY")) if s]
    m = prepared.model_manifest
    return {
        "config": redacted(asdict(cfg), secrets),
        "versions": versions(),
        "model": {
            "type": m.get("model_type"), "family": m.get("family"), "licence": m.get("licence"),
            "description": m.get("description"), "precision": m.get("precision"),
            "encoder_sha256": m.get("encoder", {}).get("sha256"), "decoder_sha256": m.get("decoder", {}).get("sha256"),
        },
        "region": {"name": prepared.plan.region.name, "aoi_wgs84_wkt": prepared.plan.region.aoi_wgs84.wkt},
        "run_key": prepared.plan.run_key,
    }


def execute(cfg: RunConfig, prepared: Prepared) -> dict[str, Any]:
    """Claim the incomplete date groups (one lock each), then segment, merge, write and publish them.

    However the run ends (done, failed, SIGTERM/SIGINT), unfinished groups are aborted, the
    locks released and the directories it left empty removed; if the main thread is stuck when
    a signal comes, :mod:`raysam.interrupt`'s watchdog does the same from its own thread.

    Raises:
        ConfigError: another run on the same output root holds a date group's lock.
    """
    locks: dict = {}
    controllers: list[RunController] = []

    def tidy() -> None:
        for controller in controllers:
            controller.abort()
        interrupt.REPORT.locks_released += len(locks)
        release_all(prepared.root, locks)
        remove_empty_dirs(prepared.root, prepared.plan, prepared.new_dirs)

    cleanup = interrupt.Once(tidy)
    with interrupt.on_stop(cleanup):
        try:
            todo, claimed = claim_todo(prepared.plan, prepared.root, cfg.output.overwrite)
            locks.update(claimed)
            controllers.append(RunController(cfg, prepared, todo, locks))
            with keep_alive(prepared.root, locks):
                return controllers[0].run()
        finally:
            cleanup()


def remove_empty_dirs(root: OutputRoot, plan: RunPlan, new_dirs: tuple[str, ...] = ()) -> None:
    """Remove the work, collection and region directories if the run left them empty, then the
    output-root directories the run created (``new_dirs``, deepest first) if they are empty."""
    collection = plan.collection_dir
    for path in (f"{collection}/{WORK_DIR}", collection, collection.rsplit("/", 1)[0], *new_dirs):
        root.storage.delete_empty_dir(path)


class ChipStream(threading.Thread):
    """Drains the chip pipeline (tiny rows, one per chip) in the background; keeps its error."""

    STOP_WAIT_S = interrupt.STREAM_STOP_WAIT_S  # stop() waits this long once Ray Data's executor is shut down

    def __init__(self, dataset: Any):
        super().__init__(name="raysam-chips", daemon=True)
        self.dataset = dataset
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for _ in self.dataset.iter_internal_ref_bundles():  # the rows stay in the object store
                pass
        except BaseException as err:  # noqa: BLE001 - handed to the driver loop, which raises it
            self.error = err

    def stop(self) -> None:
        """End the stream of a stopped run: shut Ray Data's executor down (its iterator then
        ends) and wait for the thread. Left running, the thread would outlive the run's Ray
        instance, and Ray's client in it ends the whole process a minute after Ray is gone (a
        notebook's kernel, a test session)."""
        # Ray Data has no public stop; its executor is a thread named after the dataset.
        name = f"StreamingExecutor-{self.dataset.get_dataset_id()}"
        for executor in [t for t in threading.enumerate() if t.name == name and hasattr(t, "shutdown")]:
            with contextlib.suppress(Exception):
                executor.shutdown(force=True)
        self.join(self.STOP_WAIT_S)


POLL_S = 0.5  # how often the driver looks at progress (and at task results, when none ends sooner)


@dataclass(frozen=True)
class _Backend:
    """What runs a run's work: Ray, or this process (:mod:`raysam.inprocess`)."""

    name: str  # "ray" or "in-process", as the manifest says
    stats: Any  # the run's RunStats (actor handle or InProcessActor)
    queue: Any  # TaskQueue (InProcessQueue in process)
    chip_stream: Callable[[dict, dict], Any]  # (specs, resume) -> the chip stream's thread, not started
    scaling_ready: Callable[[], object]  # waits for the groups' scaling; raises its error
    close: Callable[[], object]


class RunController:
    """Plans per-group work, launches it, watches it and publishes each date group when done.

    Args:
        cfg: the run config.
        prepared: the checked inputs and plan.
        todo: the claimed date groups, in order.
        locks: their locks (released one by one as groups publish).
    """

    def __init__(self, cfg: RunConfig, prepared: Prepared, todo: tuple[GroupPlan, ...], locks: dict):
        self.cfg, self.prepared, self.todo, self.locks = cfg, prepared, todo, locks
        plan = prepared.plan
        for g in plan.groups:
            if g.complete:
                log.info("date group %s is complete in %s: skipped", g.group.id, g.out_dir)
        self.progress = RunProgress([(g.group.id, g.area_km2) for g in todo])
        self.jobs: list[Any] = []  # GroupJob, one per claimed group, once the run starts
        self.queue: Any = None  # TaskQueue
        self.stream: ChipStream | None = None  # the chips going through the SAM actors, once started
        self.kept = 0  # chip checkpoints kept by abort()
        self._abort_lock = threading.Lock()
        self._aborted = False
        self.metrics: dict[str, Any] = {
            "groups_done": 0, "groups_skipped": len(plan.groups) - len(todo), "chips_segmented": 0,
            "chips_resumed": 0, "chips_skipped": 0, "masks": 0, "area_km2": sum(g.area_km2 for g in todo),
        }

    def run(self) -> dict[str, Any]:
        """Run every claimed group to publication; returns the run's metrics."""
        if not self.todo:
            return self.metrics
        from raysam.groupjob import GroupJob
        from raysam.inprocess import runs_in_process
        from raysam.layout import GroupSpec
        from raysam.storage.publish import publisher_for

        t0 = time.perf_counter()
        root = self.prepared.root
        backend: _Backend | None = None
        jobs: list[GroupJob] = self.jobs
        try:
            backend = self._in_process() if runs_in_process(self.cfg, self.todo) else self._on_ray()
            cfg, self.queue = self.cfg, backend.queue
            publisher = publisher_for(root)
            base = {**manifest_base(cfg, self.prepared), "executor": backend.name}
            for i, g in enumerate(self.todo):
                spec = GroupSpec(g.group, root, g.fingerprint, g.out_dir, publisher.begin(root, g.out_dir), g.work_dir,
                                 chip_bands(cfg), cfg.chip.spatial_overlap)
                jobs.append(GroupJob(i, g, spec, cfg, backend.queue, publisher, backend.stats, base, self._published))
            specs = {job.group_id: job.spec for job in jobs}
            resume = {g.group.id: g.chips_checkpointed > 0 for g in self.todo}
            self.stream = stream = backend.chip_stream(specs, resume)
            stream.start()
            backend.scaling_ready()
            jobs[0].activate()
            self._watch(jobs, stream, backend.stats, backend.queue)
        except BaseException as err:
            self.abort()
            if self.kept and not isinstance(err, KeyboardInterrupt):  # a stop says it in its own line
                log.warning("the run stopped; %d chip checkpoint(s) are kept in %s/%s for the next run",
                            self.kept, self.prepared.plan.collection_dir, WORK_DIR)
            raise
        finally:
            self.progress.close()
            if backend is not None:
                backend.close()  # each run (each job of a multirun sweep) counts afresh
        self.metrics["pipeline_s"] = time.perf_counter() - t0
        return self.metrics

    def _on_ray(self) -> _Backend:
        """Start (or connect to) Ray: the stats actor, the task queue, the chip stream through Ray Data."""
        import ray

        from raysam import tasks
        from raysam.pipeline import chip_dataset, model_source_for
        from raysam.runstats import STATS_ACTOR, RunStats
        from raysam.scheduler import TaskQueue
        from raysam.signing import signer_spec

        init_ray(self.cfg.ray)
        node_cpus = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=1.0)
        self.cfg = cfg = replace(self.cfg, ray=self.cfg.ray.resolved(node_cpus))  # SAM actors' CPUs decided
        stats = RunStats.options(name=STATS_ACTOR, get_if_exists=True).remote()
        cpus = ray.cluster_resources().get("CPU", 1.0)
        queue = TaskQueue(cfg.ray.back_half_tasks(cpus), cfg.ray.back_half_tasks(cpus, chips_done=True))
        signer = signer_spec(cfg.stac)  # workers sign with their own environment's key, never one in arguments
        # A stretch reads each group's items (a task per group, on a worker, reserving a chip read's
        # CPUs). The chip stream starts without waiting for it: its read tasks wait for their group's
        # scaling, while Ray Data starts and the SAM actors load the model. Any other scaling is the
        # config's own.
        scaling = {g.group.id: (queue.call(tasks.group_scaling, (cfg.chip.scaling, g.group, signer, cfg.network),
                                           cfg.ray.read_cpus)
                                if cfg.chip.scaling.per_group else cfg.chip.scaling) for g in self.todo}
        model = model_source_for(cfg, self.prepared.model_dir)
        return _Backend(
            "ray", stats, queue,
            chip_stream=lambda specs, resume: ChipStream(chip_dataset(specs, cfg, scaling, model, resume)),
            scaling_ready=lambda: ray.get([r for r in scaling.values() if isinstance(r, ray.ObjectRef)]),  # its error
            close=lambda: ray.kill(stats))

    def _in_process(self) -> _Backend:
        """A run without Ray (:mod:`raysam.inprocess`): in-process stats, queue and chip stream."""
        from raysam import tasks
        from raysam.inprocess import InProcessChips
        from raysam.runstats import InProcessActor, RunCounters, use_in_process
        from raysam.scheduler import InProcessQueue
        from raysam.signing import signer_spec

        cfg = self.cfg
        log.info("at most %d chips to segment (ray.in_process_max_chips): the run goes in this process, without Ray",
                 cfg.ray.in_process_max_chips)
        stats = InProcessActor(RunCounters())
        use_in_process(stats)

        def chip_stream(specs: dict, resume: dict) -> InProcessChips:
            # A stretch reads each group's items here, once the groups are set up (a failure drops them).
            signer = signer_spec(cfg.stac)
            scaling = {gid: (tasks.group_scaling(cfg.chip.scaling, spec.group, signer, cfg.network)
                             if cfg.chip.scaling.per_group else cfg.chip.scaling) for gid, spec in specs.items()}
            return InProcessChips(specs, cfg, scaling, self.prepared.model_dir, resume, stats)

        return _Backend("in-process", stats, InProcessQueue(), chip_stream=chip_stream, scaling_ready=lambda: None,
                        close=lambda: use_in_process(None))

    def abort(self) -> None:
        """Cancel the run's tasks and drop what its unfinished groups wrote, keeping their chip
        checkpoints (once, from whichever thread gets here first)."""
        with self._abort_lock:
            if self._aborted:
                return
            self._aborted = True
        if self.queue is not None:
            self.queue.cancel()
        if self.stream is not None:
            self.stream.stop()
        from raysam.groupjob import Stage

        unfinished = [job for job in self.jobs if job.stage is not Stage.PUBLISHED]
        self.kept = sum(job.abort() for job in unfinished)
        report = interrupt.REPORT
        report.groups_dropped += len(unfinished)
        report.checkpoints_kept += self.kept
        report.kept_in = f"{self.prepared.plan.collection_dir}/{WORK_DIR}"

    def _watch(self, jobs: list, stream: ChipStream, stats: Any, queue: Any) -> None:
        """The driver loop: progress counters in, task results in, groups out."""
        from raysam.groupjob import Stage
        from raysam.runstats import ask

        n_rows = {job.group_id: job.n_chip_rows for job in jobs}
        while any(job.stage is not Stage.PUBLISHED for job in jobs) or queue.busy:
            if stream.error is not None:
                raise stream.error
            progress = ask(stats.progress.remote(), self.cfg.ray.timeout_s)
            self.progress.update(progress, n_rows)
            previous_in = True
            for job in jobs:
                if previous_in and job.stage is Stage.WAITING:
                    job.activate()  # the SAM actors have moved on to this group
                if job.group_id in progress:
                    job.observe(*progress[job.group_id])
                previous_in = job.chips_in
            if not stream.is_alive():
                queue.chips_done()
            if queue.poll(POLL_S if queue.busy else 0) == 0 and not queue.busy:
                time.sleep(POLL_S)
        stream.join(timeout=60)
        if stream.error is not None:
            raise stream.error
        storage = self.prepared.root.storage
        for job in jobs:  # a chip redone after its group published (Ray Data rebuilding outputs lost
            if storage.exists(job.spec.work_dir):  # with a node) wrote its checkpoint again
                storage.delete_tree(job.spec.work_dir)

    def _published(self, manifest: dict[str, Any]) -> None:
        gid = manifest["date_group"]["id"]
        counts = manifest["counts"]
        lock = self.locks.pop(gid, None)
        if lock is not None:
            release(self.prepared.root, lock)
        self.metrics["groups_done"] += 1
        for key in ("chips_segmented", "chips_resumed", "chips_skipped"):
            self.metrics[key] += counts[key]
        self.metrics["masks"] += counts["masks_after_merge"]
        self.progress.published(manifest)
