"""The driver's queue of back-half Ray tasks: a bounded number at once, earliest date group first.

Date groups finish one after another, so a group's merge and sinks run ahead of the next group's
Sentinel-2 tiles: tasks are started in priority order (``(group index, stage)``), at most
``limit`` at a time (:meth:`raysam.config.RayConfig.back_half_tasks`; more once every chip is
segmented), and none of a later group while one of an earlier group runs. A group's back half
goes in stages (cell merges, then cell writes, then the single files), and between two of them it
has nothing waiting for a moment: without that rule the next group's tiles took the free slots
then, and the earlier group published later. Results come back to a callback on the driver; they
are small (counts, windows, a few ids), never pixels or records.

:class:`InProcessQueue` is the same queue for a run without Ray: it calls the tasks in the
driver's thread, one per poll, in the same order.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
from collections.abc import Callable
from typing import Any

import ray


class TaskQueue:
    """Ray tasks waiting to start, and those running, with their completion callbacks."""

    def __init__(self, limit: int, limit_after_chips: int | None = None):
        self.limit = max(1, int(limit))
        self._limit_after_chips = max(self.limit, int(limit_after_chips or 0))
        self._waiting: list[tuple[tuple, int, Callable[[], Any], Callable[[Any], None]]] = []
        self._running: dict[Any, tuple[tuple, Callable[[Any], None]]] = {}  # ref -> (priority, on_done)
        self._seq = itertools.count()

    def submit(self, priority: tuple, start: Callable[[], Any], on_done: Callable[[Any], None]) -> None:
        """Queue a task: ``start()`` submits it (returns its ObjectRef); ``on_done(result)`` gets its value.

        ``priority`` is ``(date group index, stage rank, ...)``, lowest first.
        """
        heapq.heappush(self._waiting, (priority, next(self._seq), start, on_done))

    @staticmethod
    def call(fn: Any, args: tuple, num_cpus: float) -> Any:
        """Start ``fn(*args)`` (one of :mod:`raysam.tasks`) as a Ray task reserving ``num_cpus``: its ObjectRef."""
        from raysam.tasks import remote_task

        return remote_task(fn).options(num_cpus=num_cpus).remote(*args)

    def chips_done(self) -> None:
        """Every chip is segmented: no chip read needs CPUs any more, so the back half may take
        them (``limit_after_chips``)."""
        self.limit = self._limit_after_chips

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._running)

    def poll(self, timeout_s: float) -> int:
        """Start what fits, wait up to ``timeout_s`` for results and hand them to their callbacks.

        Returns:
            How many tasks finished. A task's exception is raised here.
        """
        while self._waiting and len(self._running) < self.limit and self._may_start(self._waiting[0][0]):
            priority, _, start, on_done = heapq.heappop(self._waiting)
            self._running[start()] = (priority, on_done)
        if not self._running:
            return 0
        refs = list(self._running)
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout_s)
        if ready:  # whatever else is done by now too
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            _, on_done = self._running.pop(ref)
            on_done(ray.get(ref))
        return len(ready)

    def _may_start(self, priority: tuple) -> bool:
        """No task of an earlier date group is running."""
        return all(running[0] >= priority[0] for running, _ in self._running.values())

    CANCEL_WAIT_S = 10.0  # how long cancel() waits for the cancelled tasks' workers to be gone

    def cancel(self) -> None:
        """Drop waiting tasks and cancel running ones (a failed or interrupted run), then wait (at
        most :data:`CANCEL_WAIT_S`) until they have ended: a force-cancel kills the worker
        asynchronously, and a task still writing a tile after the run removed its group's staging
        directory made that directory again (seen once under CI load, test_worker_disk)."""
        self._waiting.clear()
        refs = list(self._running)
        for ref in refs:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - best effort while failing anyway
                pass
        self._running.clear()
        if refs:
            with contextlib.suppress(Exception):
                ray.wait(refs, num_returns=len(refs), timeout=self.CANCEL_WAIT_S)


class InProcessQueue(TaskQueue):
    """:class:`TaskQueue` for a run without Ray: each poll calls the first waiting task (lowest
    priority) in the calling thread and hands its value to its callback; ``start()`` returns
    that value, not an ObjectRef."""

    def __init__(self) -> None:
        super().__init__(limit=1)

    @staticmethod
    def call(fn: Any, args: tuple, num_cpus: float) -> Any:  # noqa: ARG004 - TaskQueue's signature
        """Run ``fn(*args)`` now: its value."""
        return fn(*args)

    def poll(self, timeout_s: float) -> int:  # noqa: ARG002 - TaskQueue's signature
        """Run the first waiting task; how many ran (0 or 1). A task's exception is raised here."""
        if not self._waiting:
            return 0
        _, _, start, on_done = heapq.heappop(self._waiting)
        on_done(start())
        return 1
