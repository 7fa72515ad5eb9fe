"""The exact cross-chip merge of one date group, cell by cell, from the chip checkpoints.

Each merge cell (:mod:`raysam.tiles`) reads the checkpoint shards of the chips whose windows
meet its region (the cell plus a one-chip halo), merges them with :func:`raysam.merge.merge_cell`
and stores the records it owns (box top-left in the cell) that are kept or still unresolved,
with their polygons, as one *cell shard* in the work directory. No shuffle: a cell knows which
chips it needs from the chip lattice. The rare unresolved records (link chains longer than the
halo) are decided by :func:`resolve_group` over the whole group, exactly as
:func:`raysam.merge.merge_grouped` does, so the result always equals one global merge.

Mask ids need no global sort: with each cell's kept count, the driver numbers cells in
row-major order (:func:`id_offsets`); within a cell, records are numbered in uid order.
Plain functions (I/O through :class:`~raysam.storage.root.OutputRoot`); no Ray.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from affine import Affine

from raysam.checkpoint import read_shard, shard_path
from raysam.errors import DataError
from raysam.grid import WindowPlanner, chip_lattice_px, plan_chips
from raysam.layout import GroupSpec
from raysam.merge import MergeParams, cell_keys, cell_region_px, merge_cell, resolve_pending
from raysam.records import RECORD_SCHEMA, fixed_list_numpy, to_mask_table
from raysam.sinks.polygons import polygon_columns
from raysam.tiles import CellRC

KEPT, UNRESOLVED = "kept", "unresolved"
CELL_SCHEMA = RECORD_SCHEMA.append(pa.field("status", pa.string()))
for _name, _type in (("geometry", pa.binary()), ("area_m2", pa.float64()), ("perimeter_m", pa.float64()),
                     ("bbox_xmin", pa.float64()), ("bbox_ymin", pa.float64()), ("bbox_xmax", pa.float64()),
                     ("bbox_ymax", pa.float64())):
    CELL_SCHEMA = CELL_SCHEMA.append(pa.field(_name, _type))


@dataclass(frozen=True)
class CellMerged:
    """What a cell's merge reports to the driver (a few bytes, plus the rare unresolved uids).

    Attributes:
        cell: (cell_row, cell_col).
        n_kept: records the cell owns that the merge keeps (exactly decided).
        unresolved_uids: owned records left for :func:`resolve_group`.
        n_records: records read (with the halo's).
        seconds: time spent.
    """

    cell: CellRC
    n_kept: int
    unresolved_uids: tuple[str, ...] = ()
    n_records: int = 0
    seconds: float = 0.0


def chips_meeting(spec: GroupSpec, region_px: tuple[int, int, int, int]) -> list[tuple[int, int]]:
    """Chips of the group whose windows meet the half-open region ``(x0, y0, x1, y1)``."""
    side = spec.chip_px
    rows_px, cols_px = chip_lattice_px(spec.group.grid, side, spec.spatial_overlap)
    x0, y0, x1, y1 = region_px
    rows = [i for i, off in enumerate(rows_px) if off < y1 and off + side > y0]
    cols = [i for i, off in enumerate(cols_px) if off < x1 and off + side > x0]
    if not rows or not cols:
        return []
    planner = WindowPlanner(spec.group, spec.chip_bands)
    return [chip.chip_id for chip in plan_chips(spec.group.grid, planner.aoi_utm, side, spec.spatial_overlap, rows, cols)
            if planner.task(chip.chip_id, chip.window_px) is not None]


def read_chip_records(spec: GroupSpec, chip_ids: Iterable[tuple[int, int]]) -> pa.Table:
    """The MaskRecords of checkpointed chips, concatenated.

    Raises:
        DataError: a shard is missing or corrupt (the group was declared complete without it).
    """
    tables = []
    for chip in chip_ids:
        path = shard_path(spec.work_dir, chip)
        try:
            tables.append(read_shard(spec.root, path, spec.fingerprint)[1])
        except Exception as err:  # noqa: BLE001 - missing or corrupt: the group cannot be merged
            raise DataError(f"date group {spec.group.id}: checkpoint {path} is missing or corrupt ({err}); "
                            "re-run the same command to redo that chip") from None
    return pa.concat_tables(tables) if tables else RECORD_SCHEMA.empty_table()


def merge_one_cell(spec: GroupSpec, cell: CellRC, params: MergeParams) -> CellMerged:
    """Merge a cell from the chip checkpoints and store what it owns (kept and unresolved).

    The records that meet the cell's region are exactly those :func:`raysam.merge.cell_keys`
    sends to the cell, so the decisions are :func:`raysam.merge.merge_cell`'s.
    """
    t0 = time.perf_counter()
    tiling = spec.tiling
    records = read_chip_records(spec, chips_meeting(spec, cell_region_px(cell, tiling.cell_px, tiling.halo_px)))
    if records.num_rows:
        rec, keys = cell_keys(fixed_list_numpy(records.column("box_xyxy"), 4), tiling.cell_px, tiling.halo_px,
                              tiling.grid_hw_px)
        records = records.take(pa.array(np.unique(rec[(keys == cell).all(axis=1)])))
    result = merge_cell(to_mask_table(records), cell, tiling.cell_px, tiling.halo_px, tiling.grid_hw_px,
                        **asdict(params))
    uids = records.column("uid")
    kept = pc.is_in(uids, value_set=pa.array(result.kept_uids.astype(str), pa.string()))
    unresolved = pc.is_in(uids, value_set=pa.array(result.unresolved_uids.astype(str), pa.string()))
    owned = records.filter(pc.or_(kept, unresolved))
    status = pa.array(np.where(pc.filter(kept, pc.or_(kept, unresolved)).to_numpy(zero_copy_only=False),
                               KEPT, UNRESOLVED), pa.string())
    write_cell_shard(spec, cell, owned, status)
    return CellMerged(cell, int(result.kept_uids.size), tuple(sorted(map(str, result.unresolved_uids))),
                      records.num_rows, time.perf_counter() - t0)


def write_cell_shard(spec: GroupSpec, cell: CellRC, owned: pa.Table, status: pa.Array) -> None:
    """Store a cell's owned records with status and polygons (EPSG:4326 WKB, metres measured in UTM)."""
    table = owned.append_column("status", status).sort_by("uid")
    grid = spec.group.grid
    polys = polygon_columns(fixed_list_numpy(table.column("box_xyxy"), 4), table.column("mask_bits").to_pylist(),
                            Affine(*grid.transform), grid.epsg)
    for name in CELL_SCHEMA.names[len(table.schema):]:
        table = table.append_column(name, pa.array(polys[name], CELL_SCHEMA.field(name).type))
    buf = pa.BufferOutputStream()
    pq.write_table(table.cast(CELL_SCHEMA), buf, compression="zstd")
    spec.root.storage.put_bytes(spec.cell_shard(cell), buf.getvalue().to_pybytes())


def resolve_group(spec: GroupSpec, pending_uids: Sequence[str], params: MergeParams) -> tuple[str, ...]:
    """Which of a group's unresolved records the merge keeps: widen the halo until exact.

    Reads every chip shard of the group (rare: only link chains longer than a cell's halo get here).
    """
    tiling = spec.tiling
    region = (0, 0, tiling.width, tiling.height)
    table = to_mask_table(read_chip_records(spec, chips_meeting(spec, region)))
    kept = resolve_pending(table, np.asarray(pending_uids), tiling.cell_px, tiling.halo_px, tiling.grid_hw_px,
                           **asdict(params))
    return tuple(sorted(map(str, kept)))


def read_kept(spec: GroupSpec, cell: CellRC, resolved_kept: frozenset[str] = frozenset(),
              columns: Sequence[str] | None = None) -> pa.Table:
    """A cell's kept records in id order: ``kept`` rows and the unresolved ones resolved as kept."""
    path = spec.cell_shard(cell)
    if not spec.root.storage.exists(path):
        return CELL_SCHEMA.empty_table() if columns is None else CELL_SCHEMA.empty_table().select(list(columns))
    table = pq.read_table(pa.BufferReader(spec.root.storage.read_bytes(path)),
                          columns=None if columns is None else sorted(set(columns) | {"uid", "status"}))
    keep = pc.or_(pc.equal(table.column("status"), KEPT),
                  pc.is_in(table.column("uid"), value_set=pa.array(sorted(resolved_kept), pa.string())))
    table = table.filter(keep)
    return table if columns is None else table.select(list(columns))


@dataclass(frozen=True)
class IdPlan:
    """Mask ids of a date group: the first id of each cell (cells in row-major order).

    Attributes:
        first_id: cell -> the id of its first kept record (ids start at 1).
        resolved_kept: unresolved uids that the wider merge kept.
        total: kept records in the group.
    """

    first_id: dict[CellRC, int] = field(default_factory=dict)
    resolved_kept: frozenset[str] = frozenset()
    total: int = 0


def id_offsets(merged: Iterable[CellMerged], resolved_kept: Iterable[str] = ()) -> IdPlan:
    """Number the kept records: cell by cell in row-major order, uid order within a cell.

    Args:
        merged: every cell's :class:`CellMerged`.
        resolved_kept: the unresolved uids :func:`resolve_group` kept.
    """
    resolved = frozenset(resolved_kept)
    first, next_id = {}, 1
    for m in sorted(merged, key=lambda m: m.cell):
        first[m.cell] = next_id
        next_id += m.n_kept + sum(1 for u in m.unresolved_uids if u in resolved)
    return IdPlan(first, resolved, next_id - 1)
