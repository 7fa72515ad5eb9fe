"""Synthetic field imagery with known ground truth, for the demo and the tests.

A chip is cut by slightly slanted "roads" (straight lines of a fixed width) into a jittered
grid of quadrilateral fields; a few fields are split again by a road at a random angle, which
makes triangles and trapezoids. Every field gets its own colour (pairwise at least
``min_colour_dist`` apart in 0..255 RGB, and as far from the road colour), except one pair of
neighbouring fields that share a colour and are separated only by a road. Gaussian noise is
added last. Pure numpy, deterministic for a given ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROAD_RGB = (118, 108, 96)  # a dull grey-brown, kept apart from every field colour
COLOUR_RANGE = (20, 236)  # field colours stay inside this range so noise rarely clips


@dataclass(frozen=True)
class FieldScene:
    """A synthetic image and its ground truth.

    Attributes:
        image_rgb: uint8 [H, W, 3].
        field_id: int32 [H, W]; 0 on roads, 1..n_fields inside fields.
        colours_rgb: uint8 [n_fields + 1, 3]; row 0 is the road colour, row i field i's.
        same_colour_pair: two neighbouring field ids that share a colour (a road between).
    """

    image_rgb: np.ndarray
    field_id: np.ndarray
    colours_rgb: np.ndarray
    same_colour_pair: tuple[int, int]

    @property
    def n_fields(self) -> int:
        """Number of fields (ids 1..n_fields)."""
        return len(self.colours_rgb) - 1


def draw_fields(
    size_px: int = 1024,
    grid_cells: int = 7,
    n_splits: int = 10,
    road_width_px: float = 9.0,
    noise_std: float = 5.0,
    min_colour_dist: float = 48.0,
    seed: int = 0,
) -> FieldScene:
    """Draw a square synthetic field image with ``grid_cells**2 + n_splits`` fields.

    Args:
        size_px: image side in pixels.
        grid_cells: fields per side of the jittered grid.
        n_splits: how many grid fields are cut in two by a road at a random angle.
        road_width_px: road width in pixels.
        noise_std: standard deviation of the per-pixel, per-band Gaussian noise (0..255 units).
        min_colour_dist: smallest RGB distance between two different colours.
        seed: random seed; the same arguments always draw the same scene.

    Returns:
        The :class:`FieldScene`.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size_px, 0:size_px].astype(np.float32)
    cell, road = _grid_cells(rng, xx, yy, size_px, grid_cells, road_width_px)
    pair = (_cell_id(grid_cells // 2, grid_cells // 2 - 1, grid_cells),
            _cell_id(grid_cells // 2, grid_cells // 2, grid_cells))
    field_id, road = _split_cells(rng, xx, yy, cell, road, grid_cells, n_splits, road_width_px, pair)
    field_id[road] = 0
    colours = _field_colours(rng, int(field_id.max()), min_colour_dist)
    colours[pair[1]] = colours[pair[0]]
    image = colours[field_id].astype(np.float32)
    image += rng.normal(0.0, noise_std, image.shape).astype(np.float32)
    image_rgb = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return FieldScene(image_rgb, field_id.astype(np.int32), colours, pair)


def _cell_id(row: int, col: int, grid_cells: int) -> int:
    """Field id (1-based) of grid cell (row, col)."""
    return row * grid_cells + col + 1


def _line_offsets(
    rng: np.random.Generator, size_px: int, grid_cells: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (jittered) and slopes of the grid_cells - 1 inner lines along one axis."""
    step = size_px / grid_cells
    positions = step * np.arange(1, grid_cells) + rng.uniform(-0.2, 0.2, grid_cells - 1) * step
    slopes = rng.uniform(-0.12, 0.12, grid_cells - 1)
    return positions, slopes


def _grid_cells(rng, xx, yy, size_px: int, grid_cells: int, road_width_px: float):
    """Grid cell id (1-based) of every pixel and the road mask of the grid lines."""
    centre = size_px / 2.0
    road = np.zeros(xx.shape, dtype=bool)
    index = []
    for along, across in ((xx, yy), (yy, xx)):  # vertical-ish lines, then horizontal-ish
        positions, slopes = _line_offsets(rng, size_px, grid_cells)
        count = np.zeros(xx.shape, dtype=np.int32)
        for pos, slope in zip(positions, slopes):
            signed = (along - pos - slope * (across - centre)) / np.hypot(1.0, slope)
            count += signed > 0
            road |= np.abs(signed) < road_width_px / 2
        index.append(count)
    col, row = index
    return row * grid_cells + col + 1, road


def _split_cells(
    rng, xx, yy, cell, road, grid_cells: int, n_splits: int, road_width_px: float,
    keep: tuple[int, int],
):
    """Cut ``n_splits`` random cells (not those in ``keep``) by a road through their centroid."""
    field_id = cell.copy()
    road = road.copy()
    candidates = [c for c in range(1, grid_cells**2 + 1) if c not in keep]
    chosen = rng.choice(candidates, size=n_splits, replace=False)
    for k, cell_id in enumerate(sorted(int(c) for c in chosen)):
        inside = cell == cell_id
        cy, cx = yy[inside].mean(), xx[inside].mean()
        angle = rng.uniform(0.0, np.pi)
        signed = (xx - cx) * np.sin(angle) - (yy - cy) * np.cos(angle)
        field_id[inside & (signed > 0)] = grid_cells**2 + 1 + k
        road |= inside & (np.abs(signed) < road_width_px / 2)
    return field_id, road


def _field_colours(rng: np.random.Generator, n_fields: int, min_colour_dist: float) -> np.ndarray:
    """Road colour then ``n_fields`` colours, pairwise at least ``min_colour_dist`` apart."""
    colours = [np.asarray(ROAD_RGB, dtype=np.float64)]
    for _ in range(200_000):
        if len(colours) == n_fields + 1:
            return np.rint(np.stack(colours)).astype(np.uint8)
        candidate = rng.uniform(*COLOUR_RANGE, 3)
        if min(np.linalg.norm(candidate - c) for c in colours) >= min_colour_dist:
            colours.append(candidate)
    raise ValueError(f"cannot draw {n_fields} colours {min_colour_dist} apart; lower min_colour_dist")
