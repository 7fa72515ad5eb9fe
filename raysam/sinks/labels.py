"""The label raster, one tile at a time: uint32 mask ids on the target grid, smaller mask wins.

:func:`paint_labels` is pure: given the masks that touch a window (boxes in grid pixels, packed
crops, areas, ids) it returns the window's ids. "Smaller wins" (ties: the lower id) is decided per
pixel by comparing areas, so the result does not depend on the order masks arrive in, and a tile
needs nothing but its own masks. Tiles are written as COGs and mosaicked by a VRT
(:mod:`raysam.sinks.mosaic`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from raysam.records import unpack_crop
from raysam.sinks.style import LABEL_BAND_DESCRIPTION as LABEL_DESCRIPTION

LABEL_NODATA = 0  # background


def paint_labels(window_px: Sequence[int], box_xyxy: np.ndarray, mask_bits: Sequence, area: np.ndarray,
                 ids: np.ndarray) -> np.ndarray:
    """The uint32 ids of a window: each pixel gets the smallest mask covering it (ties: lowest id).

    Args:
        window_px: (col_off, row_off, width, height) on the target grid.
        box_xyxy: int (n, 4) inclusive boxes in grid pixels.
        mask_bits: n packed crops (:func:`raysam.records.pack_crop`).
        area: (n,) mask pixel counts (the size that decides overlaps).
        ids: (n,) mask ids (> 0).

    Returns:
        uint32 (height, width), 0 where no mask is.
    """
    x_off, y_off, width, height = (int(v) for v in window_px)
    labels = np.zeros((height, width), np.uint32)
    owner_area = np.zeros((height, width), np.int64)
    for box, bits, a, mask_id in zip(np.asarray(box_xyxy).tolist(), mask_bits, np.asarray(area).tolist(),
                                     np.asarray(ids).tolist(), strict=True):
        x0, y0, x1, y1 = box
        xa, ya = max(x0, x_off), max(y0, y_off)
        xb, yb = min(x1 + 1, x_off + width), min(y1 + 1, y_off + height)
        if xa >= xb or ya >= yb:
            continue
        sub = unpack_crop(bits, box)[ya - y0 : yb - y0, xa - x0 : xb - x0]
        win_lab = labels[ya - y_off : yb - y_off, xa - x_off : xb - x_off]
        win_area = owner_area[ya - y_off : yb - y_off, xa - x_off : xb - x_off]
        take = sub & ((win_area == 0) | (win_area > a) | ((win_area == a) & (win_lab > mask_id)))
        win_lab[take] = mask_id
        win_area[take] = a
    return labels
