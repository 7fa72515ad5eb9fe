"""Run statistics: per-chip progress and counts, model loads, peak memory per role, spilling.

One :class:`RunStats` actor per run, pinned to the head node (which a preemptible cluster never
loses), so the counters outlive any worker node. Every count is keyed by chip, so retried tasks
never count twice. The driver polls :meth:`RunStats.progress` to see when a date group's last
chip is checkpointed, and puts :meth:`RunStats.group_counts` and :meth:`RunStats.resources` in
the group's manifest.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import resource
import sys
import threading
from types import SimpleNamespace
from typing import Any

import ray

log = logging.getLogger(__name__)

STATS_ACTOR = "raysam-run-stats"


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


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where there is none."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_heap() -> None:
    """Give the heap that freed arrays leave behind back to the system: glibc's (``malloc_trim``;
    elsewhere a no-op) and, where pyarrow is loaded, its memory pool's (mimalloc or jemalloc).

    Ray keeps a worker process for the next task of any kind, and both allocators keep what a
    merge or a sink tile freed (glibc: arrays below its dynamic mmap threshold, up to 32 MB each;
    Arrow's pool: the GeoParquet parts' buffers, which ``malloc_trim`` does not touch: 270 MB of
    a 542 MB process after three large tables were written and freed), so the chip reads that
    ran in the same process after it carried that heap: bench_scale's read, merge and sink roles
    had 100-150 MB more private memory on the large region than on the demo. Called before and
    after each back-half task (reads run through the whole run, next to the merges), not per
    chip: memory given back is faulted in again by the next user.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    arrow = sys.modules.get("pyarrow")  # a process that never loaded it has nothing in its pool
    if arrow is not None:
        arrow.default_memory_pool().release_unused()


def reset_peak() -> None:
    """Start measuring a new unit of work: reset this process's peak RSS (``VmHWM``) to its current
    RSS (Linux ``/proc/self/clear_refs``; elsewhere a no-op). Ray runs tasks of different roles in
    the same worker processes, so without this a process's peak would be charged to every role."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def ask(ref: Any, timeout_s: float) -> Any:
    """``ray.get(ref)`` of a call to the run's stats actor, bounded by ``ray.timeout_s`` (the
    answers of an :class:`InProcessActor`, which are values already, as they are).

    Raises:
        DataError: no answer in time (the cluster is overloaded, or lost the actor's node).
    """
    from raysam.errors import DataError

    if not any(isinstance(r, ray.ObjectRef) for r in (ref if isinstance(ref, list) else [ref])):
        return ref
    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise DataError(f"the run's statistics actor did not answer within {timeout_s:g} s (ray.timeout_s): the "
                        "cluster is overloaded or lost its head node; re-run to resume") from None


def process_info(role: str) -> tuple[str, int, str, float, float]:
    """(role, pid, node id, peak RSS MB, peak private RSS MB) of the unit of work that just ran in
    this process (since :func:`reset_peak`), for :meth:`RunStats.process_peak`.

    The private peak is the peak RSS less the object-store pages the process maps now
    (``RssShmem``), which only grow during a unit of work.
    """
    peak, private = memory_mb()
    rss, _ = _rss_and_shmem()
    shared = rss - private
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else IN_PROCESS_NODE
    return (role, os.getpid(), node_id, peak, max(peak - shared, private))


def _rss_and_shmem() -> tuple[float, float]:
    fields: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssShmem"):
                    fields[key] = int(value.split()[0])
    except OSError:
        pass
    return fields.get("VmRSS", 0) / 1024, fields.get("RssShmem", 0) / 1024


class InProcessActor:
    """An actor's stand-in for a run without Ray: ``handle.method.remote(*args)`` calls the method
    of the wrapped object at once, one call at a time (as an actor would), and returns its value."""

    def __init__(self, obj: Any):
        self._obj, self._lock = obj, threading.Lock()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._obj, name)

        def remote(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return method(*args, **kwargs)

        return SimpleNamespace(remote=remote)


IN_PROCESS_NODE = "in-process"  # the node id a run without Ray reports
_in_process: list[InProcessActor] = []  # the stats of the run going on in this process without Ray


def use_in_process(stats: InProcessActor | None) -> None:
    """Make ``stats`` the run's statistics for :func:`run_stats` in this process (None: Ray's actor again)."""
    _in_process[:] = [stats] if stats is not None else []


def run_stats() -> Any:
    """The run's statistics: the :class:`RunStats` actor, or the run's :class:`InProcessActor`
    when it runs without Ray.

    Raises:
        ValueError: there is no run going on (no actor of that name, or no Ray).
    """
    if _in_process:
        return _in_process[0]
    if not ray.is_initialized():
        raise ValueError("no run is going on in this process")
    return ray.get_actor(STATS_ACTOR)


def report_peak(role: str) -> None:
    """Send the peak memory of the unit of work that just ran here to the run's :class:`RunStats`."""
    try:
        stats = run_stats()
    except ValueError:  # used on its own (tests, notebooks): nothing to report to
        return
    stats.process_peak.remote(*process_info(role))


def object_store_totals() -> dict[str, int]:
    """The cluster's cumulative object-store spill/restore totals (bytes and objects).

    Ray has no public API for these; this asks a raylet for the global memory info as
    ``ray memory --stats-only`` does. Returns an empty dict if that private API changes, or
    without Ray (a run in process has no object store).
    """
    if not ray.is_initialized():
        return {}
    try:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    except Exception as err:  # noqa: BLE001 - a report, never a reason to fail the run
        log.warning("object-store spill statistics unavailable: %s", err)
        return {}
    s = reply.store_stats
    return {"spilled_bytes": int(s.spilled_bytes_total), "spilled_objects": int(s.spilled_objects_total),
            "restored_bytes": int(s.restored_bytes_total)}


class RunCounters:
    """Idempotent per-chip counters, model loads and the peak memory of every process that ran our
    code: the state of the :class:`RunStats` actor (or of an :class:`InProcessActor`)."""

    def __init__(self) -> None:
        self.planned: dict[str, dict[int, int]] = {}  # group -> chip row -> chips planned in it
        self.done: dict[str, set[str]] = {}  # group -> chips checkpointed (segmented, skipped or resumed)
        self.segmented: dict[str, dict[str, tuple[int, int]]] = {}  # chip -> (masks, decoder prompts)
        self.skipped: dict[str, dict[str, str]] = {}  # chip -> reason
        self.resumed: dict[str, dict[str, dict]] = {}  # chip -> its checkpointed outcome
        self.seconds: dict[str, dict[str, float]] = {}  # group -> stage -> seconds (read, sam)
        self.model_loads: list[tuple[int, str]] = []
        self.processes: dict[tuple[int, str], dict] = {}  # (pid, role) -> peaks
        self.store_at_start = object_store_totals()

    def _proc(self, proc: tuple | None) -> None:
        if proc:
            self.process_peak(*proc)

    def _add_seconds(self, group_id: str, stage: str, seconds: float) -> None:
        stages = self.seconds.setdefault(group_id, {})
        stages[stage] = stages.get(stage, 0.0) + seconds

    def row_planned(self, group_id: str, row: int, n_chips: int, proc: tuple | None = None) -> None:
        self.planned.setdefault(group_id, {})[row] = n_chips
        self._proc(proc)

    def chip_resumed(self, group_id: str, chip: str, outcome: dict) -> None:
        self.resumed.setdefault(group_id, {})[chip] = outcome
        self.done.setdefault(group_id, set()).add(chip)

    def chip_skipped(self, group_id: str, chip: str, reason: str, seconds: float, proc: tuple | None = None) -> None:
        self.skipped.setdefault(group_id, {})[chip] = reason
        self.done.setdefault(group_id, set()).add(chip)
        self._add_seconds(group_id, "read", seconds)
        self._proc(proc)

    def chip_read(self, group_id: str, chip: str, seconds: float, proc: tuple | None = None) -> None:
        self._add_seconds(group_id, "read", seconds)
        self._proc(proc)

    def chip_segmented(self, group_id: str, chip: str, n_masks: int, decoder_prompts: int, seconds: float,
                       proc: tuple | None = None) -> None:
        self.segmented.setdefault(group_id, {})[chip] = (n_masks, decoder_prompts)
        self.done.setdefault(group_id, set()).add(chip)
        self._add_seconds(group_id, "sam", seconds)
        self._proc(proc)

    def model_loaded(self, pid: int, node_id: str) -> None:
        self.model_loads.append((pid, node_id))

    def process_peak(self, role: str, pid: int, node_id: str, rss_mb: float, private_mb: float) -> None:
        """Keep the highest peak and private RSS seen for a process in a role."""
        entry = self.processes.setdefault(
            (pid, role), {"pid": pid, "node_id": node_id, "roles": [role], "peak_rss_mb": 0.0, "peak_private_mb": 0.0})
        entry["peak_rss_mb"] = max(entry["peak_rss_mb"], round(rss_mb, 1))
        entry["peak_private_mb"] = max(entry["peak_private_mb"], round(private_mb, 1))

    def progress(self) -> dict[str, tuple[int, int, int]]:
        """Per date group: (chip rows planned, chips planned, chips checkpointed)."""
        return {gid: (len(rows), sum(rows.values()), len(self.done.get(gid, ()))) for gid, rows in self.planned.items()}

    def chips_done(self) -> int:
        """Chips through the SAM stage so far (all date groups)."""
        return sum(len(m) for m in self.segmented.values())

    def sam_pids(self) -> list[int]:
        """Process ids of the SAM actors that loaded a model, in load order."""
        return [pid for pid, _ in self.model_loads]

    def group_counts(self, group_id: str) -> dict[str, Any]:
        """A date group's chip counts, masks before the merge, decoder prompts and stage seconds.

        Totals count resumed chips too, so they do not depend on how often the run was interrupted;
        ``chips_segmented`` and ``chips_resumed`` say how the work was split.
        """
        segmented = self.segmented.get(group_id, {})
        resumed = self.resumed.get(group_id, {})
        reasons = dict(self.skipped.get(group_id, {}))
        reasons.update({c: o["reason"] for c, o in resumed.items() if o["status"] == "skipped"})
        by_reason: dict[str, int] = {}
        for reason in reasons.values():
            by_reason[reason] = by_reason.get(reason, 0) + 1
        return {
            "chips_planned": sum(self.planned.get(group_id, {}).values()),
            "chips_segmented": len(segmented),
            "chips_resumed": len(resumed),
            "chips_skipped": len(reasons),
            "chips_skipped_by_reason": dict(sorted(by_reason.items())),
            "masks_before_merge": sum(n for n, _ in segmented.values()) + sum(o["n_masks"] for o in resumed.values()),
            "decoder_prompts": sum(p for _, p in segmented.values()) + sum(o["decoder_prompts"] for o in resumed.values()),
            "stage_cpu_s": dict(self.seconds.get(group_id, {})),
        }

    def resources(self) -> dict[str, Any]:
        """Run-level resource report: model loads, peak memory per role and process, spilling.

        ``peak_private_mb`` is the figure that must stay flat as regions grow;
        ``peak_rss_mb`` also counts the object-store pages a process touched (shared, capped
        by the store's size). See :func:`memory_mb`.
        """
        self.process_peak(*process_info("stats"))
        end = object_store_totals()
        return {
            "sam_model_loads": len(self.model_loads),
            "peak_private_mb": self._by_role("peak_private_mb"),
            "peak_rss_mb": self._by_role("peak_rss_mb"),
            "processes": sorted(self.processes.values(), key=lambda e: (e["pid"], e["roles"])),
            "object_store": {k: end[k] - self.store_at_start.get(k, 0) for k in end},
        }

    def _by_role(self, key: str) -> dict[str, float]:
        by_role: dict[str, float] = {}
        for entry in self.processes.values():
            for role in entry["roles"]:
                by_role[role] = max(by_role.get(role, 0.0), entry[key])
        return dict(sorted(by_role.items()))


# The run's statistics on a Ray cluster: an actor pinned to the head node.
RunStats = ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001})(RunCounters)
