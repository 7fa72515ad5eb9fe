"""The driver's back-half task queue (raysam.scheduler) on a real local Ray instance."""

from __future__ import annotations

import time

import ray

from raysam.scheduler import InProcessQueue, TaskQueue


@ray.remote(num_cpus=0)
def _sleep(seconds: float, name: str) -> str:
    time.sleep(seconds)
    return name


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
