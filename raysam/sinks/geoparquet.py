"""The polygons as fiboa 0.3 GeoParquet 1.1: rows built from merged records, streamed by row group.

Every file (``masks.parquet`` or one ``masks/`` part) has the same Arrow schema and the same
header: the GeoParquet ``geo`` metadata (WKB in EPSG:4326, a ``bbox`` covering column) and the
fiboa/Vecorel ``collection`` metadata, which lists the Vecorel 0.1.0 and fiboa 0.3.0 core
schemas and embeds raysam's own column schema (``raysam/data/fiboa-raysam-schema.yaml``) as
``schemas:custom``, so ``fiboa validate`` checks every column with no extra flag.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pyproj import CRS

GEOPARQUET_VERSION = "1.1.0"
VECOREL_SCHEMA_URI = "https://vecorel.org/specification/v0.1.0/schema.yaml"
FIBOA_SCHEMA_URI = "https://fiboa.org/specification/v0.3.0/schema.yaml"
CUSTOM_SCHEMA_FILE = "fiboa-raysam-schema.yaml"  # package data of raysam
DETERMINATION_METHOD = "auto-imagery"  # fiboa determination:method for automatic delineation
GEOMETRY_TYPES = ["MultiPolygon", "Polygon"]  # what raysam.sinks.polygons produces
BBOX_FIELDS = ("xmin", "ymin", "xmax", "ymax")

# Nullability follows the schemas: fiboa-cli requires a column to be non-nullable exactly when
# a schema lists it as required (Vecorel: id, geometry; raysam's custom schema: the rest).
SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("label_id", pa.uint32(), nullable=False),
        pa.field("determination:datetime", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("determination:method", pa.string(), nullable=False),
        pa.field("metrics:area", pa.float32(), nullable=False),
        pa.field("metrics:perimeter", pa.float32(), nullable=False),
        pa.field("predicted_iou", pa.float32(), nullable=False),
        pa.field("stability_score", pa.float32(), nullable=False),
        pa.field("chip_id", pa.string(), nullable=False),
        pa.field("utm_crs", pa.string(), nullable=False),
        pa.field("geometry", pa.binary(), nullable=False),
        pa.field("bbox", pa.struct([pa.field(k, pa.float64(), nullable=False) for k in BBOX_FIELDS]),
                 nullable=False),
    ]
)


def polygon_table(records: pa.Table, label_ids: np.ndarray, datetime_utc: datetime, utm_epsg: int) -> pa.Table:
    """The polygon rows (:data:`SCHEMA`) of merged mask records.

    Args:
        records: merged records with ``area_m2``, ``perimeter_m``, ``predicted_iou``,
            ``stability_score``, ``chip_row``, ``chip_col``, ``geometry`` (EPSG:4326 WKB) and
            ``bbox_xmin`` .. ``bbox_ymax`` (the geometry's bounds).
        label_ids: one id per row, as painted into the label raster (1 .. 2**32 - 1).
        datetime_utc: the acquisition time of the date group (stored to the millisecond).
        utm_epsg: EPSG code of the date group's target grid.

    Returns:
        The table; ``id`` is ``label_ids`` as strings (fiboa requires a string id).
    """
    n = records.num_rows
    label_ids = np.asarray(label_ids)
    if label_ids.shape != (n,) or (n and (label_ids.min() < 1 or label_ids.max() > np.iinfo(np.uint32).max)):
        raise ValueError(f"need {n} label ids in 1..2**32-1, got shape {label_ids.shape}")
    when = datetime_utc.astimezone(UTC).replace(microsecond=datetime_utc.microsecond // 1000 * 1000)
    chips = [f"{r}_{c}" for r, c in zip(records.column("chip_row").to_pylist(),
                                        records.column("chip_col").to_pylist(), strict=True)]
    columns = {
        "id": pa.array(label_ids.astype(str), pa.string()),
        "label_id": pa.array(label_ids.astype(np.uint32), pa.uint32()),
        "determination:datetime": pa.array([when] * n, pa.timestamp("ms", tz="UTC")),
        "determination:method": pa.array([DETERMINATION_METHOD] * n, pa.string()),
        "metrics:area": records.column("area_m2").cast(pa.float32()),
        "metrics:perimeter": records.column("perimeter_m").cast(pa.float32()),
        "predicted_iou": records.column("predicted_iou").cast(pa.float32()),
        "stability_score": records.column("stability_score").cast(pa.float32()),
        "chip_id": pa.array(chips, pa.string()),
        "utm_crs": pa.array([f"EPSG:{utm_epsg}"] * n, pa.string()),
        "geometry": records.column("geometry").cast(pa.binary()),
        "bbox": pa.StructArray.from_arrays(
            [records.column(f"bbox_{k}").combine_chunks().cast(pa.float64()) for k in BBOX_FIELDS],
            fields=list(SCHEMA.field("bbox").type),
        ),
    }
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def geo_metadata() -> dict:
    """The GeoParquet ``geo`` file metadata: WKB in EPSG:4326 (x = lon), with a bbox covering column."""
    return {
        "version": GEOPARQUET_VERSION,
        "primary_column": "geometry",
        "columns": {
            "geometry": {
                "encoding": "WKB",
                "geometry_types": GEOMETRY_TYPES,
                "crs": CRS.from_epsg(4326).to_json_dict(),
                "covering": {"bbox": {k: ["bbox", k] for k in BBOX_FIELDS}},
            }
        },
    }


@cache
def custom_schema() -> dict[str, Any]:
    """raysam's column schema (Vecorel SDL), as shipped in the package."""
    return yaml.safe_load(resources.files("raysam").joinpath("data", CUSTOM_SCHEMA_FILE).read_text())


def collection_metadata(collection_id: str) -> dict[str, Any]:
    """The fiboa/Vecorel ``collection`` file metadata: schemas, collection id, raysam's columns."""
    return {
        "schemas": {collection_id: [VECOREL_SCHEMA_URI, FIBOA_SCHEMA_URI]},
        "collection": collection_id,
        "schemas:custom": custom_schema(),
    }


class GeoParquetWriter:
    """Writes tables of :data:`SCHEMA` into the row groups of one GeoParquet 1.1 / fiboa file.

    Args:
        path: the file to write.
        collection_id: the fiboa collection id (``collection`` and ``id`` together are unique,
            so use one per date group, e.g. the date group's id).
        row_group_size: rows per row group (the last one may be smaller).
    """

    def __init__(self, path: Path, collection_id: str, row_group_size: int = 50_000):
        self.path = Path(path)
        self._rows: list[pa.Table] = []
        self._buffered = 0
        self._row_group_size = row_group_size
        self._schema = SCHEMA.with_metadata({
            "geo": json.dumps(geo_metadata()),
            "collection": json.dumps(collection_metadata(collection_id)),
        })
        self._writer = pq.ParquetWriter(self.path, self._schema, compression="zstd", write_statistics=True)
        self.count = 0

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        """Append rows of :data:`SCHEMA` (from :func:`polygon_table`)."""
        if table.num_rows == 0:
            return
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        self._rows.append(table)
        self._buffered += table.num_rows
        self.count += table.num_rows
        if self._buffered >= self._row_group_size:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            table = pa.concat_tables(self._rows).replace_schema_metadata(self._schema.metadata)
            self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self._rows, self._buffered = [], 0

    def close(self) -> None:
        """Flush the last rows and write the footer."""
        self._flush()
        self._writer.close()
