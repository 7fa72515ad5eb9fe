"""The back half's tasks: one function per kind of task, run as a Ray task (:func:`remote_task`)
or, in a run without Ray, called in process.

Each calls its plain function (which tests call on its own) and reports the peak memory of that call
to the run's :class:`~raysam.runstats.RunStats` under its role (:func:`_measured`). As Ray tasks,
lost workers and nodes are retried without limit (``max_retries=-1``, system failures only); an
exception raised by our code fails the run at once with its own one line, as in the front half
(:func:`raysam.pipeline.configure_retries`).
"""

from __future__ import annotations

import functools
from typing import Any

import ray

from raysam.runstats import release_heap, report_peak, reset_peak

_REMOTE = {"max_retries": -1, "retry_exceptions": False}


@functools.cache
def remote_task(fn: Any) -> Any:
    """The Ray remote function of one of this module's tasks."""
    return ray.remote(**_REMOTE)(fn)


def _measured(role: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)``, with its peak memory reported under ``role``. The heap freed before it (by the
    chip reads that share the worker) goes back before it starts, and the heap it freed after."""
    release_heap()
    reset_peak()
    out = fn(*args)
    report_peak(role)
    release_heap()
    return out


@functools.lru_cache(maxsize=4)
def worker_signer(spec: Any) -> Any:
    """One href signer per worker process (from a key-free :class:`raysam.signing.SignerSpec`), so
    signed tokens are reused across reads."""
    from raysam.signing import make_href_signer

    return make_href_signer(spec)


def group_scaling(scaling: Any, group: Any, signer: Any, network: Any) -> Any:
    """The date group's RGB scaling (:func:`raysam.scaling.group_scaling`), computed on a worker."""
    from raysam.scaling import group_scaling as compute

    return _measured("plan", compute, scaling, group, worker_signer(signer), network)


def merge_cell(spec: Any, cell: tuple[int, int], params: Any) -> Any:
    """:func:`raysam.cells.merge_one_cell`."""
    from raysam.cells import merge_one_cell

    return _measured("merge", merge_one_cell, spec, cell, params)


def resolve_group(spec: Any, pending_uids: tuple[str, ...], params: Any) -> tuple[str, ...]:
    """:func:`raysam.cells.resolve_group`."""
    from raysam.cells import resolve_group as resolve

    return _measured("merge", resolve, spec, pending_uids, params)


def write_cell(spec: Any, cell: tuple[int, int], first_ids: dict, resolved_kept: frozenset, datetime_utc: Any,
               tiles: tuple, frame: Any) -> Any:
    """:func:`raysam.sinks.cell.write_cell_outputs`."""
    from raysam.sinks.cell import write_cell_outputs

    return _measured("sink", write_cell_outputs, spec, cell, first_ids, resolved_kept, datetime_utc, tiles, frame)


def write_s2_tile(spec: Any, tile: tuple[int, int], bands: tuple[str, ...], frame: Any, signer: Any,
                  network: Any) -> Any:
    """:func:`raysam.sinks.s2.write_s2_tile` (``signer``: a key-free :class:`raysam.signing.SignerSpec`)."""
    from raysam.sinks.s2 import write_s2_tile as write

    return _measured("sink", write, spec, tile, bands, frame, worker_signer(signer), network)


def finalize(kind: str, spec: Any, *args: Any) -> float:
    """One of :mod:`raysam.sinks.finalize`'s writers (``single_cog``, ``single_parquet``, ``write_quicklook``)."""
    from raysam.sinks import finalize as writers

    return _measured("sink", getattr(writers, kind), spec, *args)


def delete_tree(root: Any, path: str) -> None:
    """Remove a published group's work directory (one request per checkpoint on some object stores)."""
    root.storage.delete_tree(path)
