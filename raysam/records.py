"""MaskRecords: the compact rows that leave the SAM stage, and the model source actors load.

A MaskRecord is one kept mask of one chip, moved into the target grid's pixel frame:
ids (date group, chip row/col, mask index, ``uid``), ``box_xyxy`` (SAM-style inclusive, grid
pixels), ``chip_window`` (col_off, row_off, w, h), predicted IoU, stability score, area
(pixels), the prompt point (grid pixels) and ``mask_bits``: ``np.packbits`` of the mask cropped
to its box, row by row. Never a dense chip-sized array. Pure functions; no Ray.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIN_VALID_FRACTION = 0.5  # masks mostly on nodata/cloud/outside the AOI are dropped

COLUMNS = (
    "date_group_id", "chip_row", "chip_col", "mask_index", "uid", "box_xyxy", "chip_window",
    "predicted_iou", "stability_score", "area", "point_xy", "mask_bits",
)


def chip_key(chip_id: Sequence[int]) -> str:
    """``"row_col"`` as used in ids and the GeoParquet ``chip_id`` column."""
    return f"{int(chip_id[0])}_{int(chip_id[1])}"


def pack_crop(mask: np.ndarray) -> bytes:
    """Bit-pack a boolean crop row by row (``np.packbits(axis=1)``) into bytes."""
    return np.packbits(mask, axis=1).tobytes()


def unpack_crop(bits: bytes, box_xyxy: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`pack_crop` for a crop whose inclusive box is ``box_xyxy``."""
    w = int(box_xyxy[2]) - int(box_xyxy[0]) + 1
    h = int(box_xyxy[3]) - int(box_xyxy[1]) + 1
    packed = np.frombuffer(bits, np.uint8).reshape(h, (w + 7) // 8)
    return np.unpackbits(packed, axis=1, count=w).astype(bool)


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def chip_mask_rows(task, masks, valid: np.ndarray) -> list[dict]:
    """Turn one chip's compact masks into MaskRecord rows in the target-grid frame.

    Each mask is clipped to the chip's valid pixels (data, not cloud, inside the AOI); masks
    with less than :data:`MIN_VALID_FRACTION` of their area valid are dropped.

    Args:
        task: the :class:`raysam.grid.ChipTask` the masks came from.
        masks: :class:`raysam.sam.masks.CompactMasks` in chip pixels.
        valid: bool (H, W) chip mask of usable pixels.
    """
    from raysam.sam.masks import unpack_mask

    col_off, row_off = int(task.window_px[0]), int(task.window_px[1])
    rows: list[dict] = []
    for i in range(len(masks.mask_bits)):
        box = [int(v) for v in masks.box_xyxy[i]]
        crop = unpack_mask(masks.mask_bits[i], box)
        clipped = crop & valid[box[1] : box[3] + 1, box[0] : box[2] + 1]
        area = int(clipped.sum())
        if area == 0 or area < MIN_VALID_FRACTION * int(crop.sum()):
            continue
        tx0, ty0, tx1, ty1 = _tight_box(clipped)
        clipped = clipped[ty0 : ty1 + 1, tx0 : tx1 + 1]
        grid_box = [box[0] + tx0 + col_off, box[1] + ty0 + row_off, box[0] + tx1 + col_off, box[1] + ty1 + row_off]
        px, py = (float(v) for v in masks.point_coords[i])
        rows.append({
            "date_group_id": task.date_group_id,
            "chip_row": int(task.chip_id[0]),
            "chip_col": int(task.chip_id[1]),
            "mask_index": i,
            "uid": f"{int(task.chip_id[0]):05d}_{int(task.chip_id[1]):05d}_{i:05d}",
            "box_xyxy": np.asarray(grid_box, np.int32),
            "chip_window": np.asarray(task.window_px, np.int32),
            "predicted_iou": float(masks.predicted_iou[i]),
            "stability_score": float(masks.stability_score[i]),
            "area": area,
            "point_xy": np.asarray([px + col_off, py + row_off], np.float32),
            "mask_bits": pack_crop(clipped),
        })
    return rows


@dataclass(frozen=True)
class ModelSource:
    """Where an actor gets its model: a directory every worker can see, or the files' bytes.

    Bytes travel through Ray's object store (the dataclass is pickled into the actor's
    constructor arguments) and are written once to a local cache keyed by their hash.
    """

    path: str
    files: tuple[tuple[str, bytes], ...] = ()

    @classmethod
    def from_path(cls, path: Path, ship_bytes: bool) -> ModelSource:
        """Reference ``path``, or read its files to ship them when workers cannot see it."""
        if not ship_bytes:
            return cls(path=str(Path(path).resolve()))
        files = tuple((p.name, p.read_bytes()) for p in sorted(Path(path).iterdir()) if p.is_file())
        return cls(path=str(path), files=files)

    def materialise(self) -> Path:
        """A local directory holding the model (written once per content hash)."""
        if not self.files:
            return Path(self.path)
        digest = hashlib.sha256(b"".join(name.encode() + data for name, data in self.files)).hexdigest()[:16]
        target = Path(tempfile.gettempdir()) / "raysam-models" / digest
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=target.parent))
            for name, data in self.files:
                (staging / name).write_bytes(data)
            try:
                staging.rename(target)
            except OSError:  # another actor on this node won the race
                shutil.rmtree(staging, ignore_errors=True)
        return target


# ---------------------------------------------------------------------------------------------
# The spatial reduce, as batch functions for the pipeline (see raysam.merge for the argument)
# ---------------------------------------------------------------------------------------------
CELL_CHIPS = 4  # a merge cell is 4 chip sides square; its halo one chip side (raysam.merge)


@dataclass(frozen=True)
class GridInfo:
    """What the merge and polygon stages need of a date group's target grid."""

    transform: tuple[float, ...]
    epsg: int
    height: int
    width: int
    chip_px: int = 1024

    @property
    def cell_px(self) -> int:
        return CELL_CHIPS * self.chip_px

    @property
    def n_cells(self) -> int:
        return -(-self.height // self.cell_px) * -(-self.width // self.cell_px)


def expand_to_cells(batch: dict[str, np.ndarray], grids: dict[str, GridInfo]) -> dict[str, np.ndarray]:
    """Replicate each MaskRecord into the merge cells whose region (cell + halo) its box meets."""
    from raysam.merge import cell_keys

    n = len(batch["uid"])
    if n == 0:
        return {**batch, "cell_row": np.zeros(0, np.int64), "cell_col": np.zeros(0, np.int64)}
    groups = np.asarray(batch["date_group_id"])
    rec_all, cells_all = [], []
    for gid in np.unique(groups):
        grid = grids[str(gid)]
        sel = np.flatnonzero(groups == gid)
        rec, cells = cell_keys(np.asarray(batch["box_xyxy"])[sel], grid.cell_px, grid.chip_px, (grid.height, grid.width))
        rec_all.append(sel[rec])
        cells_all.append(cells)
    rec, cells = np.concatenate(rec_all), np.concatenate(cells_all)
    out = {k: np.asarray(v)[rec] for k, v in batch.items()}
    out["cell_row"], out["cell_col"] = cells[:, 0], cells[:, 1]
    return out


def merge_cell_batch(batch: dict[str, np.ndarray], merge_params: dict, grids: dict[str, GridInfo]) -> dict[str, np.ndarray]:
    """Merge one (date group, cell) group; emit the cell's owned records that are kept or unresolved.

    Kept and unresolved rows also get their polygon (EPSG:4326 WKB), its lon/lat bbox, area (m²)
    and perimeter (m), measured in the grid's UTM CRS. ``status`` is ``kept`` or ``unresolved``
    (decided later by a wider merge: :func:`raysam.merge.merge_grouped`).
    """
    from raysam.merge import MaskTable, merge_cell

    if len(batch["uid"]) == 0:
        return _with_polygons({k: v[:0] for k, v in batch.items()}, None, np.zeros(0, object))
    gid = str(batch["date_group_id"][0])
    grid = grids[gid]
    table = MaskTable.from_batch(
        {**batch, "mask_bits": [np.frombuffer(b, np.uint8).reshape(int(bx[3] - bx[1] + 1), -1)
                                for b, bx in zip(batch["mask_bits"], batch["box_xyxy"])]}
    )
    cell = (int(batch["cell_row"][0]), int(batch["cell_col"][0]))
    result = merge_cell(table, cell, grid.cell_px, grid.chip_px, (grid.height, grid.width), **merge_params)
    uids = np.asarray(batch["uid"])
    kept, unresolved = np.isin(uids, result.kept_uids), np.isin(uids, result.unresolved_uids)
    sel = np.flatnonzero(kept | unresolved)
    out = {k: np.asarray(v)[sel] for k, v in batch.items() if k not in ("cell_row", "cell_col")}
    status = np.where(kept[sel], "kept", "unresolved").astype(object)
    return _with_polygons(out, grid, status)


def _with_polygons(out: dict[str, np.ndarray], grid: GridInfo | None, status: np.ndarray) -> dict[str, np.ndarray]:
    import shapely
    from affine import Affine

    from raysam.sinks.polygons import ToWgs84, mask_to_polygon_utm

    n = len(status)
    geoms_wkb = np.empty(n, object)
    area_m2, perimeter_m = np.zeros(n), np.zeros(n)
    bounds = np.zeros((n, 4))
    if n:
        to_wgs84 = ToWgs84(grid.epsg)
        transform = Affine(*grid.transform)
        for k in range(n):
            box = out["box_xyxy"][k]
            utm = mask_to_polygon_utm(unpack_crop(out["mask_bits"][k], box), box, transform)
            area_m2[k], perimeter_m[k] = utm.area, utm.length
            lonlat = to_wgs84(utm)
            geoms_wkb[k] = shapely.to_wkb(lonlat)
            bounds[k] = lonlat.bounds
    out = {k: v for k, v in out.items() if k not in ("cell_row", "cell_col")}
    out.update(status=status, geometry=geoms_wkb, area_m2=area_m2, perimeter_m=perimeter_m,
               bbox_xmin=bounds[:, 0], bbox_ymin=bounds[:, 1], bbox_xmax=bounds[:, 2], bbox_ymax=bounds[:, 3])
    return out


def rows_to_columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """MaskRecord rows -> a columnar batch (empty batches keep every column)."""
    if not rows:
        return {
            "date_group_id": np.zeros(0, object), "chip_row": np.zeros(0, np.int64), "chip_col": np.zeros(0, np.int64),
            "mask_index": np.zeros(0, np.int64), "uid": np.zeros(0, object), "box_xyxy": np.zeros((0, 4), np.int32),
            "chip_window": np.zeros((0, 4), np.int32), "predicted_iou": np.zeros(0, np.float32),
            "stability_score": np.zeros(0, np.float32), "area": np.zeros(0, np.int64),
            "point_xy": np.zeros((0, 2), np.float32), "mask_bits": np.zeros(0, object),
        }
    cols = {k: [r[k] for r in rows] for k in COLUMNS}
    out = {k: np.asarray(v) for k, v in cols.items() if k not in ("mask_bits", "date_group_id", "uid")}
    for k in ("mask_bits", "date_group_id", "uid"):
        arr = np.empty(len(rows), object)
        arr[:] = cols[k]
        out[k] = arr
    return out
