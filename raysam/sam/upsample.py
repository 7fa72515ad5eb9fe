"""SAM's logit upsampling (``Sam.postprocess_masks``) as a sparse separable operator, and the
exact thresholded-upsampling engine of the generator.

:class:`AxisTaps` holds one axis of the two bilinear resizes (low-res -> 1024, crop to the
input size, -> original size); :class:`AxisRuns` groups its outputs by shared support, so
:func:`upsample_thresholded_batch` decides most output blocks from the low-res values alone
and upsamples only the undecided ones. Pure numpy, no model state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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
