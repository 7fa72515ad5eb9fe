"""One date group's way through the back half, as the driver sees it: an explicit state machine.

    waiting ──(last chip checkpointed)──► merging ──► [resolving] ──► writing ──► finalizing ──► published

* **waiting**: its chips stream through the SAM actors. Its Sentinel-2 tile tasks start as soon as
  the group is *activated* (its chips start flowing), since they need no masks.
* **merging**: one task per merge cell (:func:`raysam.cells.merge_one_cell`); a cell reports its
  kept count, so ids are planned here (:func:`raysam.cells.id_offsets`) without a sort.
* **resolving**: only if some cell left records unresolved (:func:`raysam.cells.resolve_group`).
* **writing**: one task per merge cell writes its GeoParquet part and label tiles.
* **finalizing**: the driver writes the mosaics (VRTs); tasks write the single files (below the
  size threshold) and the quicklook.
* **published**: the driver writes manifest.json, publishes with the completion marker, removes
  the work directory and releases the lock.

The driver only ever holds small metadata per group: cell counts, tile windows, timings.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, time as dtime
from typing import Any

from raysam import checkpoint, tasks
from raysam.cells import CellMerged, IdPlan, id_offsets
from raysam.config import RunConfig
from raysam.grid import chip_rows
from raysam.layout import (ITEM, LABELS_STYLE, LABELS_TIF, LABELS_VRT, MANIFEST, S2_DIR, GroupSpec, label_tile,
                           polygon_part, s2_tif, s2_tile, s2_vrt)
from raysam.plan import GroupPlan
from raysam.scheduler import TaskQueue
from raysam.signing import signer_spec
from raysam.sinks.labels import LABEL_DESCRIPTION, LABEL_NODATA
from raysam.sinks.mosaic import MosaicBand, vrt_xml
from raysam.sinks.quicklook import QuicklookFrame
from raysam.sinks.s2 import CATEGORICAL_BANDS, S2TileWritten, band_ids, band_mosaic_xml, band_scale_offset
from raysam.sinks.stac_output import (LABEL_BAND, Band, PolygonOutput, PublishedGroup, QuicklookOutput, RasterOutput,
                                      collection_info, group_item_json, processing_from_manifest, published_group,
                                      update_collection)
from raysam.sinks.style import label_style_qml, s2_band_description
from raysam.storage.publish import LocalPublisher, ObjectStorePublisher

log = logging.getLogger(__name__)


class Stage(enum.Enum):
    WAITING = "waiting"
    MERGING = "merging"
    RESOLVING = "resolving"
    WRITING = "writing"
    FINALIZING = "finalizing"
    PUBLISHED = "published"


@dataclass
class _Progress:
    """What the group's tasks reported so far (small)."""

    merged: dict = field(default_factory=dict)  # cell -> CellMerged
    ids: IdPlan = field(default_factory=IdPlan)
    label_tiles: list = field(default_factory=list)  # (tile, window)
    s2_tiles: list = field(default_factory=list)  # S2TileWritten
    cells_written: int = 0
    masks: int = 0
    finals_left: int = 0
    cpu_s: dict = field(default_factory=dict)  # back-half stage -> task seconds
    wall_s: dict = field(default_factory=dict)  # stage -> wall seconds since the group was activated


class GroupJob:
    """The driver's view of one date group: launches its tasks and publishes it.

    Args:
        index: the group's position in the run (earlier groups' tasks go first).
        plan: the group's plan (lock held).
        spec: what its tasks need (where to write).
        cfg: the run config.
        queue: the driver's task queue (Ray tasks, or calls in process).
        publisher: how the group is published.
        stats: the run's :class:`~raysam.runstats.RunStats` actor.
        manifest_base: the run-level part of the manifest.
        on_published: called with the group's manifest once it is published.
    """

    def __init__(self, index: int, plan: GroupPlan, spec: GroupSpec, cfg: RunConfig, queue: TaskQueue,
                 publisher: LocalPublisher | ObjectStorePublisher, stats: Any, manifest_base: dict[str, Any],
                 on_published: Callable[[dict], None]):
        self.index, self.plan, self.spec, self.cfg = index, plan, spec, cfg
        self.queue, self.publisher, self.stats = queue, publisher, stats
        self.manifest_base, self.on_published = manifest_base, on_published
        self.stage = Stage.WAITING
        self.active = False
        self.t_active: float | None = None
        self.progress = _Progress()
        grid = spec.group.grid
        self.tiling = spec.tiling
        self.cells = self.tiling.cells_in(grid, spec.group.aoi_utm)
        self.tiles = self.tiling.tiles_in(grid, spec.group.aoi_utm)
        self.n_chip_rows = chip_rows(grid, spatial_overlap=spec.spatial_overlap)
        self.frame = QuicklookFrame(grid.height, grid.width)
        self.single_files = grid.width * grid.height <= cfg.output.single_file_max_mpx * 1e6
        self.masks_on = "segmentation_mask" in cfg.output.sinks
        self.s2_on = "s2_raster" in cfg.output.sinks
        self.merge_params = cfg.merge
        items = spec.group.items
        self.datetime_utc = (min(i.datetime_utc for i in items) if items
                             else datetime.combine(spec.group.date, dtime(0), tzinfo=UTC))

    @property
    def group_id(self) -> str:
        return self.spec.group.id

    def _submit(self, stage_rank: int, on_done: Callable[[Any], None], fn: Any, *args: Any,
                num_cpus: float | None = None) -> None:
        """Queue ``fn(*args)`` (one of :mod:`raysam.tasks`), reserving ``ray.sink_cpus`` unless told."""
        cpus = self.cfg.ray.sink_cpus if num_cpus is None else num_cpus
        self.queue.submit((self.index, stage_rank), lambda: self.queue.call(fn, args, cpus), on_done)

    def _mark(self, stage: str) -> None:
        self.progress.wall_s[stage] = round(time.perf_counter() - (self.t_active or time.perf_counter()), 3)

    def _cpu(self, stage: str, seconds: float) -> None:
        self.progress.cpu_s[stage] = round(self.progress.cpu_s.get(stage, 0.0) + seconds, 3)

    # ------------------------------------------------------------------ waiting
    def activate(self) -> None:
        """The group's chips start flowing: start its Sentinel-2 tiles (they need no masks)."""
        if self.active:
            return
        self.active, self.t_active = True, time.perf_counter()
        if not self.s2_on:
            return
        bands = band_ids(self.cfg.output.s2_bands)
        for tile in self.tiles:
            self._submit(3, self._s2_written, tasks.write_s2_tile, self.spec, tile, bands, self.frame,
                         signer_spec(self.cfg.stac), self.cfg.network)

    def observe(self, rows_planned: int, chips_planned: int, chips_done: int) -> None:
        """Progress from :meth:`raysam.runstats.RunStats.progress`; starts the merge when all chips are in."""
        if chips_done:
            self.activate()
        if self.stage is Stage.WAITING and rows_planned == self.n_chip_rows and chips_done >= chips_planned:
            self.activate()
            self._mark("chips")
            self._start_merge()

    @property
    def chips_in(self) -> bool:
        return self.stage is not Stage.WAITING

    # ------------------------------------------------------------------ merging
    def _start_merge(self) -> None:
        self.stage = Stage.MERGING
        if not self.masks_on or not self.cells:
            self._start_writing()
            return
        for cell in self.cells:
            self._submit(0, self._cell_merged, tasks.merge_cell, self.spec, cell, self.merge_params)

    def _cell_merged(self, result: CellMerged) -> None:
        self.progress.merged[result.cell] = result
        self._cpu("merge", result.seconds)
        if len(self.progress.merged) < len(self.cells):
            return
        pending = tuple(u for m in self.progress.merged.values() for u in m.unresolved_uids)
        if pending:
            log.warning("date group %s: %d merge decisions outgrew the halo; widening it", self.group_id, len(pending))
            self.stage = Stage.RESOLVING
            self._submit(0, self._resolved, tasks.resolve_group, self.spec, pending, self.merge_params)
            return
        self._resolved(())

    def _resolved(self, kept: tuple[str, ...]) -> None:
        self.progress.ids = id_offsets(self.progress.merged.values(), kept)
        self._mark("merge")
        self._start_writing()

    # ------------------------------------------------------------------ writing
    def _start_writing(self) -> None:
        self.stage = Stage.WRITING
        if not self.masks_on:
            self._maybe_finalize()
            return
        ids = self.progress.ids
        tiles_by_cell: dict = {}
        for tile in self.tiles:
            tiles_by_cell.setdefault(self.tiling.cell_of_tile(tile), []).append(tile)
        for cell in self.cells:
            tiles = tuple(tiles_by_cell.get(cell, ()))
            needed = {cell} | {c for t in tiles for c in self.tiling.cells_touching(self.tiling.tile_window(t))}
            first_ids = {c: ids.first_id[c] for c in needed if c in ids.first_id}
            self._submit(1, self._cell_written, tasks.write_cell, self.spec, cell, first_ids, ids.resolved_kept,
                         self.datetime_utc, tiles, self.frame)

    def _cell_written(self, result: Any) -> None:
        self.progress.cells_written += 1
        self.progress.masks += result.n_masks
        self.progress.label_tiles.extend(result.tiles)
        self._cpu("cells", result.seconds)
        self._maybe_finalize()

    def _s2_written(self, result: S2TileWritten) -> None:
        self.progress.s2_tiles.append(result)
        self._cpu("s2", result.seconds)
        self._maybe_finalize()

    # ------------------------------------------------------------------ finalizing
    def _maybe_finalize(self) -> None:
        if self.stage is not Stage.WRITING:
            return
        cells_done = not self.masks_on or self.progress.cells_written == len(self.cells)
        s2_done = not self.s2_on or len(self.progress.s2_tiles) == len(self.tiles)
        if not (cells_done and s2_done):
            return
        self._mark("tiles")
        self.stage = Stage.FINALIZING
        finals = self._write_mosaics()
        self.progress.finals_left = len(finals)
        for kind, args in finals:
            self._submit(2, self._final_written, tasks.finalize, kind, self.spec, *args)
        if not finals:
            self._publish()

    def _write_mosaics(self) -> list[tuple[str, tuple]]:
        """Write the VRTs (small metadata) and list the finalize tasks to run."""
        grid, finals = self.spec.group.grid, []
        root = self.spec.root
        if self.masks_on:
            windows = sorted(self.progress.label_tiles)
            band = MosaicBand("uint32", LABEL_NODATA, LABEL_DESCRIPTION)
            xml = vrt_xml(grid.width, grid.height, grid.transform, grid.epsg, band,
                          [(label_tile(t), w) for t, w in windows])
            root.storage.put_bytes(self.spec.out(LABELS_VRT), xml.encode())
            parts = [polygon_part(c) for c in sorted(self.cells)]
            if self.single_files:
                finals.append(("single_cog", (LABELS_VRT, [label_tile(t) for t, _ in windows], LABELS_TIF, "NEAREST")))
                finals.append(("single_parquet", (parts,)))
        if self.s2_on:
            tiles = sorted(self.progress.s2_tiles, key=lambda r: r.tile)
            for band_id in band_ids(self.cfg.output.s2_bands):
                root.storage.put_bytes(self.spec.out(s2_vrt(band_id)), band_mosaic_xml(grid, band_id, tiles).encode())
                if self.single_files:
                    resampling = "NEAREST" if band_id in CATEGORICAL_BANDS else "AVERAGE"
                    finals.append(("single_cog", (s2_vrt(band_id), [s2_tile(band_id, r.tile) for r in tiles],
                                                  s2_tif(band_id), resampling, 2)))
        if "quicklook" in self.cfg.output.sinks:
            rgb = [(r.tile, r.window_px) for r in sorted(self.progress.s2_tiles, key=lambda r: r.tile)]
            finals.append(("write_quicklook", (self.frame, sorted(self.progress.label_tiles), rgb)))
        return finals

    def _final_written(self, seconds: float) -> None:
        self._cpu("finalize", seconds)
        self.progress.finals_left -= 1
        if self.progress.finals_left == 0:
            self._publish()

    # ------------------------------------------------------------------ publishing
    def _publish(self) -> None:
        """Write manifest.json, publish with the marker (last), drop the work directory."""
        from raysam.runstats import ask, memory_mb

        self._mark("finalize")
        counts, resources = ask([self.stats.group_counts.remote(self.group_id), self.stats.resources.remote()],
                                self.cfg.ray.timeout_s)
        peak, private = memory_mb()
        resources["peak_rss_mb"]["driver"], resources["peak_private_mb"]["driver"] = round(peak, 1), round(private, 1)
        manifest = self._manifest(counts, resources)
        root = self.spec.root
        if self.masks_on:
            root.storage.put_bytes(self.spec.out(LABELS_STYLE), label_style_qml(self.progress.ids.total).encode())
        root.write_json(self.spec.out(MANIFEST), manifest)
        collection = collection_info(self.manifest_base, self.manifest_base["run_key"])
        root.storage.put_bytes(self.spec.out(ITEM), group_item_json(self._published(), collection["collection_id"]).encode())
        marker = {"fingerprint": self.spec.fingerprint, "masks": self.progress.masks,
                  "finished_at": manifest["finished_at"]}
        self.publisher.publish(root, self.spec.write_dir, self.spec.out_dir, marker)
        self.stage = Stage.PUBLISHED
        update_collection(root, self.spec.out_dir.rsplit("/", 1)[0], **collection)
        self.on_published(manifest)  # releases the lock
        # The work directory goes in a task (a crash before it is done is tidied by the next run).
        self._submit(4, lambda _: None, tasks.delete_tree, root, self.spec.work_dir, num_cpus=0)

    def _published(self) -> PublishedGroup:
        """What the group published, for its STAC item."""
        single, grid = self.single_files, self.spec.group.grid
        labels = RasterOutput("labels", LABEL_BAND, cog=single, mosaic=True, style=True) if self.masks_on else None
        polygons = PolygonOutput(single_file=single, parts=True, count=self.progress.masks) if self.masks_on else None
        s2 = []
        for band_id in band_ids(self.cfg.output.s2_bands) if self.s2_on else ():
            so = band_scale_offset(band_id, self.progress.s2_tiles)
            band = Band(band_id, s2_band_description(band_id), "uint16", 0, so[0], so[1])
            s2.append(RasterOutput(f"{S2_DIR}/{band_id}", band, cog=single, mosaic=True))
        quicklook = None
        if "quicklook" in self.cfg.output.sinks:
            quicklook = QuicklookOutput(self.frame.shape, tuple(self.frame.transform(grid.transform))[:6])
        api_url = None if self.cfg.demo_catalog else self.cfg.stac.api_url
        return published_group(self.spec.group, processing_from_manifest(self.manifest_base), labels=labels,
                               polygons=polygons, s2_bands=tuple(s2), quicklook=quicklook, stac_api_url=api_url)

    def _manifest(self, counts: dict[str, Any], resources: dict[str, Any]) -> dict[str, Any]:
        """The group's manifest.json: run-level base, the group, its counts and its own timings."""
        group, grid = self.spec.group, self.spec.group.grid
        sam_wall = self.progress.wall_s.get("chips", 0.0)
        return {
            **self.manifest_base,
            "date_group": {
                "id": group.id, "date": group.date.isoformat(), "items": [i.id for i in group.items],
                "grid": {"crs": grid.crs, "transform": list(grid.transform), "width": grid.width, "height": grid.height},
                "area_km2": self.plan.area_km2,
                "cells": len(self.cells), "tiles": len(self.tiles), "single_files": self.single_files,
            },
            "counts": {**counts, "masks_after_merge": self.progress.masks, "items": len(group.items),
                       "chips_per_s": round(counts["chips_segmented"] / sam_wall, 4) if sam_wall else 0.0,
                       "resources": resources},
            "timings_s": {"wall_since_start": dict(self.progress.wall_s), "task_cpu": dict(self.progress.cpu_s)},
            "fingerprint": self.spec.fingerprint,
            "finished_at": datetime.now(UTC).isoformat(),
        }

    def abort(self) -> int:
        """Drop what this unfinished group wrote; its chip checkpoints stay for the next run.

        Returns:
            How many chip checkpoints were kept (a work directory without any is removed; one
            with some keeps only them and its fingerprint, not the merge cells or previews).
        """
        if self.stage is Stage.PUBLISHED:
            return 0
        root = self.spec.root
        self.publisher.abort(root, self.spec.write_dir)
        kept = checkpoint.count_shards(root, self.spec.work_dir)
        if not kept:
            root.storage.delete_tree(self.spec.work_dir)
            return 0
        for name in root.storage.list_names(self.spec.work_dir):
            if name not in (checkpoint.CHIPS_DIR, checkpoint.FINGERPRINT_FILE):
                root.storage.delete_tree(f"{self.spec.work_dir}/{name}")
        return kept
