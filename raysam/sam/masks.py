"""Pure numpy mask helpers mirroring ``segment_anything/utils/amg.py`` (no torch), and the
generator's mask containers (:class:`MaskData`, :class:`CompactMasks`).

SAM's logit upsampling lives apart, in :mod:`raysam.sam.upsample`.

Boxes are SAM-style XYXY with *inclusive* x1/y1 (``batched_mask_to_box``); crop boxes are
half-open ``[x0, y0, x1, y1)`` as in ``generate_crop_boxes``. Masks leave the chip stage
only as bits packed inside their box (:func:`pack_mask`; unpacked by :func:`raysam.records.unpack_crop`, the one unpacker) or as
uncompressed COCO RLE.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import product
from typing import Any

import numpy as np

from raysam.records import unpack_crop

# SAM's is_box_near_crop_edge default tolerance, in pixels.
CROP_EDGE_ATOL_PX = 20.0


def build_point_grid(n_per_side: int) -> np.ndarray:
    """Return an (n², 2) grid of x/y points evenly spaced in [0, 1], row-major like SAM."""
    offset = 1 / (2 * n_per_side)
    points_one_side = np.linspace(offset, 1 - offset, n_per_side)
    points_x = np.tile(points_one_side[None, :], (n_per_side, 1))
    points_y = np.tile(points_one_side[:, None], (1, n_per_side))
    return np.stack([points_x, points_y], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(
    n_per_side: int, n_layers: int, scale_per_layer: int
) -> list[np.ndarray]:
    """Return one point grid per crop layer; layer i has ``n_per_side / scale**i`` per side."""
    return [
        build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)
    ]


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Return SAM's crop boxes (XYXY, half-open) and their layer indices.

    Layer 0 is the whole image; layer i has (2**i)² crops overlapping by
    ``int(overlap_ratio * short_side * 2 / 2**i)`` pixels.
    """
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    crop_boxes, layer_idxs = [[0, 0, im_w, im_h]], [0]

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n_crops_per_side = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_crops_per_side))
        crop_w = crop_len(im_w, n_crops_per_side, overlap)
        crop_h = crop_len(im_h, n_crops_per_side, overlap)
        crop_x0 = [int((crop_w - overlap) * i) for i in range(n_crops_per_side)]
        crop_y0 = [int((crop_h - overlap) * i) for i in range(n_crops_per_side)]
        for x0, y0 in product(crop_x0, crop_y0):
            crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layer_idxs.append(i_layer + 1)
    return crop_boxes, layer_idxs


def uncrop_boxes_xyxy(boxes_xyxy: np.ndarray, crop_box: list[int]) -> np.ndarray:
    """Shift boxes from the crop frame to the image frame."""
    x0, y0 = crop_box[0], crop_box[1]
    return boxes_xyxy + np.array([x0, y0, x0, y0], dtype=boxes_xyxy.dtype)


def uncrop_points(points_xy: np.ndarray, crop_box: list[int]) -> np.ndarray:
    """Shift x/y points from the crop frame to the image frame."""
    return points_xy + np.array([crop_box[0], crop_box[1]], dtype=points_xy.dtype)


def uncrop_masks(masks: np.ndarray, crop_box: list[int], orig_h: int, orig_w: int) -> np.ndarray:
    """Zero-pad (..., h, w) crop masks to the (..., orig_h, orig_w) image frame."""
    x0, y0, x1, y1 = crop_box
    if x0 == 0 and y0 == 0 and x1 == orig_w and y1 == orig_h:
        return masks
    pad = [(0, 0)] * (masks.ndim - 2) + [(y0, orig_h - y1), (x0, orig_w - x1)]
    return np.pad(masks, pad)


def calculate_stability_score(
    logits: np.ndarray, mask_threshold: float, threshold_offset: float
) -> np.ndarray:
    """IoU of the masks thresholded at ``thr + offset`` and ``thr - offset`` (float32, (...,)).

    An empty low-threshold mask gives NaN (0/0), which fails every ``>=`` filter as in SAM.
    """
    inter = np.count_nonzero(logits > (mask_threshold + threshold_offset), axis=(-2, -1))
    union = np.count_nonzero(logits > (mask_threshold - threshold_offset), axis=(-2, -1))
    return stability_from_counts(inter, union)


def stability_from_counts(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """float32 ``inter / union`` as torch divides int tensors (NaN when union is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(inter, np.float32) / np.asarray(union, np.float32)


def batched_mask_to_box(masks: np.ndarray) -> np.ndarray:
    """Return int64 (..., 4) inclusive XYXY boxes of boolean (..., H, W) masks; 0s if empty."""
    if masks.size == 0:
        return np.zeros((*masks.shape[:-2], 4), dtype=np.int64)
    h, w = masks.shape[-2:]
    in_rows, in_cols = masks.any(axis=-1), masks.any(axis=-2)
    top, bottom = _first_last(in_rows, h)
    left, right = _first_last(in_cols, w)
    boxes = np.stack([left, top, right, bottom], axis=-1)
    empty = ~in_rows.any(axis=-1)
    boxes[empty] = 0
    return boxes


def _first_last(flags: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the first and last True along the last axis (garbage where none is)."""
    first = np.argmax(flags, axis=-1)
    last = n - 1 - np.argmax(flags[..., ::-1], axis=-1)
    return first.astype(np.int64), last.astype(np.int64)


def is_box_near_crop_edge(
    boxes_xyxy: np.ndarray,
    crop_box: list[int],
    orig_box: list[int],
    atol: float = CROP_EDGE_ATOL_PX,
) -> np.ndarray:
    """True for boxes (crop frame) touching a crop edge that is not an image edge."""
    crop = np.asarray(crop_box, np.float32)[None, :]
    orig = np.asarray(orig_box, np.float32)[None, :]
    boxes = uncrop_boxes_xyxy(boxes_xyxy, crop_box).astype(np.float32)
    near_crop = np.abs(boxes - crop) <= atol
    near_image = np.abs(boxes - orig) <= atol
    return np.any(near_crop & ~near_image, axis=1)


def box_area(boxes_xyxy: np.ndarray) -> np.ndarray:
    """Area ``(x1 - x0) * (y1 - y0)`` as torchvision computes it (same dtype as the boxes)."""
    return (boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1])


def batched_nms(
    boxes_xyxy: np.ndarray,
    scores: np.ndarray,
    idxs: np.ndarray,
    iou_threshold: float,
) -> np.ndarray:
    """Greedy box NMS with ``torchvision.ops.batched_nms`` semantics.

    Boxes are sorted by score, descending and stable on ties (as torch's CPU sort); a box
    suppresses later boxes of the same category whose float32 IoU, with
    area = (x1 - x0) * (y1 - y0), is strictly greater than ``iou_threshold``.

    Returns:
        int64 indices of kept boxes, in decreasing score order.
    """
    boxes = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores), kind="stable")
    categories = np.asarray(idxs)[order]
    suppressed = np.zeros(len(order), dtype=bool)
    for pos in range(len(order)):
        if suppressed[pos]:
            continue
        rest = slice(pos + 1, None)
        same = categories[rest] == categories[pos]
        iou = _iou_one_to_many(boxes[order[pos]], boxes[order[rest]])
        suppressed[rest] |= same & (iou.astype(np.float64) > float(iou_threshold))
    return order[~suppressed].astype(np.int64)


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """float32 IoU of one box against many, in torchvision's CPU operation order."""
    xx1 = np.maximum(box[0], boxes[:, 0])
    yy1 = np.maximum(box[1], boxes[:, 1])
    xx2 = np.minimum(box[2], boxes[:, 2])
    yy2 = np.minimum(box[3], boxes[:, 3])
    zero = np.float32(0)
    inter = np.maximum(zero, xx2 - xx1) * np.maximum(zero, yy2 - yy1)
    area = (box[2] - box[0]) * (box[3] - box[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / (area + box_area(boxes) - inter)


def mask_to_rle(masks: np.ndarray) -> list[dict[str, Any]]:
    """Uncompressed COCO RLE of boolean (B, H, W) masks (column-major counts, as SAM)."""
    b, h, w = masks.shape
    flat = masks.transpose(0, 2, 1).reshape(b, h * w)
    out = []
    for i in range(b):
        change = np.flatnonzero(flat[i, 1:] != flat[i, :-1]) + 1
        bounds = np.concatenate([[0], change, [h * w]])
        counts = [] if not flat[i, 0] else [0]
        counts.extend(np.diff(bounds).tolist())
        out.append({"size": [h, w], "counts": counts})
    return out


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Decode an uncompressed COCO RLE to a boolean (H, W) mask."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, counts)
    return flat.reshape(w, h).transpose()


def area_from_rle(rle: dict[str, Any]) -> int:
    """Number of foreground pixels of an uncompressed RLE."""
    return int(sum(rle["counts"][1::2]))


def box_xyxy_to_xywh(box_xyxy: np.ndarray) -> np.ndarray:
    """Convert XYXY boxes (last axis) to XYWH, as SAM (w = x1 - x0, no +1)."""
    box = np.array(box_xyxy, copy=True)
    box[..., 2] = box[..., 2] - box[..., 0]
    box[..., 3] = box[..., 3] - box[..., 1]
    return box


def batch_iterator(batch_size: int, *arrays: np.ndarray) -> Iterator[list[np.ndarray]]:
    """Yield aligned slices of ``batch_size`` rows from each array."""
    n = len(arrays[0])
    for start in range(0, n, batch_size):
        yield [a[start : start + batch_size] for a in arrays]


def pack_mask(mask: np.ndarray, box_xyxy: np.ndarray) -> np.ndarray:
    """Bit-pack a boolean (H, W) mask cropped to its inclusive box: uint8 (h, ceil(w / 8))."""
    x0, y0, x1, y1 = (int(v) for v in box_xyxy)
    return np.packbits(mask[y0 : y1 + 1, x0 : x1 + 1], axis=1)


def paste_mask(bits: np.ndarray, box_xyxy: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """Dense boolean (H, W) mask from packed bits placed at their box."""
    out = np.zeros(image_hw, dtype=bool)
    x0, y0, x1, y1 = (int(v) for v in box_xyxy)
    out[y0 : y1 + 1, x0 : x1 + 1] = unpack_crop(bits, box_xyxy)
    return out


class MaskData:
    """Aligned columns (numpy arrays or lists) filtered and concatenated together."""

    def __init__(self, **columns: np.ndarray | list) -> None:
        self._columns: dict[str, np.ndarray | list] = dict(columns)

    def __getitem__(self, key: str) -> np.ndarray | list:
        return self._columns[key]

    def __setitem__(self, key: str, value: np.ndarray | list) -> None:
        self._columns[key] = value

    def __delitem__(self, key: str) -> None:
        del self._columns[key]

    def __contains__(self, key: str) -> bool:
        return key in self._columns

    def __len__(self) -> int:
        return len(next(iter(self._columns.values()))) if self._columns else 0

    def keys(self) -> list[str]:
        """Column names."""
        return list(self._columns)

    def filter(self, keep: np.ndarray) -> None:
        """Keep rows selected by a boolean mask or an index array, in every column."""
        keep = np.asarray(keep)
        idx = np.flatnonzero(keep) if keep.dtype == bool else keep.astype(np.int64)
        for key, col in self._columns.items():
            self._columns[key] = [col[i] for i in idx] if isinstance(col, list) else col[idx]

    def cat(self, other: MaskData) -> None:
        """Append the rows of ``other`` (columns missing here are adopted)."""
        for key, col in other._columns.items():
            mine = self._columns.get(key)
            if mine is None:
                self._columns[key] = col
            elif isinstance(col, list):
                self._columns[key] = list(mine) + col
            else:
                self._columns[key] = np.concatenate([mine, col], axis=0)


@dataclass
class CompactMasks:
    """The pipeline's mask records for one image: columns aligned, masks as packed bits.

    Attributes:
        box_xyxy: (N, 4) int32 inclusive boxes in image pixels.
        predicted_iou: (N,) float32 model-predicted quality.
        stability_score: (N,) float32.
        area: (N,) int64 foreground pixel counts.
        point_coords: (N, 2) float32 x/y prompt points in image pixels.
        crop_box_xyxy: (N, 4) int32 half-open crop boxes the masks came from.
        mask_bits: N uint8 arrays, ``np.packbits(mask[y0:y1+1, x0:x1+1], axis=1)``.
        image_hw: (H, W) of the image the masks belong to.
        prompt_round: (N,) int32 round whose prompt gave each mask: 0 for the point grid,
            k for the k-th coverage round.
        n_prompts: Decoder prompts spent on the image (all crops and rounds), kept or not.
    """

    box_xyxy: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int32))
    predicted_iou: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    stability_score: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    area: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    point_coords: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    crop_box_xyxy: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int32))
    mask_bits: list[np.ndarray] = field(default_factory=list)
    image_hw: tuple[int, int] = (0, 0)
    prompt_round: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    n_prompts: int = 0

    def __len__(self) -> int:
        return len(self.mask_bits)

    def mask(self, i: int) -> np.ndarray:
        """Boolean (h, w) mask of record ``i`` inside its box."""
        return unpack_crop(self.mask_bits[i], self.box_xyxy[i])

    def dense_mask(self, i: int) -> np.ndarray:
        """Boolean (H, W) mask of record ``i`` in the image frame (for tests and sinks)."""
        return paste_mask(self.mask_bits[i], self.box_xyxy[i], self.image_hw)

    @classmethod
    def from_mask_data(cls, data: MaskData, image_hw: tuple[int, int], n_prompts: int = 0) -> CompactMasks:
        """Build from a :class:`MaskData` with boxes, iou_preds, stability_score, areas,
        points, crop_boxes, bits and (optionally) rounds columns."""
        return cls(
            box_xyxy=np.asarray(data["boxes"], np.int32).reshape(-1, 4),
            predicted_iou=np.asarray(data["iou_preds"], np.float32),
            stability_score=np.asarray(data["stability_score"], np.float32),
            area=np.asarray(data["areas"], np.int64),
            point_coords=np.asarray(data["points"], np.float32).reshape(-1, 2),
            crop_box_xyxy=np.asarray(data["crop_boxes"], np.int32).reshape(-1, 4),
            mask_bits=list(data["bits"]),
            image_hw=(int(image_hw[0]), int(image_hw[1])),
            prompt_round=(np.asarray(data["rounds"], np.int32) if "rounds" in data
                          else np.zeros(len(data), np.int32)),
            n_prompts=int(n_prompts),
        )
