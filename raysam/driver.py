"""The run on the driver: check inputs, plan, start Ray, stream merged masks into the sinks.

:func:`prepare` does everything that can fail on bad input before Ray starts (model files,
output root, region, catalog search, planning). :func:`execute` runs the Ray Data pipeline and
writes each date group's sinks as its merged rows stream back (sorted by date group, then uid).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

import raysam
from raysam.config import RunConfig, redacted
from raysam.errors import ConfigError
from raysam.plan import GroupPlan, RunPlan, claim_todo, describe, plan_run, release_all
from raysam.records import GridInfo
from raysam.region import Region, load_region
from raysam.sinks.store import OutputRoot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """The checked inputs and the plan of a run."""

    plan: RunPlan
    root: OutputRoot
    model_dir: Path
    model_manifest: dict
    n_items: int

    def describe(self) -> str:
        """The dry-run report."""
        return describe(self.plan)


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
    from raysam.demo.catalog import free_port, make_demo_catalog, serve_catalog

    root = Path(cfg.demo_catalog)
    make_demo_catalog(root)
    port = free_port()
    proc = serve_catalog(root / "items.ndjson", port)
    try:
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
    """Check the model, output root and region, search the catalog and plan the run."""
    region = load_region(cfg.region)
    model_dir, manifest = ensure_model(cfg)
    root = OutputRoot.open(cfg.output.root)
    items = search(cfg, region)
    plan = plan_run(cfg, region, items, manifest, root)
    if not cfg.dry_run and plan.todo:
        root.check_writable()
    return Prepared(plan, root, model_dir, manifest, len(items))


def init_ray(cfg: RunConfig) -> None:
    """Connect to (or start) Ray; quiet, with the object store size if configured."""
    import ray

    if ray.is_initialized():
        return
    # No address: the cluster of a `ray job submit` (RAY_ADDRESS), else a fresh local instance,
    # never whatever `ray start` cluster happens to run on this machine (use ray=cluster for that).
    address = cfg.ray.address or (None if os.environ.get("RAY_ADDRESS") else "local")
    kwargs: dict[str, Any] = {"address": address, "log_to_driver": True, "include_dashboard": False}
    if cfg.ray.object_store_gb and address == "local":
        kwargs["object_store_memory"] = int(cfg.ray.object_store_gb * 1e9)
    ray.init(**{k: v for k, v in kwargs.items() if v is not None or k == "address"})


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
    }


def _scaling(cfg: RunConfig, group: Any, signer: Any) -> Any:
    """The date group's RGB scaling: computed once per group, never per chip."""
    from raysam.read import ScalingSpec, compute_stretch

    base = ScalingSpec(mode="reflectance", band_names=cfg.chip.band_names,
                       band_scaling=cfg.chip.band_scaling, band_offset=cfg.chip.band_offset)
    if cfg.chip.scaling == "stretch":
        return compute_stretch(group, cfg.chip.band_names, signer=signer, base=base, network=cfg.network)
    return base


def execute(cfg: RunConfig, prepared: Prepared) -> dict[str, Any]:
    """Claim the incomplete date groups (one lock each), run the pipeline and write their sinks.

    Raises:
        ConfigError: another run on the same output root holds a date group's lock.
    """
    todo, locks = claim_todo(prepared.plan, prepared.root, cfg.output.overwrite)
    try:
        with prepared.root.keep_alive(list(locks.values())):
            return _execute(cfg, prepared, todo, lambda gid: prepared.root.release(locks.pop(gid)))
    finally:
        release_all(prepared.root, locks)


def _execute(cfg: RunConfig, prepared: Prepared, todo: tuple[GroupPlan, ...],
             published: Callable[[str], None]) -> dict[str, Any]:
    """Run the pipeline over the claimed groups ``todo``; ``published(group_id)`` after each."""
    import ray

    from raysam.pipeline import (STATS_ACTOR, RunStats, merged_records, model_source_for, resolve_unresolved,
                                 sam_records, with_driver_memory)
    from raysam.sinks.group import GroupSinkSpec, GroupWriter
    from raysam.stac import make_href_signer

    plan = prepared.plan
    for g in plan.groups:
        if g.complete:
            log.info("date group %s is complete in %s: skipped", g.group.id, g.out_dir)
    metrics: dict[str, Any] = {
        "groups_done": 0, "groups_skipped": len(plan.groups) - len(todo), "chips_read": 0,
        "chips_skipped": 0, "masks": 0, "area_km2": sum(g.area_km2 for g in todo),
    }
    if not todo:
        return metrics
    t0 = time.perf_counter()
    init_ray(cfg)
    stats = RunStats.options(name=STATS_ACTOR, get_if_exists=True).remote()
    signer = make_href_signer(cfg.stac)
    scaling = {g.group.id: _scaling(cfg, g.group, signer) for g in todo}
    grids = {g.group.id: GridInfo(tuple(g.group.grid.transform), g.group.grid.epsg, g.group.grid.height,
                                  g.group.grid.width) for g in todo}
    groups = {g.group.id: g.group for g in todo}
    records_ds = sam_records(groups, cfg, scaling, model_source_for(cfg, prepared.model_dir))
    # No chip gave a mask (all skipped, or nothing found): nothing to merge, every group is empty.
    ds = merged_records(records_ds, cfg.merge, grids) if records_ds.count() else None
    unresolved: dict[str, list[pa.Table]] = {}
    base = manifest_base(cfg, prepared)
    specs = {
        g.group.id: GroupSinkSpec(g.group, g.out_dir, cfg.output.sinks, cfg.output.s2_bands,
                                  plan.fingerprint, plan.run_key, base, signer, cfg.network,
                                  None if cfg.demo_catalog else cfg.stac.api_url)
        for g in todo
    }
    writers: dict[str, GroupWriter] = {}
    finished: set[str] = set()

    def finish(group_id: str) -> None:
        writer = writers.pop(group_id, None) or GroupWriter(specs[group_id], prepared.root)
        finished.add(group_id)
        if unresolved.get(group_id):  # rare: decide them exactly, then write the kept ones
            pending = pa.concat_tables(unresolved.pop(group_id))
            kept = resolve_unresolved(records_ds, group_id, pending.column("uid").to_pylist(), cfg.merge, grids[group_id])
            writer.add(pending.filter(pc.is_in(pending.column("uid"), value_set=pa.array(sorted(kept), pa.string()))))
        counts = with_driver_memory(ray.get(stats.summary.remote(group_id)))
        elapsed = time.perf_counter() - t0
        counts["chips_per_s"] = counts["chips_read"] / elapsed if elapsed else 0.0
        manifest = writer.close(counts, {**ray.get(stats.stage_seconds.remote()), "pipeline_wall": elapsed})
        published(group_id)
        metrics["groups_done"] += 1
        metrics["chips_read"] += counts["chips_read"]
        metrics["chips_skipped"] += counts["chips_skipped"]
        metrics["masks"] += manifest["counts"]["masks_after_merge"]
        log.info("date group %s: %d masks -> %s", group_id, manifest["counts"]["masks_after_merge"], specs[group_id].out_dir)

    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=2048) if ds is not None else ():
            table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
            for group_id in pc.unique(table.column("date_group_id")).to_pylist():
                for done in [gid for gid in writers if gid < group_id]:
                    finish(done)
                if group_id not in writers:
                    writers[group_id] = GroupWriter(specs[group_id], prepared.root)
                rows = table.filter(pc.equal(table.column("date_group_id"), group_id))
                is_kept = pc.equal(rows.column("status"), "kept")
                writers[group_id].add(rows.filter(is_kept))
                pending = rows.filter(pc.invert(is_kept))
                if pending.num_rows:
                    unresolved.setdefault(group_id, []).append(pending)
        for group_id in sorted(set(specs) - finished):  # the rest, including groups without masks
            finish(group_id)
    finally:
        for writer in writers.values():  # a failed run leaves no staging directories behind
            writer.abort()
    ray.kill(stats)  # each run (each job of a multirun sweep) counts afresh
    metrics["pipeline_s"] = time.perf_counter() - t0
    return metrics
