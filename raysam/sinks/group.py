"""All sinks of one date group, streamed: masks.parquet, labels.tif, s2/*.tif, quicklook, manifest.

Merged rows arrive sorted by uid; ids are assigned in that order (1, 2, ...), so the same
inputs give the same files. Everything is written into a staging directory and published
atomically with a completion marker (:class:`raysam.sinks.store.OutputRoot`).
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, time as dtime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from affine import Affine

from raysam.records import unpack_crop
from raysam.sinks.geoparquet import GeoParquetWriter, polygon_table
from raysam.sinks.labels import LabelRasterWriter
from raysam.sinks.quicklook import write_quicklook
from raysam.sinks.stac_output import (
    LABEL_BAND, PolygonOutput, RasterOutput, collection_info, georeference_quicklook, processing_from_manifest,
    published_group, s2_raster_output, update_collection, write_group_item)
from raysam.sinks.store import OutputRoot
from raysam.sinks.style import write_label_style


@dataclass
class GroupSinkSpec:
    """What to write for one date group and where."""

    group: Any  # raysam.grid.DateGroup
    out_dir: str
    sinks: tuple[str, ...]
    s2_bands: tuple[str, ...]
    fingerprint: str
    run_key: str
    manifest_base: dict = field(default_factory=dict)
    signer: Any = None  # signs asset hrefs for the s2_raster reads (raysam.stac.make_href_signer)
    network: Any = None  # raysam.read.NetworkPolicy for those reads (None: its defaults)
    stac_api_url: str | None = None  # where the items live, for the STAC item's derived_from links


class GroupWriter:
    """Streams merged MaskRecord rows of one date group into its sinks."""

    def __init__(self, spec: GroupSinkSpec, root: OutputRoot):
        self.spec, self.root = spec, root
        self.t0 = time.perf_counter()
        grid = spec.group.grid
        self.staging = root.staging_dir(spec.out_dir)
        self.datetime_utc = datetime.combine(spec.group.date, dtime(0), tzinfo=UTC)
        if spec.group.items:
            self.datetime_utc = min(i.datetime_utc for i in spec.group.items)
        self.parquet = GeoParquetWriter(self.staging / "masks.parquet", spec.group.id)
        self.labels = LabelRasterWriter(
            self.staging / "labels.tif", grid.width, grid.height, Affine(*grid.transform), grid.epsg, self.staging
        )
        self.count = 0

    def add(self, table: pa.Table) -> None:
        """Append merged rows (uid order): assign ids, paint labels, write polygons."""
        n = table.num_rows
        if n == 0:
            return
        ids = np.arange(self.count + 1, self.count + n + 1, dtype=np.int64)
        boxes = np.asarray(table.column("box_xyxy").to_pylist(), np.int64)
        areas = table.column("area").to_numpy()
        for mask_id, box, bits, area in zip(ids, boxes, table.column("mask_bits").to_pylist(), areas, strict=True):
            self.labels.paint(int(mask_id), box, unpack_crop(bits, box), int(area))
        self.parquet.write(polygon_table(table, ids, self.datetime_utc, self.spec.group.grid.epsg))
        self.count += n

    def abort(self) -> None:
        """Drop everything written so far (the published outputs are untouched)."""
        self.parquet.close()
        shutil.rmtree(self.staging, ignore_errors=True)

    def close(self, counts: dict[str, Any], stage_seconds: dict[str, float]) -> dict[str, Any]:
        """Finish every sink, write manifest.json and publish the directory with its marker."""
        from raysam.sinks.s2 import write_s2_rasters

        self.parquet.close()
        self.labels.close()
        write_label_style(self.staging / "labels", self.count)
        s2_dir, s2_paths = None, []
        if "s2_raster" in self.spec.sinks:
            s2_dir = self.staging / "s2"
            s2_paths = write_s2_rasters(self.spec.group, self.spec.s2_bands, s2_dir, self.spec.signer,
                                        self.spec.network)
        quicklook = None
        if "quicklook" in self.spec.sinks:
            write_quicklook(self.staging / "labels.tif", s2_dir, self.staging / "quicklook.png")
            quicklook = georeference_quicklook(self.staging / "quicklook.png", self.spec.group.grid)
        manifest = {
            **self.spec.manifest_base,
            "date_group": {
                "id": self.spec.group.id,
                "date": self.spec.group.date.isoformat(),
                "items": [i.id for i in self.spec.group.items],
                "grid": {
                    "crs": f"EPSG:{self.spec.group.grid.epsg}", "transform": list(self.spec.group.grid.transform),
                    "width": self.spec.group.grid.width, "height": self.spec.group.grid.height,
                },
                "area_km2": self.spec.group.aoi_utm.area / 1e6,
            },
            "counts": {**counts, "masks_after_merge": self.count, "items": len(self.spec.group.items)},
            "timings_s": {**stage_seconds, "sinks": time.perf_counter() - self.t0},
            "fingerprint": self.spec.fingerprint,
            "run_key": self.spec.run_key,
            "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "finished_at": datetime.now(UTC).isoformat(),
        }
        (self.staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        published = published_group(
            self.spec.group, processing_from_manifest(self.spec.manifest_base),
            labels=RasterOutput("labels", LABEL_BAND, style=True), polygons=PolygonOutput(count=self.count),
            s2_bands=tuple(s2_raster_output(p, "s2") for p in s2_paths), quicklook=quicklook,
            stac_api_url=self.spec.stac_api_url)
        collection_dir = self.spec.out_dir.rsplit("/", 1)[0]
        collection = collection_info(self.spec.manifest_base, self.spec.run_key)
        write_group_item(published, collection["collection_id"], self.staging)
        marker = {"fingerprint": self.spec.fingerprint, "masks": self.count, "finished_at": manifest["finished_at"]}
        self.root.publish(self.staging, self.spec.out_dir, marker)
        update_collection(self.root.fs, collection_dir, **collection)
        return manifest
