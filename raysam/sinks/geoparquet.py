"""GeoParquet 1.1 writer for the merged masks (fiboa-style columns), streamed by row group."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyproj import CRS

GEOPARQUET_VERSION = "1.1.0"

SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("determination:datetime", pa.timestamp("us", tz="UTC")),
        ("determination:method", pa.string()),
        ("metrics:area", pa.float64()),
        ("metrics:perimeter", pa.float64()),
        ("predicted_iou", pa.float32()),
        ("stability_score", pa.float32()),
        ("chip_id", pa.string()),
        ("utm_crs", pa.string()),
        ("geometry", pa.binary()),
        (
            "bbox",
            pa.struct([("xmin", pa.float64()), ("ymin", pa.float64()), ("xmax", pa.float64()), ("ymax", pa.float64())]),
        ),
    ]
)


GEOMETRY_TYPES = ["MultiPolygon", "Polygon"]  # what raysam.sinks.polygons produces
BBOX_FIELDS = ("xmin", "ymin", "xmax", "ymax")
DETERMINATION_METHOD = "auto-imagery"  # fiboa determination:method for automatic delineation


def polygon_table(records: pa.Table, label_ids: np.ndarray, datetime_utc: datetime, utm_epsg: int) -> pa.Table:
    """Rows of :data:`SCHEMA` for kept MaskRecords that carry their polygons.

    Args:
        records: merged records with ``area_m2``, ``perimeter_m``, ``predicted_iou``,
            ``stability_score``, ``chip_row``, ``chip_col``, ``geometry`` (EPSG:4326 WKB) and
            ``bbox_xmin`` .. ``bbox_ymax`` (see :data:`raysam.cells.CELL_SCHEMA`).
        label_ids: the ids the label raster uses for these records, in order.
        datetime_utc: the acquisition time (``determination:datetime``).
        utm_epsg: the target grid's CRS, where area and perimeter were measured.
    """
    n = records.num_rows
    return pa.Table.from_pydict(
        {
            "id": np.asarray(label_ids, np.int64),
            "determination:datetime": [datetime_utc] * n,
            "determination:method": [DETERMINATION_METHOD] * n,
            "metrics:area": records.column("area_m2"),
            "metrics:perimeter": records.column("perimeter_m"),
            "predicted_iou": records.column("predicted_iou").cast(pa.float32()),
            "stability_score": records.column("stability_score").cast(pa.float32()),
            "chip_id": [f"{r}_{c}" for r, c in zip(records.column("chip_row").to_pylist(),
                                                    records.column("chip_col").to_pylist(), strict=True)],
            "utm_crs": [f"EPSG:{utm_epsg}"] * n,
            "geometry": records.column("geometry"),
            "bbox": pa.StructArray.from_arrays(
                [records.column(f"bbox_{k}").combine_chunks().cast(pa.float64()) for k in BBOX_FIELDS],
                names=list(BBOX_FIELDS),
            ),
        },
        schema=SCHEMA,
    )


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
                "covering": {
                    "bbox": {
                        "xmin": ["bbox", "xmin"],
                        "ymin": ["bbox", "ymin"],
                        "xmax": ["bbox", "xmax"],
                        "ymax": ["bbox", "ymax"],
                    }
                },
            }
        },
    }


class GeoParquetWriter:
    """Streams record batches of :data:`SCHEMA` into row groups of a GeoParquet 1.1 file."""

    def __init__(self, path: Path, row_group_size: int = 50_000):
        self.path = Path(path)
        self._rows: list[pa.RecordBatch] = []
        self._buffered = 0
        self._row_group_size = row_group_size
        schema = SCHEMA.with_metadata({"geo": json.dumps(geo_metadata())})
        self._schema = schema
        self._writer = pq.ParquetWriter(self.path, schema, compression="zstd", write_statistics=True)
        self.count = 0

    def write(self, rows: pa.RecordBatch | pa.Table) -> None:
        """Append rows (schema :data:`SCHEMA`)."""
        for batch in rows.to_batches() if isinstance(rows, pa.Table) else [rows]:
            if batch.num_rows == 0:
                continue
            self._rows.append(batch)
            self._buffered += batch.num_rows
            self.count += batch.num_rows
            if self._buffered >= self._row_group_size:
                self._flush()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_batches(self._rows).replace_schema_metadata(self._schema.metadata))
        self._rows, self._buffered = [], 0

    def close(self) -> None:
        """Flush the last rows and write the footer."""
        self._flush()
        self._writer.close()
