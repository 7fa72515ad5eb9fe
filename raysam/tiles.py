"""How the back half cuts a date group's target grid: merge cells and sink tiles. Pure geometry.

* **Merge cells** (:attr:`Tiling.cell_px`, 4 chips square) are the units of the exact spatial
  reduce (:mod:`raysam.merge`): a cell decides the records whose box's top-left pixel lies in it,
  looking at everything within a halo of one chip. Mask ids are numbered cell by cell in
  row-major order, so they are deterministic without a global sort.
* **Sink tiles** (:attr:`Tiling.tile_px`, half a cell) are the units the label and Sentinel-2
  rasters are written in (one COG per tile, a VRT over them). A tile is small enough that the
  memory of the process painting it does not depend on the region: 2048² uint32 ids plus the
  owning areas are 32 MB.

Only cells and tiles that touch the AOI exist. Windows are ``(col_off, row_off, width, height)``
on the target grid, clipped to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from raysam.grid import DEFAULT_CHIP_SIZE, TargetGrid, WindowPx

CELL_CHIPS = 4  # a merge cell is 4 chip sides square; its halo is one chip side
SINK_TILE_PX = 2048  # label and s2 tile side: half a cell of 1024 px chips

CellRC = tuple[int, int]
TileRC = tuple[int, int]


@dataclass(frozen=True)
class Tiling:
    """Merge cells and sink tiles of one grid.

    Attributes:
        height, width: the target grid's size in pixels.
        chip_px: the chip side (a mask's box is never wider than this).
        tile_px: sink tile side; ``cell_px`` is a multiple of it.
    """

    height: int
    width: int
    chip_px: int = DEFAULT_CHIP_SIZE
    tile_px: int = SINK_TILE_PX

    @classmethod
    def of(cls, grid: TargetGrid, chip_px: int = DEFAULT_CHIP_SIZE) -> Tiling:
        """The tiling of a target grid."""
        return cls(grid.height, grid.width, chip_px, min(SINK_TILE_PX, CELL_CHIPS * chip_px))

    @property
    def cell_px(self) -> int:
        return CELL_CHIPS * self.chip_px

    @property
    def halo_px(self) -> int:
        """The merge halo: one chip, the least that keeps every owned box inside a cell's region."""
        return self.chip_px

    @property
    def grid_hw_px(self) -> tuple[int, int]:
        return self.height, self.width

    def cell_window(self, cell: CellRC) -> WindowPx:
        """The cell's window, clipped to the grid."""
        return _window(cell, self.cell_px, self.height, self.width)

    def tile_window(self, tile: TileRC) -> WindowPx:
        """The tile's window, clipped to the grid."""
        return _window(tile, self.tile_px, self.height, self.width)

    def tiles_of_cell(self, cell: CellRC) -> Iterator[TileRC]:
        """The tiles inside a cell (those on the grid), row-major."""
        k = self.cell_px // self.tile_px
        for r in range(cell[0] * k, cell[0] * k + k):
            for c in range(cell[1] * k, cell[1] * k + k):
                if r * self.tile_px < self.height and c * self.tile_px < self.width:
                    yield r, c

    def cell_of_tile(self, tile: TileRC) -> CellRC:
        k = self.cell_px // self.tile_px
        return tile[0] // k, tile[1] // k

    def cells_touching(self, window_px: WindowPx) -> list[CellRC]:
        """Cells whose owned masks can reach into ``window_px``: masks are owned by the cell of
        their box's top-left pixel and are at most ``chip_px`` wide, so these are the cells
        meeting the window grown up and left by ``chip_px - 1``."""
        x0, y0, w, h = window_px
        rows = range(max(y0 - self.chip_px + 1, 0) // self.cell_px, (y0 + h - 1) // self.cell_px + 1)
        cols = range(max(x0 - self.chip_px + 1, 0) // self.cell_px, (x0 + w - 1) // self.cell_px + 1)
        return [(r, c) for r in rows for c in cols]

    def cells_in(self, grid: TargetGrid, aoi_utm: BaseGeometry) -> list[CellRC]:
        """The cells touching the AOI, row-major (the order mask ids are numbered in)."""
        return _in_aoi(grid, aoi_utm, self.cell_px, self.height, self.width)

    def tiles_in(self, grid: TargetGrid, aoi_utm: BaseGeometry) -> list[TileRC]:
        """The sink tiles touching the AOI, row-major."""
        return _in_aoi(grid, aoi_utm, self.tile_px, self.height, self.width)


def _window(rc: tuple[int, int], side: int, height: int, width: int) -> WindowPx:
    x0, y0 = rc[1] * side, rc[0] * side
    return x0, y0, min(side, width - x0), min(side, height - y0)


def _in_aoi(grid: TargetGrid, aoi_utm: BaseGeometry, side: int, height: int, width: int) -> list[tuple[int, int]]:
    n_rows, n_cols = -(-height // side), -(-width // side)
    rcs = [(r, c) for r in range(n_rows) for c in range(n_cols)]
    if not rcs:
        return []
    boxes = shapely.box(*np.array([grid.window_bounds(_window(rc, side, height, width)) for rc in rcs]).T)
    hits = shapely.intersects(aoi_utm, boxes)
    return [rc for rc, hit in zip(rcs, np.atleast_1d(hits), strict=True) if hit]
