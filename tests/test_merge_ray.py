"""The distributed merge (Ray groupby over cells) equals one global merge per date group."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import ray

from raysam.merge import MaskTable, MergeParams, merge_masks
from raysam.pipeline import merged_records, resolve_unresolved
from raysam.records import GridInfo, pack_crop
from tests.test_merge import chain_records, make_scene, single_chip_table

pytestmark = pytest.mark.slow

CHIP_PX = 64  # small chips (cells of 4 chips, halo of 1 chip) so a small scene spans many cells


def _rows(group_id: str, table: MaskTable) -> list[dict]:
    rows = []
    for k in range(len(table)):
        box = table.box_xyxy[k]
        crop = np.unpackbits(table.mask_bits[k], axis=1, count=int(box[2] - box[0] + 1)).astype(bool)
        rows.append({
            "date_group_id": group_id, "chip_row": int(table.chip_id[k, 0]), "chip_col": int(table.chip_id[k, 1]),
            "mask_index": k, "uid": f"{int(table.mask_uid[k]):06d}", "box_xyxy": box.astype(np.int32),
            "chip_window": table.chip_window_px[k].astype(np.int32), "predicted_iou": float(table.predicted_iou[k]),
            "stability_score": float(table.stability_score[k]), "area": int(table.area[k]),
            "point_xy": np.zeros(2, np.float32), "mask_bits": pack_crop(crop),
        })
    return rows


def _group_table(seed: int) -> tuple[MaskTable, tuple[int, int]]:
    scene = make_scene(seed, n_chips=(8, 8), chip_size=CHIP_PX, n_objects=220, size_px=(4, 48), n_large=6,
                       n_noise=20, dup_fraction=0.4)
    base = scene.table()
    chain = single_chip_table(chain_records(60, x_start=13, y=20))  # longer than cell + halo: unresolved
    table = MaskTable.concat([base, MaskTable(chain.mask_uid + len(base), *[
        getattr(chain, f) for f in ("chip_id", "chip_window_px", "box_xyxy", "predicted_iou", "stability_score",
                                    "area", "mask_bits")])])
    return table, scene.grid_hw_px


@pytest.mark.parametrize("iou_mode", ["mask", "box"])
def test_ray_grouped_merge_equals_global_merge_per_date_group(ray_local, iou_mode):
    groups = {f"g{seed}": _group_table(seed) for seed in (21, 22)}
    rows = [r for gid, (table, _) in groups.items() for r in _rows(gid, table)]
    grids = {gid: GridInfo((10.0, 0.0, 0.0, 0.0, -10.0, 0.0), 32615, hw[0], hw[1], chip_px=CHIP_PX)
             for gid, (_, hw) in groups.items()}
    merge = MergeParams(mask_nms_thr=0.5, iou_mode=iou_mode)
    records_ds = ray.data.from_items(rows, override_num_blocks=8).materialize()
    table = pa.concat_tables(ray.get(merged_records(records_ds, merge, grids).to_arrow_refs()))
    pending = table.filter(pc.equal(table.column("status"), "unresolved"))
    assert pending.num_rows > 0  # the chain needed the wider pass
    for gid, (t, hw) in groups.items():
        rows = table.filter(pc.equal(table.column("date_group_id"), gid))
        uids = rows.filter(pc.equal(rows.column("status"), "unresolved")).column("uid").to_pylist()
        decided = sorted(resolve_unresolved(records_ds, gid, uids, merge, grids[gid])) if uids else []
        kept = rows.filter(pc.or_(pc.equal(rows.column("status"), "kept"),
                                  pc.is_in(rows.column("uid"), value_set=pa.array(decided, pa.string()))))
        expected = {f"{u:06d}" for u in t.mask_uid[merge_masks(t, 0.5, iou_mode, grid_hw_px=hw)].tolist()}
        got = kept.column("uid").to_pylist()
        assert len(got) == len(set(got)), "a record was emitted by two cells"
        assert set(got) == expected
    uids = table.column("uid").to_pylist()
    groups_col = table.column("date_group_id").to_pylist()
    assert list(zip(groups_col, uids)) == sorted(zip(groups_col, uids))  # sorted for deterministic ids
