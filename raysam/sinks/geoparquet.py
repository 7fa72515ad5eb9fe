"""GeoParquet 1.1 writer for the merged masks (fiboa-style columns), streamed by row group."""

from __future__ import annotations

import json
from pathlib import Path

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

    def write(self, batch: pa.RecordBatch) -> None:
        """Append rows (schema :data:`SCHEMA`)."""
        if batch.num_rows == 0:
            return
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
