"""MaskRecords: the compact rows that leave the SAM stage, in one place.

A MaskRecord is one kept mask of one chip, moved into the target grid's pixel frame: ids
(date group, chip row/col, mask index, :func:`mask_uid`), ``box_xyxy`` (SAM-style inclusive,
grid pixels), ``chip_window`` (col_off, row_off, w, h), predicted IoU, stability score, area
(pixels), the prompt point (grid pixels) and the round that prompted it (0 = SAM's grid), and
``mask_bits``: :func:`pack_crop` of the mask cropped to its box. Never a dense chip-sized array.

This module owns the record's Arrow schema (:data:`RECORD_SCHEMA`, what chip checkpoints
store), the uid, the one bit-packing of crops (:func:`pack_crop`/:func:`unpack_crop`), the tight
box, and the conversions rows <-> :class:`MaskTable` (the merge's columnar view). Pure; no Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa

from raysam.errors import DataError

MIN_VALID_FRACTION = 0.5  # masks mostly on nodata/cloud/outside the AOI are dropped

RECORD_SCHEMA = pa.schema([
    ("date_group_id", pa.string()),
    ("chip_row", pa.int32()),
    ("chip_col", pa.int32()),
    ("mask_index", pa.int32()),
    ("uid", pa.string()),
    ("box_xyxy", pa.list_(pa.int32(), 4)),  # inclusive, grid pixels
    ("chip_window", pa.list_(pa.int32(), 4)),  # col_off, row_off, width, height
    ("predicted_iou", pa.float32()),
    ("stability_score", pa.float32()),
    ("area", pa.int64()),  # pixels
    ("point_xy", pa.list_(pa.float32(), 2)),  # the prompt, grid pixels
    ("prompt_round", pa.int16()),  # 0: SAM's point grid; k > 0: the k-th coverage round
    ("mask_bits", pa.binary()),  # pack_crop(mask cropped to box_xyxy)
])
COLUMNS = tuple(RECORD_SCHEMA.names)


def chip_key(chip_id: Sequence[int]) -> str:
    """``"row_col"`` as used in logs, checkpoint names and the GeoParquet ``chip_id`` column."""
    return f"{int(chip_id[0])}_{int(chip_id[1])}"


def mask_uid(chip_id: Sequence[int], index: int) -> str:
    """``"rrrrr_ccccc_iiiii"``: unique in a date group, and sorting it sorts by chip then mask."""
    return f"{int(chip_id[0]):05d}_{int(chip_id[1]):05d}_{int(index):05d}"


def pack_crop(mask: np.ndarray) -> bytes:
    """Bit-pack a boolean crop row by row (``np.packbits(axis=1)``) into bytes."""
    return np.packbits(mask, axis=1).tobytes()


def unpack_crop(bits: bytes | np.ndarray, box_xyxy: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`pack_crop`: the boolean (h, w) crop whose inclusive box is ``box_xyxy``.

    ``bits`` is the packed bytes or the uint8 (h, ceil(w / 8)) array; the result is a view of
    freshly unpacked 0/1 bytes (no extra copy).
    """
    w = int(box_xyxy[2]) - int(box_xyxy[0]) + 1
    h = int(box_xyxy[3]) - int(box_xyxy[1]) + 1
    packed = np.frombuffer(bits, np.uint8) if isinstance(bits, (bytes, bytearray, memoryview)) else bits
    return np.unpackbits(packed.reshape(h, (w + 7) // 8), axis=1, count=w).view(bool)


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Inclusive (x0, y0, x1, y1) of the set pixels of a 2-D mask, or None when it is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def chip_records(task: Any, masks: Any, valid: np.ndarray) -> pa.Table:
    """One chip's compact masks as MaskRecords (:data:`RECORD_SCHEMA`) in the target-grid frame.

    Each mask is clipped to the chip's valid pixels (data, not cloud, inside the AOI); masks
    with less than :data:`MIN_VALID_FRACTION` of their area valid are dropped.

    Args:
        task: the :class:`raysam.grid.ChipTask` the masks came from.
        masks: :class:`raysam.sam.masks.CompactMasks` in chip pixels.
        valid: bool (H, W) chip mask of usable pixels.
    """
    col_off, row_off = int(task.window_px[0]), int(task.window_px[1])
    rounds = getattr(masks, "prompt_round", None)
    cols: dict[str, list] = {k: [] for k in COLUMNS}
    for i in range(len(masks.mask_bits)):
        box = [int(v) for v in masks.box_xyxy[i]]
        crop = unpack_crop(masks.mask_bits[i], box)
        clipped = crop & valid[box[1] : box[3] + 1, box[0] : box[2] + 1]
        area = int(clipped.sum())
        if area == 0 or area < MIN_VALID_FRACTION * int(crop.sum()):
            continue
        tx0, ty0, tx1, ty1 = tight_box(clipped)
        clipped = clipped[ty0 : ty1 + 1, tx0 : tx1 + 1]
        px, py = (float(v) for v in masks.point_coords[i])
        for key, value in (
            ("date_group_id", task.date_group_id), ("chip_row", int(task.chip_id[0])),
            ("chip_col", int(task.chip_id[1])), ("mask_index", i), ("uid", mask_uid(task.chip_id, i)),
            ("box_xyxy", [box[0] + tx0 + col_off, box[1] + ty0 + row_off, box[0] + tx1 + col_off, box[1] + ty1 + row_off]),
            ("chip_window", [int(v) for v in task.window_px]), ("predicted_iou", float(masks.predicted_iou[i])),
            ("stability_score", float(masks.stability_score[i])), ("area", area),
            ("point_xy", [px + col_off, py + row_off]),
            ("prompt_round", int(rounds[i]) if rounds is not None else 0), ("mask_bits", pack_crop(clipped)),
        ):
            cols[key].append(value)
    return pa.table(cols, schema=RECORD_SCHEMA)


def empty_records() -> pa.Table:
    """A MaskRecord table with no rows."""
    return RECORD_SCHEMA.empty_table()


def fixed_list_numpy(column: pa.ChunkedArray | pa.Array, width: int, dtype: Any = np.int64) -> np.ndarray:
    """(n, width) numpy array of a fixed-size list column such as ``box_xyxy``."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype).reshape(-1, width)


def to_mask_table(records: pa.Table) -> MaskTable:
    """The merge's columnar view of MaskRecords (:data:`RECORD_SCHEMA` columns)."""
    missing = [k for k in _TABLE_COLUMNS if k not in records.column_names]
    if missing:
        raise DataError(f"MaskRecord table lacks columns {missing}; produce it with raysam.records.chip_records")
    chip_id = np.stack([records.column("chip_row").to_numpy(), records.column("chip_col").to_numpy()], 1)
    return MaskTable(
        np.asarray(records.column("uid").to_pylist(), dtype=object).astype(str), chip_id,
        fixed_list_numpy(records.column("chip_window"), 4), fixed_list_numpy(records.column("box_xyxy"), 4),
        records.column("predicted_iou").to_numpy(), records.column("stability_score").to_numpy(),
        records.column("area").to_numpy(), records.column("mask_bits").to_pylist(),
    )


_TABLE_COLUMNS = ("uid", "chip_row", "chip_col", "chip_window", "box_xyxy", "predicted_iou",
                  "stability_score", "area", "mask_bits")


@dataclass(frozen=True, eq=False)
class MaskTable:
    """Columnar MaskRecords of one date group, in the target grid's pixel frame.

    Attributes:
        mask_uid: (n,) stable unique id per record (int or str); the last tie-breaker.
        chip_id: int64 (n, 2) chip (row, col).
        chip_window_px: int64 (n, 4) chip window (col_off, row_off, w, h) on the grid.
        box_xyxy: int64 (n, 4) SAM-style inclusive box [x0, y0, x1, y1] in grid pixels.
        predicted_iou: float32 (n,).
        stability_score: float32 (n,).
        area: int64 (n,) mask pixel count (must equal the set bits of ``mask_bits``).
        mask_bits: object (n,) of uint8 (h, ceil(w / 8)) ``np.packbits(crop, axis=1)``.
    """

    mask_uid: np.ndarray
    chip_id: np.ndarray
    chip_window_px: np.ndarray
    box_xyxy: np.ndarray
    predicted_iou: np.ndarray
    stability_score: np.ndarray
    area: np.ndarray
    mask_bits: np.ndarray

    def __post_init__(self) -> None:
        _set = object.__setattr__
        _set(self, "mask_uid", np.asarray(self.mask_uid))
        for name, cols in (("chip_id", 2), ("chip_window_px", 4), ("box_xyxy", 4)):
            _set(self, name, np.asarray(getattr(self, name), np.int64).reshape(-1, cols))
        _set(self, "predicted_iou", np.asarray(self.predicted_iou, np.float32))
        _set(self, "stability_score", np.asarray(self.stability_score, np.float32))
        _set(self, "area", np.asarray(self.area, np.int64))
        _set(self, "mask_bits", _as_bits_column(self.mask_bits, self.box_xyxy))
        _validate_table(self)

    def __len__(self) -> int:
        return len(self.mask_uid)

    def take(self, indices: np.ndarray) -> MaskTable:
        """The records at ``indices`` (any order), as a new table."""
        idx = np.asarray(indices, np.int64)
        return MaskTable(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @classmethod
    def concat(cls, tables: Iterable[MaskTable]) -> MaskTable:
        """Concatenate tables (e.g. the per-chip tables of one date group)."""
        tables = list(tables)
        if not tables:
            return cls.empty()
        return cls(**{f.name: np.concatenate([getattr(t, f.name) for t in tables]) for f in fields(cls)})

    @classmethod
    def empty(cls) -> MaskTable:
        """A table with no records."""
        return cls(np.zeros(0, np.int64), np.zeros((0, 2)), np.zeros((0, 4)), np.zeros((0, 4)),
                   np.zeros(0), np.zeros(0), np.zeros(0), np.empty(0, object))

    @classmethod
    def from_chip(cls, chip_id: tuple[int, int], chip_window_px: Sequence[int], box_xyxy_chip: np.ndarray,
                  predicted_iou: np.ndarray, stability_score: np.ndarray, area: np.ndarray,
                  mask_bits: Sequence[np.ndarray], uids: np.ndarray | None = None) -> MaskTable:
        """One chip's masks, moving chip-pixel boxes into the grid frame by the window offset.

        Args:
            chip_id: (row, col) of the chip.
            chip_window_px: (col_off, row_off, w, h) of the chip on the grid.
            box_xyxy_chip: (n, 4) inclusive boxes in chip pixels.
            predicted_iou, stability_score, area: (n,) per mask.
            mask_bits: n packed crops to the boxes.
            mask_uid: (n,) ids; default ``"rrrrr_ccccc_iiiii"`` as :mod:`raysam.records`.
        """
        n = len(mask_bits)
        col_off, row_off = int(chip_window_px[0]), int(chip_window_px[1])
        boxes = np.asarray(box_xyxy_chip, np.int64).reshape(-1, 4) + [col_off, row_off, col_off, row_off]
        if uids is None:
            uids = np.array([mask_uid(chip_id, i) for i in range(n)])
        return cls(uids, np.tile(np.asarray(chip_id, np.int64), (n, 1)),
                   np.tile(np.asarray(chip_window_px, np.int64), (n, 1)), boxes,
                   predicted_iou, stability_score, area, list(mask_bits))


def _as_bits_column(column: Sequence, box_xyxy: np.ndarray) -> np.ndarray:
    """Object array of uint8 (h, ceil(w/8)) crops; bytes are reshaped using the boxes."""
    out = np.empty(len(column), object)
    for i, bits in enumerate(column):
        if isinstance(bits, (bytes, bytearray, memoryview)):
            x0, y0, x1, y1 = (int(v) for v in box_xyxy[i])
            bits = np.frombuffer(bits, np.uint8)
            if bits.size != (y1 - y0 + 1) * ((x1 - x0 + 8) // 8):
                raise DataError(f"mask_bits of record {i} has {bits.size} bytes, not what its box needs; "
                                "pack the crop with np.packbits(crop, axis=1)")
            bits = bits.reshape(y1 - y0 + 1, -1)
        out[i] = np.asarray(bits, np.uint8)
    return out


def _validate_table(t: MaskTable) -> None:
    n = len(t.mask_uid)
    lengths = {f.name: len(getattr(t, f.name)) for f in fields(t)}
    if any(v != n for v in lengths.values()):
        raise DataError(f"MaskTable columns differ in length {lengths}; build every column per record")
    if n == 0:
        return
    if len(np.unique(t.mask_uid)) != n:
        raise DataError("MaskTable mask_uid values are not unique; give every record its own id")
    b, w = t.box_xyxy, t.chip_window_px
    if np.any(b[:, 2] < b[:, 0]) or np.any(b[:, 3] < b[:, 1]):
        raise DataError("MaskTable box_xyxy has x1 < x0 or y1 < y0; boxes are inclusive [x0, y0, x1, y1]")
    outside = ((b[:, 0] < w[:, 0]) | (b[:, 1] < w[:, 1])
               | (b[:, 2] >= w[:, 0] + w[:, 2]) | (b[:, 3] >= w[:, 1] + w[:, 3]))
    if outside.any():
        raise DataError(f"{int(outside.sum())} boxes lie outside their chip window; shift chip boxes by the "
                        "window offset (MaskTable.from_chip) so both are in grid pixels")
    if np.any(t.area <= 0) or np.any(t.area > box_area_px(b)):
        raise DataError("MaskTable area must be in [1, box area]; use the mask's pixel count")
    shapes = np.array([bits.shape for bits in t.mask_bits])
    want = np.stack([b[:, 3] - b[:, 1] + 1, (b[:, 2] - b[:, 0] + 8) // 8], 1)
    if shapes.shape != want.shape or np.any(shapes != want):
        raise DataError("mask_bits shapes do not match their boxes; store np.packbits(crop, axis=1) of the box crop")


def box_area_px(box_xyxy: np.ndarray) -> np.ndarray:
    """Pixel count of inclusive (n, 4) boxes."""
    return (box_xyxy[:, 2] - box_xyxy[:, 0] + 1) * (box_xyxy[:, 3] - box_xyxy[:, 1] + 1)
