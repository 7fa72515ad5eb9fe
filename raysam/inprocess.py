"""A small run on this machine without Ray: the same stages, in this process.

Starting Ray (its daemons, Ray Data's executor and actors, a worker per stage that imports GDAL,
Arrow and ONNX Runtime again) costs about 8 s of a 2-core machine before the first chip is
segmented, more than a few dozen chips take. A run on this machine with at most
``ray.in_process_max_chips`` chips to segment therefore runs in process (:func:`runs_in_process`):
:class:`InProcessChips` plans, reads and segments the chips in a thread (reads two chips ahead in
two more), with the front half's own per-chip functions (:func:`raysam.pipeline.plan_row`,
:func:`~raysam.pipeline.read_one`, :class:`~raysam.pipeline.ChipSegmenter`), while the driver's
thread runs the back half's tasks (:class:`raysam.scheduler.InProcessQueue`) and publishes, as it
does with Ray. Checkpoints, resume, outputs and their ids are the same either way.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, InvalidStateError, ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any

from raysam import interrupt
from raysam.config import RunConfig
from raysam.layout import GroupSpec
from raysam.plan import GroupPlan, iter_chip_tasks
from raysam.runstats import IN_PROCESS_NODE

READ_AHEAD_CHIPS = 2  # chips read ahead of the one being segmented, by as many reader threads


def runs_in_process(cfg: RunConfig, todo: tuple[GroupPlan, ...]) -> bool:
    """Whether the run goes without Ray: a run that would start a Ray instance on this machine
    (:func:`raysam.driver.init_address`: ``ray.address`` ``local``, or null without
    ``RAY_ADDRESS``), none connected in this process yet, with at most ``ray.in_process_max_chips``
    chips to segment (counting no further than that)."""
    import ray

    from raysam.driver import init_address

    limit = cfg.ray.in_process_max_chips
    if limit == 0 or init_address(cfg.ray) != "local" or ray.is_initialized():
        return False
    left = limit
    for g in todo:
        planned = sum(1 for _ in itertools.islice(iter_chip_tasks(cfg, g.group), left + g.chips_checkpointed + 1))
        left -= max(0, planned - g.chips_checkpointed)
        if left < 0:
            return False
    return True


class InProcessChips(threading.Thread):
    """The front half in this process: every chip of the groups, in order, planned, read (by
    reader threads, :data:`READ_AHEAD_CHIPS` ahead: over a network a read can take longer than
    SAM) and segmented here. Keeps its error for the
    driver, as :class:`raysam.driver.ChipStream` does.

    Args:
        specs: the date groups to do, in order.
        cfg: the run config.
        scaling: each group's RGB scaling.
        model_dir: the verified model directory.
        resume: per group, whether its work directory already holds checkpoints to skip.
        stats: the run's statistics (:class:`raysam.runstats.InProcessActor`).
    """

    STOP_WAIT_S = interrupt.STREAM_STOP_WAIT_S  # how long stop() waits for the chip being segmented

    def __init__(self, specs: Mapping[str, GroupSpec], cfg: RunConfig, scaling: Mapping[str, Any], model_dir: Path,
                 resume: Mapping[str, bool], stats: Any):
        super().__init__(name="raysam-chips", daemon=True)
        self.specs, self.cfg, self.scaling, self.model_dir = specs, cfg, scaling, model_dir
        self.resume, self.stats = resume, stats
        self.error: BaseException | None = None
        self._stopping: Future = Future()  # done once stop() is called, so a wait for a read ends with it

    def _tasks(self) -> Iterator[Any]:
        from raysam.grid import chip_rows
        from raysam.pipeline import plan_row

        for gid, spec in self.specs.items():
            for row in range(chip_rows(spec.group.grid, spatial_overlap=spec.spatial_overlap)):
                yield from plan_row(spec, row, self.resume[gid], self.stats)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as err:  # noqa: BLE001 - handed to the driver loop, which raises it
            self.error = err

    def _run(self) -> None:
        from raysam.pipeline import SAM_NICE_STEP, ChipSegmenter, lower_cpu_priority, read_one
        from raysam.sam import AutomaticMaskGenerator, load_model
        from raysam.signing import signer_spec
        from raysam.tasks import worker_signer

        cfg = self.cfg
        lower_cpu_priority(SAM_NICE_STEP, this_thread_only=True)  # as the SAM actors: the driver's back half goes first
        signer = worker_signer(signer_spec(cfg.stac))

        def read(task: Any) -> Any:
            return read_one(task, self.specs[task.date_group_id].shards, self.scaling[task.date_group_id], signer,
                            cfg.chip.max_cloud_fraction, cfg.network, self.stats)

        reads: deque[tuple[Any, Future]] = deque()
        tasks = self._tasks()
        reader = ThreadPoolExecutor(READ_AHEAD_CHIPS, thread_name_prefix="raysam-read")  # niced as this thread

        def read_ahead() -> None:
            while len(reads) <= READ_AHEAD_CHIPS and (task := next(tasks, None)) is not None:
                reads.append((task, reader.submit(read, task)))

        try:
            read_ahead()  # the first chips are read while the model loads
            model = load_model(self.model_dir, device=cfg.device)  # ONNX Runtime's threads inherit the niceness
            self.stats.model_loaded.remote(os.getpid(), IN_PROCESS_NODE)
            segmenter = ChipSegmenter(AutomaticMaskGenerator(model, **asdict(cfg.amg)),
                                      {gid: s.shards for gid, s in self.specs.items()}, self.stats)
            while not self._stopping.done():
                read_ahead()
                if not reads:
                    return
                task, future = reads.popleft()
                wait((future, self._stopping), return_when=FIRST_COMPLETED)
                if not self._stopping.done() and (pixels := future.result()) is not None:
                    segmenter.segment(task, *pixels)
        finally:  # a stop or an error: the reads not started yet are dropped, and one that hangs
            reader.shutdown(wait=False, cancel_futures=True)  # on the network is not waited for

    def stop(self) -> None:
        """End the stream of a stopped run after the chip being segmented."""
        with contextlib.suppress(InvalidStateError):  # stopped already
            self._stopping.set_result(None)
        self.join(self.STOP_WAIT_S)
