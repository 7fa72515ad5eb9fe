"""One merge cell's outputs: its GeoParquet part and the label tiles inside it.

Runs once the date group's ids are planned (:func:`raysam.cells.id_offsets`). The part holds the
records the cell owns, numbered from the cell's first id in uid order. A label tile paints every
kept mask that reaches into it: masks are owned by the cell of their box's top-left pixel and are
at most a chip wide, so they come from this cell and its neighbours up and to the left
(:meth:`raysam.tiles.Tiling.cells_touching`), whose first ids the driver passes along.
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pyarrow as pa

from raysam.cells import read_kept
from raysam.layout import GroupSpec, label_tile, polygon_part
from raysam.records import fixed_list_numpy
from raysam.sinks.cog import tile_transform, write_cog
from raysam.sinks.geoparquet import GeoParquetWriter, polygon_table
from raysam.sinks.labels import LABEL_DESCRIPTION, LABEL_NODATA, paint_labels
from raysam.sinks.quicklook import QuicklookFrame, label_preview
from raysam.tiles import CellRC, TileRC

_LABEL_COLUMNS = ("uid", "box_xyxy", "area", "mask_bits")


@dataclass(frozen=True)
class CellWritten:
    """What a cell's sink task reports: masks in its part, the label tiles it wrote, time spent."""

    cell: CellRC
    n_masks: int
    tiles: tuple[tuple[TileRC, tuple[int, int, int, int]], ...]
    seconds: float


def write_cell_outputs(spec: GroupSpec, cell: CellRC, first_ids: Mapping[CellRC, int],
                       resolved_kept: frozenset[str], datetime_utc: datetime, tiles: Sequence[TileRC],
                       frame: QuicklookFrame) -> CellWritten:
    """Write the cell's polygon part and its label tiles (with their quicklook previews).

    Args:
        spec: the date group.
        cell: the merge cell.
        first_ids: the first id of this cell and of every cell whose masks can reach its tiles.
        resolved_kept: unresolved uids the wider merge kept (rare).
        datetime_utc: the acquisition time, for the polygons.
        tiles: the sink tiles of this cell that touch the AOI.
        frame: the quicklook grid, for the label previews.
    """
    t0 = time.perf_counter()
    own = read_kept(spec, cell, resolved_kept)
    ids = first_ids[cell] + np.arange(own.num_rows, dtype=np.int64)
    writer_rows = polygon_table(own, ids, datetime_utc, spec.group.grid.epsg)
    with spec.root.storage.put_file(spec.out(polygon_part(cell))) as local:
        writer = GeoParquetWriter(local, spec.group.id)
        writer.write(writer_rows)
        writer.close()
    kept = {cell: (own.select(list(_LABEL_COLUMNS)), ids)}
    written = []
    for tile in tiles:
        window = spec.tiling.tile_window(tile)
        for other in spec.tiling.cells_touching(window):
            if other not in kept and other in first_ids:
                table = read_kept(spec, other, resolved_kept, _LABEL_COLUMNS)
                kept[other] = (table, first_ids[other] + np.arange(table.num_rows, dtype=np.int64))
        labels = _paint(window, [kept[c] for c in spec.tiling.cells_touching(window) if c in kept])
        write_cog(spec.root.storage, spec.out(label_tile(tile)), labels,
                  tile_transform(spec.group.grid.transform, window), spec.group.grid.epsg,
                  nodata=LABEL_NODATA, description=LABEL_DESCRIPTION, overview_resampling="NEAREST")
        buf = io.BytesIO()
        np.save(buf, label_preview(labels, window, frame))
        spec.root.storage.put_bytes(spec.preview("labels", tile), buf.getvalue())
        written.append((tile, window))
    return CellWritten(cell, own.num_rows, tuple(written), time.perf_counter() - t0)


def _paint(window_px: tuple[int, int, int, int], sources: Sequence[tuple[pa.Table, np.ndarray]]) -> np.ndarray:
    """Paint the masks of ``sources`` (kept records and their ids) that meet the window."""
    x0, y0, w, h = window_px
    boxes, bits, areas, ids = [], [], [], []
    for table, table_ids in sources:
        if table.num_rows == 0:
            continue
        box = fixed_list_numpy(table.column("box_xyxy"), 4)
        hit = np.flatnonzero((box[:, 0] < x0 + w) & (box[:, 2] >= x0) & (box[:, 1] < y0 + h) & (box[:, 3] >= y0))
        if hit.size == 0:
            continue
        boxes.append(box[hit])
        bits.extend(table.column("mask_bits").take(pa.array(hit)).to_pylist())
        areas.append(table.column("area").to_numpy()[hit])
        ids.append(table_ids[hit])
    if not boxes:
        return np.zeros((h, w), np.uint32)
    return paint_labels(window_px, np.concatenate(boxes), bits, np.concatenate(areas), np.concatenate(ids))
