"""The back half's merge from chip checkpoints, cell by cell, equals one global merge.

A synthetic date group of 16 x 16 small chips (64 px, 50 % overlap) carries random objects
segmented per chip with duplicates, plus a chain of 60 links longer than a cell and its halo, so
some decisions need the wider pass (:func:`raysam.cells.resolve_group`). Its records are
checkpointed as real shards; the cells read them back, as the Ray tasks do.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely
from pyproj import Transformer

from raysam import checkpoint
from raysam.cells import CELL_SCHEMA, chips_meeting, id_offsets, merge_one_cell, read_kept, resolve_group
from raysam.grid import DateGroup, TargetGrid
from raysam.items import BandAsset, ParsedItem
from raysam.layout import GroupSpec
from raysam.merge import MergeParams, merge_masks
from raysam.records import RECORD_SCHEMA, MaskTable, pack_crop, to_mask_table
from raysam.storage.root import OutputRoot
from tests.helpers import start_local_ray
from tests.test_merge import chain_records, make_scene, single_chip_table

CHIP_PX, N_CHIPS = 64, 16
GRID_PX = (N_CHIPS - 1) * CHIP_PX // 2 + CHIP_PX  # 544
FINGERPRINT = "fp-test"


def synthetic_group(grid_px: int = GRID_PX) -> DateGroup:
    """A date group on a UTM 15N grid with one item covering it all."""
    grid = TargetGrid(32615, 10.0, (10.0, 0.0, 500_000.0, 0.0, -10.0, 4_600_000.0), grid_px, grid_px)
    aoi = shapely.box(*grid.bounds)
    lon, lat = Transformer.from_crs(32615, 4326, always_xy=True).transform(*np.array(aoi.exterior.coords).T)
    footprint = shapely.box(min(lon) - 0.1, min(lat) - 0.1, max(lon) + 0.1, max(lat) + 0.1)
    bands = {b: BandAsset(b, f"/nonexistent/{b}.tif") for b in ("B02", "B03", "B04", "SCL")}
    item = ParsedItem("item", "sentinel-2-l2a", datetime(2024, 7, 1, tzinfo=UTC), "15TXX", 32615,
                      footprint.bounds, shapely.to_wkb(footprint), bands=bands)
    return DateGroup("synthetic_20240701", date(2024, 7, 1), (item,), grid, shapely.to_wkb(aoi))


def scene_table() -> MaskTable:
    scene = make_scene(21, n_chips=(N_CHIPS, N_CHIPS), chip_size=CHIP_PX, n_objects=500, size_px=(4, 48),
                       n_large=8, n_noise=40, dup_fraction=0.4)
    base = scene.table()
    chain = single_chip_table(chain_records(60, x_start=13, y=20))  # longer than a cell and its halo
    return MaskTable.concat([base, MaskTable(chain.mask_uid + len(base), *[
        getattr(chain, f) for f in ("chip_id", "chip_window_px", "box_xyxy", "predicted_iou", "stability_score",
                                    "area", "mask_bits")])])


def checkpoint_table(spec: GroupSpec, table: MaskTable) -> None:
    """Write the table's records as one shard per chip (every chip of the lattice gets one)."""
    uids = np.array([f"{int(u):06d}" for u in table.mask_uid])
    for chip in chips_meeting(spec, (0, 0, GRID_PX, GRID_PX)):
        sel = np.flatnonzero((table.chip_id == chip).all(axis=1))
        rows = {
            "date_group_id": [spec.group.id] * sel.size, "chip_row": [chip[0]] * sel.size,
            "chip_col": [chip[1]] * sel.size, "mask_index": list(range(sel.size)), "uid": uids[sel].tolist(),
            "box_xyxy": table.box_xyxy[sel].tolist(), "chip_window": table.chip_window_px[sel].tolist(),
            "predicted_iou": table.predicted_iou[sel], "stability_score": table.stability_score[sel],
            "area": table.area[sel], "point_xy": [[0.0, 0.0]] * sel.size, "prompt_round": [0] * sel.size,
            "mask_bits": [np.asarray(b).tobytes() for b in table.mask_bits[sel]],
        }
        outcome = checkpoint.ChipOutcome(chip, checkpoint.SEGMENTED, n_masks=int(sel.size))
        checkpoint.write_shard(spec.root, spec.work_dir, FINGERPRINT, outcome, pa.table(rows, schema=RECORD_SCHEMA))


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    root = OutputRoot.open(str(tmp_path_factory.mktemp("cells")))
    group = synthetic_group()
    spec = GroupSpec(group, root, FINGERPRINT, root.path("g"), root.path("g"), root.path(".work", "g"),
                     ("R", "G", "B", "SCL"), 0.5, CHIP_PX)
    table = scene_table()
    checkpoint_table(spec, table)
    expected = {f"{int(u):06d}" for u in table.mask_uid[merge_masks(table, 0.5, grid_hw_px=(GRID_PX, GRID_PX))]}
    return spec, table, expected


def _kept(spec: GroupSpec, merged, resolved) -> set[str]:
    return {u for m in merged for u in read_kept(spec, m.cell, frozenset(resolved)).column("uid").to_pylist()}


def test_every_chip_of_the_lattice_is_checkpointed(checkpointed):
    spec, table, _ = checkpointed
    assert len(chips_meeting(spec, (0, 0, GRID_PX, GRID_PX))) == N_CHIPS * N_CHIPS
    assert checkpoint.count_shards(spec.root, spec.work_dir) == N_CHIPS * N_CHIPS
    assert sum(checkpoint.read_shard(spec.root, checkpoint.shard_path(spec.work_dir, c), FINGERPRINT)[1].num_rows
               for c in chips_meeting(spec, (0, 0, GRID_PX, GRID_PX))) == len(table)


def test_cells_from_checkpoints_equal_one_global_merge(checkpointed):
    spec, _, expected = checkpointed
    params = MergeParams()
    cells = spec.tiling.cells_in(spec.group.grid, spec.group.aoi_utm)
    assert len(cells) == 9  # 544 px in cells of 4 chips (256 px)
    merged = [merge_one_cell(spec, cell, params) for cell in cells]
    pending = [u for m in merged for u in m.unresolved_uids]
    assert pending, "the chain must outgrow the halo"
    resolved = resolve_group(spec, pending, params)
    assert set(resolved) <= set(pending)
    kept = _kept(spec, merged, resolved)
    assert kept == expected
    ids = id_offsets(merged, resolved)
    assert ids.total == len(expected)
    # ids: cells in row-major order, uid order inside a cell; 1..n without gaps
    numbered = []
    for cell in sorted(cells):
        uids = read_kept(spec, cell, ids.resolved_kept).column("uid").to_pylist()
        assert uids == sorted(uids)
        numbered += [(ids.first_id[cell] + k, u) for k, u in enumerate(uids)]
    assert [n for n, _ in numbered] == list(range(1, len(expected) + 1))


def test_cell_shards_carry_polygons_in_lon_lat_with_metric_measures(checkpointed):
    spec, table, _ = checkpointed
    cell = (1, 1)
    merge_one_cell(spec, cell, MergeParams())
    shard = pq.read_table(spec.cell_shard(cell))
    assert shard.schema.equals(CELL_SCHEMA) and shard.num_rows > 0
    rec = to_mask_table(shard.select(RECORD_SCHEMA.names))
    assert np.all(rec.box_xyxy[:, :2] // spec.tiling.cell_px == cell[::-1])  # owned: top-left in the cell
    geoms = shapely.from_wkb(shard.column("geometry").to_pylist())
    assert all(-94 < g.centroid.x < -92 and 41 < g.centroid.y < 42 for g in geoms)
    np.testing.assert_allclose(shard.column("area_m2").to_numpy(), rec.area * 100.0)  # 10 m pixels


def test_a_corrupt_shard_stops_the_merge_with_one_line(tmp_path):
    root = OutputRoot.open(str(tmp_path))
    spec = GroupSpec(synthetic_group(), root, FINGERPRINT, root.path("g"), root.path("g"), root.path(".work", "g"),
                     ("R", "G", "B", "SCL"), 0.5, CHIP_PX)
    checkpoint_table(spec, scene_table())
    path = checkpoint.shard_path(spec.work_dir, (0, 0))
    data = root.storage.read_bytes(path)
    root.storage.put_bytes(path, data[: len(data) // 2])
    from raysam.errors import DataError

    with pytest.raises(DataError, match=r"checkpoint .*00000_00000.parquet is missing or corrupt .* re-run"):
        merge_one_cell(spec, (0, 0), MergeParams())


@pytest.mark.slow
def test_ray_cell_tasks_equal_one_global_merge(checkpointed):
    import ray

    from raysam import tasks

    spec, _, expected = checkpointed
    params = MergeParams(iou_mode="mask")
    start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cells = spec.tiling.cells_in(spec.group.grid, spec.group.aoi_utm)
        merged = ray.get([tasks.remote_task(tasks.merge_cell).remote(spec, cell, params) for cell in cells])
        pending = tuple(u for m in merged for u in m.unresolved_uids)
        resolved = ray.get(tasks.remote_task(tasks.resolve_group).remote(spec, pending, params))
    finally:
        ray.shutdown()
    assert _kept(spec, merged, resolved) == expected
