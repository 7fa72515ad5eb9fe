"""Where to prompt next: points inside the valid pixels that no kept mask covers yet.

The generator's coverage mode (``AmgParams(prompts="coverage")``) decodes SAM's point grid,
then asks this module for prompts in what the grid's masks left uncovered, decodes those,
and repeats. Pure numpy, no model state.

Placement works on blocks of :data:`BLOCK_PX` pixels (SAM's low-res mask pixel): a block is
free when all its pixels are valid (data, not cloud, inside the AOI), uncovered and not
already tried. A free block's *depth* ``d`` is its chessboard distance to the nearest
non-free block (or the image edge): the square of ``2d - 1`` blocks centred on it is free.
Prompts go to local maxima of the depth (the most interior points of the uncovered
regions, not centroids, which can fall outside a concave region), deepest first, where that
square holds at least ``min_area_px`` pixels, and their squares never overlap: one prompt per
uncovered blob, or a few along an elongated one. Thin leftovers (roads, margins, the rims
between masks) are never deep enough to be prompted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BLOCK_PX = 4  # placement grid: one SAM low-res mask pixel (1024 / 256) of a full-size chip
# A decoded prompt's neighbourhood is not prompted again: a centred square of this fraction of
# its free square's side. Large enough that the next round does not prompt right beside a
# failed prompt, small enough that the rest of a blob it did not explain (a second field) is
# prompted. Of 0.1, 0.25, 0.5 and 0.75, 0.25 found the most fields on synthetic field scenes
# (raysam.demo.synthetic) and on the demo region's chips, at the same prompt budget.
TRIED_FRACTION = 0.25


@dataclass(frozen=True)
class CoveragePrompts:
    """Prompts in the free (valid, uncovered, untried) area of an image.

    Attributes:
        points_xy: (n, 2) float64 x/y pixel coordinates (the centre of a block's pixel grid,
            so ``floor`` gives a pixel inside the block).
        half_side_px: (n,) int64 half the side of each prompt's free square, in pixels
            (the square spans ``point ± half_side_px``, rounded to whole blocks).
    """

    points_xy: np.ndarray
    half_side_px: np.ndarray

    def __len__(self) -> int:
        return len(self.points_xy)


def free_blocks(free_px: np.ndarray, block_px: int = BLOCK_PX) -> np.ndarray:
    """Boolean (ceil(H/b), ceil(W/b)) map: True where every pixel of the block is free.

    Blocks cut by the image's bottom or right edge count their missing pixels as not free.
    """
    h, w = free_px.shape
    hb, wb = -(-h // block_px), -(-w // block_px)
    padded = np.zeros((hb * block_px, wb * block_px), bool)
    padded[:h, :w] = free_px
    return padded.reshape(hb, block_px, wb, block_px).all(axis=(1, 3))


def chessboard_depth(free: np.ndarray) -> np.ndarray:
    """int32 depth of each True cell: 1 + how many 3x3 erosions it survives (0 where False).

    Depth ``d`` means the ``(2d - 1)``-square centred on the cell is all True; outside the
    array counts as False.
    """
    depth = np.zeros(free.shape, np.int32)
    current = free.copy()
    level = 0
    while current.any():
        level += 1
        depth[current] = level
        current = _erode3(current)
    return depth


def _erode3(mask: np.ndarray) -> np.ndarray:
    """3x3 binary erosion (separable), outside the array counting as False."""
    rows = mask.copy()
    rows[1:, :] &= mask[:-1, :]
    rows[:-1, :] &= mask[1:, :]
    rows[0, :] = rows[-1, :] = False
    out = rows.copy()
    out[:, 1:] &= rows[:, :-1]
    out[:, :-1] &= rows[:, 1:]
    out[:, 0] = out[:, -1] = False
    return out


def _local_maxima(depth: np.ndarray) -> np.ndarray:
    """True where the depth is positive and no 8-neighbour is deeper."""
    padded = np.pad(depth, 1)
    h, w = depth.shape
    neighbours = np.max([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=0)
    return (depth > 0) & (depth >= neighbours)


def min_depth_for_area(min_area_px: int, block_px: int = BLOCK_PX) -> int:
    """Smallest depth whose free square, ``((2d - 1) * block_px)²`` pixels, holds ``min_area_px``."""
    side_blocks = math.ceil(math.sqrt(min_area_px) / block_px)
    return max(1, (side_blocks + 2) // 2)


def place_prompts(free_px: np.ndarray, min_area_px: int, max_points: int, block_px: int = BLOCK_PX) -> CoveragePrompts:
    """Prompts at the most interior points of the free area, deepest first.

    Args:
        free_px: bool (H, W), True where a pixel may be prompted (valid, uncovered, untried).
        min_area_px: a prompt's free square must hold at least this many pixels.
        max_points: at most this many prompts.
        block_px: side of the placement blocks.

    Returns:
        The prompts, deepest first (ties in row-major order).
    """
    depth = chessboard_depth(free_blocks(free_px, block_px))
    candidates = _local_maxima(depth) & (depth >= min_depth_for_area(min_area_px, block_px))
    ys, xs = np.nonzero(candidates)
    d = depth[ys, xs]
    order = np.lexsort((xs, ys, -d))  # deepest first, then row-major
    chosen: list[int] = []
    for i in order:
        if len(chosen) == max_points:
            break
        if chosen:
            c = np.asarray(chosen)
            gap = np.maximum(np.abs(ys[c] - ys[i]), np.abs(xs[c] - xs[i]))
            if np.any(gap < d[c] + d[i] - 1):  # the two free squares would overlap
                continue
        chosen.append(int(i))
    c = np.asarray(chosen, np.int64)
    centre = block_px / 2.0
    points = np.stack([xs[c] * block_px + centre, ys[c] * block_px + centre], axis=1).astype(np.float64)
    return CoveragePrompts(points.reshape(-1, 2), (d[c].astype(np.int64) * block_px - block_px // 2))


def mark_tried(tried_px: np.ndarray, prompts: CoveragePrompts, fraction: float) -> None:
    """Mark a centred square of ``fraction`` of each prompt's free square's side as tried (in place)."""
    h, w = tried_px.shape
    for (x, y), half in zip(prompts.points_xy, prompts.half_side_px, strict=True):
        r = max(1, int(round(half * fraction)))
        cx, cy = int(x), int(y)
        tried_px[max(0, cy - r) : min(h, cy + r + 1), max(0, cx - r) : min(w, cx + r + 1)] = True

