"""The polygon rows and file: fiboa 0.3 valid (real fiboa-cli, offline), GeoParquet 1.1, DuckDB-readable."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely

from raysam.sinks.geoparquet import SCHEMA, GeoParquetWriter, polygon_table
from tests.sinks.validators import duckdb_connection, fiboa_validate, geoparquet_validate

WHEN = datetime(2024, 7, 1, 17, 3, 4, 123456, tzinfo=UTC)


def _records(n: int, **overrides) -> pa.Table:
    """Merged records (the columns a cell shard holds: raysam.cells.CELL_SCHEMA) of ``n`` 100 m squares in Iowa."""
    geoms = [shapely.box(-93.0 + i * 0.01, 41.0, -92.99 + i * 0.01, 41.01) for i in range(n)]
    bounds = np.array([g.bounds for g in geoms])
    columns = {
        "area_m2": np.full(n, 10_000.0), "perimeter_m": np.full(n, 400.0),
        "predicted_iou": np.full(n, 0.93, np.float32), "stability_score": np.full(n, 0.97, np.float32),
        "chip_row": np.arange(n), "chip_col": np.full(n, 2), "geometry": [shapely.to_wkb(g) for g in geoms],
        **{f"bbox_{k}": bounds[:, i] for i, k in enumerate(("xmin", "ymin", "xmax", "ymax"))},
    }
    return pa.table({**columns, **overrides})


def _write(path, *tables: pa.Table, collection_id: str = "demo_20240701"):
    writer = GeoParquetWriter(path, collection_id, row_group_size=3)
    for table in tables:
        writer.write(table)
    writer.close()
    return path


def test_rows_carry_the_label_ids_and_fiboa_types():
    table = polygon_table(_records(4), np.array([7, 8, 9, 4_000_000_000]), WHEN, 32615)
    assert table.schema == SCHEMA
    assert table.column("label_id").to_pylist() == [7, 8, 9, 4_000_000_000]  # uint32, as in labels.tif
    assert table.column("id").to_pylist() == ["7", "8", "9", "4000000000"]
    assert table.column("chip_id").to_pylist() == ["0_2", "1_2", "2_2", "3_2"]
    assert set(table.column("utm_crs").to_pylist()) == {"EPSG:32615"}
    # fiboa wants timestamps in ms: the microseconds are cut, not rounded
    assert set(table.column("determination:datetime").to_pylist()) == {WHEN.replace(microsecond=123000)}
    assert table.column("bbox").to_pylist()[0] == dict(zip(("xmin", "ymin", "xmax", "ymax"),
                                                           (-93.0, 41.0, -92.99, 41.01)))


@pytest.mark.parametrize("ids", [np.array([0, 1]), np.array([1, 2**32]), np.array([1])])
def test_label_ids_outside_uint32_or_of_the_wrong_count_are_refused(ids):
    with pytest.raises(ValueError, match="label ids"):
        polygon_table(_records(2), ids, WHEN, 32615)


def test_written_file_passes_fiboa_geoparquet_and_duckdb(tmp_path):
    path = _write(tmp_path / "masks.parquet", polygon_table(_records(5), np.arange(1, 6), WHEN, 32615),
                  polygon_table(_records(2), np.arange(6, 8), WHEN, 32615))
    assert pq.ParquetFile(path).metadata.num_row_groups == 2  # 5 rows, then the last 2
    ok, report = fiboa_validate(path)
    assert ok and "VALID" in report and "INVALID" not in report, report
    assert "No schema defined" not in report, report  # every column is declared by a schema
    collection = json.loads(pq.read_schema(path).metadata[b"collection"])
    assert collection["collection"] == "demo_20240701"
    assert set(collection["schemas:custom"]["properties"]) == {
        "label_id", "predicted_iou", "stability_score", "chip_id", "utm_crs"}
    ok, report = geoparquet_validate(path)
    assert ok, report
    con = duckdb_connection()
    geometry_type = dict(con.sql(f"DESCRIBE SELECT * FROM '{path}'").fetchall()[i][:2] for i in range(12))
    assert geometry_type["geometry"] == "GEOMETRY('EPSG:4326')" and geometry_type["label_id"] == "UINTEGER"
    areas = con.sql(f"SELECT label_id, ST_Area_Spheroid(ST_FlipCoordinates(geometry)) FROM '{path}' "
                    "ORDER BY label_id").fetchall()
    assert [a[0] for a in areas] == list(range(1, 8))
    assert all(abs(a[1] - 0.01 * 111_000 * 0.01 * 84_000) < 0.05 * 0.01 * 111_000 * 0.01 * 84_000 for a in areas)


@pytest.mark.parametrize(("column", "value", "message"), [
    ("stability_score", 1.5, "stability_score"),  # bounded by raysam's custom schema
    ("area_m2", 0.0, "metrics:area"),  # fiboa core: area > 0
])
def test_fiboa_validate_rejects_values_the_schemas_forbid(tmp_path, column, value, message):
    bad = _records(3)
    bad = bad.set_column(bad.schema.get_field_index(column), column,
                         pa.array(np.full(3, value, bad.schema.field(column).type.to_pandas_dtype())))
    path = _write(tmp_path / "bad.parquet", polygon_table(bad, np.arange(1, 4), WHEN, 32615))
    ok, report = fiboa_validate(path)
    assert not ok and "INVALID" in report and message in report, report


def test_fiboa_validation_is_offline_it_fails_without_the_local_schemas(tmp_path):
    """With no local copies fiboa-cli reaches for the network: the guard blocks it and fails the run."""
    path = _write(tmp_path / "masks.parquet", polygon_table(_records(2), np.arange(1, 3), WHEN, 32615))
    empty = tmp_path / "index.json"
    empty.write_text("{}")
    ok, report = fiboa_validate(path, schema_index=empty)
    assert not ok and "exit 3" in report and "network access attempted" in report, report
    assert re.search(r"socket.getaddrinfo \('(vecorel|fiboa|geoparquet)\.org', 443\)", report), report
