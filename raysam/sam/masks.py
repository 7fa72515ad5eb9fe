"""Pure numpy mask helpers mirroring ``segment_anything/utils/amg.py`` (no torch).

Also SAM's two-step logit upsampling as one sparse separable operator (:class:`AxisTaps`).

Boxes are SAM-style XYXY with *inclusive* x1/y1 (``batched_mask_to_box``); crop boxes are
half-open ``[x0, y0, x1, y1)`` as in ``generate_crop_boxes``. Masks leave the chip stage
only as bits packed inside their box (:func:`pack_mask`) or as uncompressed COCO RLE.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any

import numpy as np

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


def unpack_mask(bits: np.ndarray, box_xyxy: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_mask`: the boolean (h, w) mask inside the inclusive box."""
    width = int(box_xyxy[2]) - int(box_xyxy[0]) + 1
    return np.unpackbits(bits, axis=1, count=width).view(bool)  # 0/1 bytes: a view, no copy


def paste_mask(bits: np.ndarray, box_xyxy: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """Dense boolean (H, W) mask from packed bits placed at their box."""
    out = np.zeros(image_hw, dtype=bool)
    x0, y0, x1, y1 = (int(v) for v in box_xyxy)
    out[y0 : y1 + 1, x0 : x1 + 1] = unpack_mask(bits, box_xyxy)
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
    """

    box_xyxy: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int32))
    predicted_iou: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    stability_score: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    area: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    point_coords: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    crop_box_xyxy: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int32))
    mask_bits: list[np.ndarray] = field(default_factory=list)
    image_hw: tuple[int, int] = (0, 0)

    def __len__(self) -> int:
        return len(self.mask_bits)

    def mask(self, i: int) -> np.ndarray:
        """Boolean (h, w) mask of record ``i`` inside its box."""
        return unpack_mask(self.mask_bits[i], self.box_xyxy[i])

    def dense_mask(self, i: int) -> np.ndarray:
        """Boolean (H, W) mask of record ``i`` in the image frame (for tests and sinks)."""
        return paste_mask(self.mask_bits[i], self.box_xyxy[i], self.image_hw)

    @classmethod
    def from_mask_data(cls, data: MaskData, image_hw: tuple[int, int]) -> CompactMasks:
        """Build from a :class:`MaskData` with boxes, iou_preds, stability_score, areas,
        points, crop_boxes and bits columns."""
        return cls(
            box_xyxy=np.asarray(data["boxes"], np.int32).reshape(-1, 4),
            predicted_iou=np.asarray(data["iou_preds"], np.float32),
            stability_score=np.asarray(data["stability_score"], np.float32),
            area=np.asarray(data["areas"], np.int64),
            point_coords=np.asarray(data["points"], np.float32).reshape(-1, 2),
            crop_box_xyxy=np.asarray(data["crop_boxes"], np.int32).reshape(-1, 4),
            mask_bits=list(data["bits"]),
            image_hw=(int(image_hw[0]), int(image_hw[1])),
        )


# --- SAM's logit upsampling (Sam.postprocess_masks) as sparse per-axis taps ---


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Dense (out, in) float32 matrix of ``F.interpolate(mode="bilinear", align_corners=False)``
    along one axis, using torch's CPU index/lambda arithmetic (float32, clamped at 0)."""
    mat = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    if in_size == out_size:
        mat[rows, rows] = 1.0
        return mat
    scale = np.float32(in_size) / np.float32(out_size)
    real = scale * (rows.astype(np.float32) + np.float32(0.5)) - np.float32(0.5)
    real = np.maximum(real, np.float32(0.0))
    idx0 = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
    lam1 = np.clip(real - idx0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    idx1 = idx0 + (idx0 < in_size - 1)
    np.add.at(mat, (rows, idx0), np.float32(1.0) - lam1)
    np.add.at(mat, (rows, idx1), lam1)
    return mat


@dataclass(frozen=True)
class AxisTaps:
    """Sparse rows of a per-axis resize matrix: ``out[i] = sum_t weight[i, t] * in[index[i, t]]``.

    Attributes:
        index: (out, T) int64 input indices (padded with the row's last index, weight 0).
        weight: (out, T) float32 weights.
        first: (out,) first input index with non-zero weight.
        last: (out,) last input index with non-zero weight.
    """

    index: np.ndarray
    weight: np.ndarray
    first: np.ndarray
    last: np.ndarray

    @classmethod
    def from_matrix(cls, mat: np.ndarray) -> AxisTaps:
        """Build taps from a dense (out, in) matrix whose rows have contiguous support."""
        nz = mat != 0
        first = np.argmax(nz, axis=1)
        last = mat.shape[1] - 1 - np.argmax(nz[:, ::-1], axis=1)
        n_taps = int((last - first).max()) + 1
        index = np.minimum(first[:, None] + np.arange(n_taps)[None, :], last[:, None])
        weight = np.take_along_axis(mat, index, axis=1)
        duplicate = np.arange(n_taps)[None, :] > (last - first)[:, None]
        weight = np.where(duplicate, np.float32(0.0), weight).astype(np.float32)
        return cls(index, weight, first, last)

    def out_range(self, lo: int, hi: int) -> tuple[int, int]:
        """Half-open range of outputs whose support meets inputs [lo, hi] (empty: (0, 0))."""
        hit = np.flatnonzero((self.last >= lo) & (self.first <= hi))
        return (int(hit[0]), int(hit[-1]) + 1) if hit.size else (0, 0)


def postprocess_taps(
    low_res_size: int, image_size: int, input_size: int, original_size: int
) -> AxisTaps:
    """Taps of SAM's postprocess along one axis: low_res → image_size, crop to
    input_size, → original_size."""
    up = bilinear_matrix(low_res_size, image_size)[:input_size]
    down = bilinear_matrix(input_size, original_size)
    if input_size == original_size:
        return AxisTaps.from_matrix(up)
    return AxisTaps.from_matrix(down @ up)


def apply_taps(
    logits: np.ndarray, taps_y: AxisTaps, taps_x: AxisTaps, rows: tuple[int, int], cols: tuple[int, int]
) -> np.ndarray:
    """Upsampled float32 logits for output rows/cols ranges (half-open) of one low-res map."""
    index_y, weight_y = taps_y.index[rows[0] : rows[1]], taps_y.weight[rows[0] : rows[1]]
    index_x, weight_x = taps_x.index[cols[0] : cols[1]], taps_x.weight[cols[0] : cols[1]]
    c0, c1 = int(index_x.min()), int(index_x.max()) + 1
    src = logits[:, c0:c1]
    tall = weight_y[:, 0, None] * src[index_y[:, 0]]
    for t in range(1, index_y.shape[1]):
        tall += weight_y[:, t, None] * src[index_y[:, t]]
    # Second pass on the transpose, so both passes gather whole contiguous rows.
    tall_t = np.ascontiguousarray(tall.T)
    local_x = index_x - c0
    out_t = tall_t[local_x[:, 0]] * weight_x[:, 0, None]
    for t in range(1, local_x.shape[1]):
        out_t += tall_t[local_x[:, t]] * weight_x[:, t, None]
    return out_t.T


# Above this fraction of undecided pixels a region is upsampled densely.
_DENSE_FRACTION = 0.3


@dataclass(frozen=True)
class AxisRuns:
    """Outputs of one axis grouped in runs of consecutive positions sharing their support.

    Attributes:
        taps: The per-output taps.
        start: (R,) first output of each run.
        length: (R,) outputs in each run.
        support: (R, T) input indices of each run's support (padded by repetition).
        support_first, support_last: (R,) first and last input of each run's support, both
            non-decreasing (a resize keeps order), so runs meeting an input range are a slice.
    """

    taps: AxisTaps
    start: np.ndarray
    length: np.ndarray
    support: np.ndarray
    support_first: np.ndarray
    support_last: np.ndarray

    @classmethod
    def from_taps(cls, taps: AxisTaps) -> AxisRuns:
        """Group the outputs of ``taps`` by identical (first, last) support."""
        first, last = taps.first, taps.last
        change = (first[1:] != first[:-1]) | (last[1:] != last[:-1])
        start = np.concatenate([[0], np.flatnonzero(change) + 1])
        length = np.diff(np.concatenate([start, [len(first)]]))
        span = int((last[start] - first[start]).max()) + 1
        support = np.minimum(first[start][:, None] + np.arange(span), last[start][:, None])
        if np.any(np.diff(first[start]) < 0) or np.any(np.diff(last[start]) < 0):
            raise ValueError("the taps' supports must move forward with the output (a resize)")
        return cls(taps, start, length, support, first[start].copy(), last[start].copy())

    def runs_touching(self, lo: int, hi: int) -> tuple[int, int]:
        """Half-open range of runs whose support meets inputs [lo, hi] ((0, 0) if none)."""
        begin = int(np.searchsorted(self.support_last, lo, side="left"))
        end = int(np.searchsorted(self.support_first, hi, side="right"))
        return (begin, end) if begin < end else (0, 0)


@dataclass
class ThresholdedRegion:
    """Upsampled logits reduced to what the generator needs.

    Attributes:
        counts: (K,) pixels of the whole upsampled map above each threshold.
        mask: bool region of pixels above ``thresholds[mask_index]``.
        origin: (row, col) of the region's top-left pixel in the upsampled frame.
    """

    counts: np.ndarray
    mask: np.ndarray
    origin: tuple[int, int]


def upsample_thresholded(
    logits: np.ndarray,
    runs_y: AxisRuns,
    runs_x: AxisRuns,
    thresholds: tuple[float, ...],
    mask_index: int,
) -> ThresholdedRegion:
    """Threshold SAM's upsampled logits of one low-res map exactly (see
    :func:`upsample_thresholded_batch`)."""
    return upsample_thresholded_batch([logits], runs_y, runs_x, thresholds, mask_index)[0]


def upsample_thresholded_batch(
    maps: Sequence[np.ndarray],
    runs_y: AxisRuns,
    runs_x: AxisRuns,
    thresholds: tuple[float, ...],
    mask_index: int,
    abs_max: float | None = None,
) -> list[ThresholdedRegion]:
    """Threshold SAM's upsampled logits exactly, computing values only where needed.

    Each block of outputs sharing a low-res support is a convex combination of that support:
    if the support's min and max lie on the same side of every threshold (with a rounding
    margin) the whole block is decided from the low-res values; only the other blocks are
    upsampled (with the same arithmetic as :func:`apply_taps`), for all maps at once. The
    region is restricted to blocks whose support can exceed the lowest threshold, so
    everything outside it is below every threshold.

    Args:
        maps: Low-res (h, w) float32 logit maps.
        runs_y, runs_x: The upsampling operator per axis.
        thresholds: Thresholds to count pixels above.
        mask_index: Which threshold the returned mask uses.
        abs_max: An upper bound of ``|logits|`` over all maps, if the caller has one (it sets
            the rounding margin; a larger bound only sends more blocks to the exact path).
    """
    if abs_max is None:
        abs_max = max((float(np.abs(m).max(initial=0.0)) for m in maps), default=0.0)
    eps = np.float32(4e-5 * (1.0 + abs_max))
    regions: list[ThresholdedRegion | None] = []
    pending: list[tuple[int, _Undecided]] = []
    for i, logits in enumerate(maps):
        region = _decide_blocks(logits, runs_y, runs_x, thresholds, mask_index, eps)
        if isinstance(region, _Undecided):
            pending.append((i, region))
            region = None
        regions.append(region)
    if pending:
        _finish_undecided([u for _, u in pending], runs_y, runs_x, thresholds, mask_index)
        for i, undecided in pending:
            regions[i] = undecided.region
    return regions  # type: ignore[return-value]


@dataclass
class _Undecided:
    """A region whose decided blocks are filled in; ``blocks_*``/``support`` still to compute."""

    region: ThresholdedRegion
    blocks_y: np.ndarray
    blocks_x: np.ndarray
    support: np.ndarray


def _decide_blocks(
    logits: np.ndarray, runs_y: AxisRuns, runs_x: AxisRuns, thresholds: tuple[float, ...], mask_index: int,
    eps: np.float32,
) -> ThresholdedRegion | _Undecided:
    """Decide what the low-res values alone decide; the rest comes back as :class:`_Undecided`."""
    live = logits > np.float32(min(thresholds)) - eps
    rows, cols = np.flatnonzero(live.any(axis=1)), np.flatnonzero(live.any(axis=0))
    ry = runs_y.runs_touching(rows[0], rows[-1]) if rows.size else (0, 0)
    rx = runs_x.runs_touching(cols[0], cols[-1]) if cols.size else (0, 0)
    if ry[0] == ry[1] or rx[0] == rx[1]:  # nothing live, or only outside every output's support
        return ThresholdedRegion(np.zeros(len(thresholds), np.int64), np.zeros((0, 0), bool), (0, 0))
    sup_y, sup_x = runs_y.support[ry[0] : ry[1]], runs_x.support[rx[0] : rx[1]]
    bmin, bmax = _block_min_max(logits, sup_y, sup_x)
    len_y, len_x = runs_y.length[ry[0] : ry[1]], runs_x.length[rx[0] : rx[1]]
    sizes = len_y[:, None].astype(np.int64) * len_x[None, :]
    levels = np.asarray(thresholds, np.float32)[:, None, None]
    above = bmin > levels + eps  # (K, Ry, Rx)
    decided = np.all(above | (bmax <= levels - eps), axis=0)
    above &= decided
    if sizes[~decided].sum() > _DENSE_FRACTION * sizes.sum():
        return _dense_region(logits, runs_y, runs_x, ry, rx, thresholds, mask_index)
    counts = (above * sizes).sum(axis=(1, 2))
    mask = np.repeat(np.repeat(above[mask_index], len_y, axis=0), len_x, axis=1)
    region = ThresholdedRegion(counts, mask, (int(runs_y.start[ry[0]]), int(runs_x.start[rx[0]])))
    ub_y, ub_x = np.nonzero(~decided)
    if not ub_y.size:
        return region
    ub_y, ub_x = ub_y + ry[0], ub_x + rx[0]
    support = logits[runs_y.support[ub_y][:, :, None], runs_x.support[ub_x][:, None, :]]
    return _Undecided(region, ub_y, ub_x, support)


def _finish_undecided(
    pending: list[_Undecided], runs_y: AxisRuns, runs_x: AxisRuns, thresholds: tuple[float, ...], mask_index: int
) -> None:
    """Exact values of every undecided block of every map in one pass; complete their regions."""
    sizes = [len(u.blocks_y) for u in pending]
    values, pix_y, pix_x, valid = _block_values(
        np.concatenate([u.support for u in pending]), runs_y, runs_x,
        np.concatenate([u.blocks_y for u in pending]), np.concatenate([u.blocks_x for u in pending]))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for k, t in enumerate(thresholds):
        per_block = np.count_nonzero((values > np.float32(t)) & valid, axis=(1, 2))
        per_map = np.add.reduceat(per_block, starts)
        for u, n in zip(pending, per_map, strict=True):
            u.region.counts[k] += int(n)
    hit = valid & (values > np.float32(thresholds[mask_index]))
    for u, start, n in zip(pending, starts, sizes, strict=True):
        h = hit[start : start + n]
        oy, ox = u.region.origin
        u.region.mask[pix_y[start : start + n][h] - oy, pix_x[start : start + n][h] - ox] = True


def _dense_region(
    logits: np.ndarray, runs_y: AxisRuns, runs_x: AxisRuns, ry: tuple[int, int], rx: tuple[int, int],
    thresholds: tuple[float, ...], mask_index: int,
) -> ThresholdedRegion:
    """Upsample every pixel of the runs ry x rx (noisy logits with few decided blocks)."""
    rows = (int(runs_y.start[ry[0]]), int(runs_y.start[ry[1] - 1] + runs_y.length[ry[1] - 1]))
    cols = (int(runs_x.start[rx[0]]), int(runs_x.start[rx[1] - 1] + runs_x.length[rx[1] - 1]))
    values = apply_taps(logits, runs_y.taps, runs_x.taps, rows, cols)
    counts = np.array([np.count_nonzero(values > np.float32(t)) for t in thresholds], np.int64)
    return ThresholdedRegion(counts, values > np.float32(thresholds[mask_index]), (rows[0], cols[0]))


def _block_min_max(logits: np.ndarray, sup_y: np.ndarray, sup_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of the low-res values over each block's support, (Ry, Rx) each."""
    c0, c1 = int(sup_x.min()), int(sup_x.max()) + 1
    src = logits[:, c0:c1]
    row_min, row_max = src[sup_y[:, 0]], src[sup_y[:, 0]]
    for t in range(1, sup_y.shape[1]):
        row_min = np.minimum(row_min, src[sup_y[:, t]])
        row_max = np.maximum(row_max, src[sup_y[:, t]])
    local = sup_x - c0
    bmin, bmax = row_min[:, local[:, 0]], row_max[:, local[:, 0]]
    for s in range(1, local.shape[1]):
        bmin = np.minimum(bmin, row_min[:, local[:, s]])
        bmax = np.maximum(bmax, row_max[:, local[:, s]])
    return bmin, bmax


def _block_pixels(runs: AxisRuns, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, L) output positions of each block (clipped) and their validity."""
    span = int(runs.length.max())
    offsets = np.arange(span)[None, :]
    valid = offsets < runs.length[blocks][:, None]
    pos = runs.start[blocks][:, None] + np.minimum(offsets, runs.length[blocks][:, None] - 1)
    return pos, valid


def _block_values(
    support: np.ndarray, runs_y: AxisRuns, runs_x: AxisRuns, blocks_y: np.ndarray, blocks_x: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact upsampled values of the given blocks: (n, Ly, Lx) values, pixel rows/cols, validity.

    Every output of a block has the block's support as its taps, so the values are
    ``wy @ support_values @ wx.T`` per block, summed in :func:`apply_taps`'s order.
    ``support`` holds each block's (T, S) low-res support values.
    """
    py, vy = _block_pixels(runs_y, blocks_y)
    px, vx = _block_pixels(runs_x, blocks_x)
    wy, wx = runs_y.taps.weight[py], runs_x.taps.weight[px]  # (n, Ly, T), (n, Lx, S)
    values = None
    for s in range(wx.shape[2]):
        tall = wy[:, :, 0] * support[:, None, 0, s]
        for t in range(1, wy.shape[2]):
            tall += wy[:, :, t] * support[:, None, t, s]
        term = tall[:, :, None] * wx[:, None, :, s]
        values = term if values is None else values + term
    shape = values.shape
    pix_y = np.broadcast_to(py[:, :, None], shape)
    pix_x = np.broadcast_to(px[:, None, :], shape)
    valid = vy[:, :, None] & vx[:, None, :]
    return values, pix_y, pix_x, valid
