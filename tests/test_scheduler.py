"""The driver's back-half task queue (raysam.scheduler) on a real local Ray instance."""

from __future__ import annotations

import time

import ray

from raysam.scheduler import InProcessQueue, TaskQueue


@ray.remote(num_cpus=0)
def _sleep(seconds: float, name: str) -> str:
    time.sleep(seconds)
    return name


@ray.remote(num_cpus=0)
def _span(seconds: float) -> tuple[float, float]:
    """(start, end) wall clock of a task that sleeps ``seconds`` (same machine as the test)."""
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def _ran_together(spans: list[tuple[float, float]]) -> bool:
    """Whether every span was running at one moment (the latest start before the earliest end)."""
    return max(start for start, _ in spans) < min(end for _, end in spans)


def _drain(queue: TaskQueue, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while queue.busy:
        assert time.monotonic() < deadline, "the queue did not drain"
        queue.poll(0.05)


def test_a_later_groups_task_waits_for_the_earlier_groups_running_tasks(ray_local):
    """Group 0 is between two stages (its first stage running, its next one queued only when that
    ends); group 1's tile is waiting with a free slot: it starts only after group 0's work."""
    queue = TaskQueue(limit=2)
    events: list[tuple[str, str]] = []

    def start(name: str, seconds: float):
        def go():
            events.append(("start", name))
            return _sleep.remote(seconds, name)
        return go

    def done(result: str) -> None:
        events.append(("done", result))
        if result == "g0-merge":  # the next stage of group 0, queued from the callback as GroupJob does
            queue.submit((0, 1), start("g0-write", 0.3), done)

    queue.submit((0, 0), start("g0-merge", 0.6), done)
    queue.submit((1, 3), start("g1-tile", 0.1), done)
    _drain(queue)

    assert events == [("start", "g0-merge"), ("done", "g0-merge"), ("start", "g0-write"), ("done", "g0-write"),
                     ("start", "g1-tile"), ("done", "g1-tile")]


def test_tasks_of_one_group_share_the_slots(ray_local):
    """The rule holds a later group back, never the same group's tasks: two run at once."""
    queue = TaskQueue(limit=2)
    started: list[str] = []
    finished: list[str] = []
    for name in ("a", "b", "c"):
        queue.submit((0, 0), lambda n=name: started.append(n) or _sleep.remote(0.5, n), finished.append)
    queue.poll(0)
    assert started == ["a", "b"]
    _drain(queue)
    assert sorted(finished) == ["a", "b", "c"]



def test_the_in_process_queue_runs_one_task_per_poll_earliest_group_first():
    """Without Ray, tasks run in the polling thread in priority order, a task queued from a
    callback (the group's next stage) included; callbacks get the values."""
    queue = InProcessQueue()
    ran: list[str] = []

    def task(name: str) -> str:
        ran.append(name)
        return name.upper()

    def submit(priority: tuple, name: str) -> None:
        queue.submit(priority, lambda: queue.call(task, (name,), 0.25), done)

    got: list[str] = []

    def done(value: str) -> None:
        got.append(value)
        if value == "G0-MERGE":
            submit((0, 1), "g0-write")

    submit((1, 3), "g1-tile")
    submit((0, 0), "g0-merge")
    assert ran == []  # nothing runs before a poll
    assert queue.poll(0) == 1 and ran == ["g0-merge"]
    while queue.busy:
        queue.poll(0)
    assert ran == ["g0-merge", "g0-write", "g1-tile"]
    assert got == ["G0-MERGE", "G0-WRITE", "G1-TILE"]
    assert queue.poll(0) == 0


@ray.remote
class _Holder:
    """Stands where a SAM actor stands in Ray's accounting: it holds its CPUs, doing nothing."""

    def ready(self) -> bool:
        return True


def test_back_half_tasks_leave_a_chip_read_room_beside_the_sam_actor(ray_local):
    """On 2 CPUs with the SAM actor's 1.25 (ray=local's resolution), as many back-half tasks as
    :meth:`RayConfig.back_half_tasks` allows (2) run at once, and a chip read still starts at once
    beside them: the limit comes from what the SAM actor leaves free in Ray's accounting, not
    from the CPU count (a queue that took more than that made the reads, which feed SAM, wait)."""
    from raysam.config import RayConfig

    ray_cfg = RayConfig().resolved(2.0)
    assert ray_cfg.cpus_per_actor == 1.25
    limit = ray_cfg.back_half_tasks(ray.cluster_resources()["CPU"])
    assert limit == 2
    assert RayConfig(cpus_per_actor=4.0, read_cpus=1.0, sink_cpus=1.0, sam_actors=4).back_half_tasks(64.0) == 44
    assert RayConfig(sink_tasks=3).back_half_tasks(2.0) == 3  # as configured
    assert ray_cfg.back_half_tasks(2.0, chips_done=True) == 2  # no reads left: one per CPU
    assert RayConfig(sink_tasks=3).back_half_tasks(2.0, chips_done=True) == 3
    sam = _Holder.options(num_cpus=ray_cfg.cpus_per_actor).remote()
    ray.get(sam.ready.remote(), timeout=60)
    queue = TaskQueue(limit, limit_after_chips=ray_cfg.back_half_tasks(2.0, chips_done=True))
    # Judged by when the tasks ran, not by how long a result took: on a loaded machine a task
    # worker can take seconds to start, but a task that Ray's accounting held back starts only
    # after another one ended.
    tiles: list = []
    for _ in range(2):
        queue.submit((0, 0), lambda: _span.options(num_cpus=ray_cfg.sink_cpus).remote(5.0), tiles.append)
    queue.poll(0)
    read = ray.get(_span.options(num_cpus=ray_cfg.read_cpus).remote(0.0), timeout=30)
    _drain(queue)
    assert read[0] < min(end for _, end in tiles), "the chip read waited for a back-half task's CPUs"
    assert _ran_together(tiles), "while chips are read, back-half tasks ran one at a time"
    queue.chips_done()  # no more reads: the last group's back half takes both slots
    cells: list = []
    for _ in range(2):
        queue.submit((1, 0), lambda: _span.options(num_cpus=ray_cfg.sink_cpus).remote(3.0), cells.append)
    _drain(queue)
    assert _ran_together(cells), "after the last chip, back-half tasks still ran one at a time"
    ray.kill(sam)
