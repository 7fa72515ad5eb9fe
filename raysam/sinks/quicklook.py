"""quicklook.png: the date group's RGB with mask outlines, assembled from per-tile previews.

Nothing here reads a full-resolution raster. Each sink tile task, which holds its tile in memory
anyway, keeps a quicklook-sized preview of it (:func:`label_preview`: ids sampled at the
quicklook's pixel centres; :func:`rgb_preview`: reflectance DNs averaged over each quicklook
pixel); :func:`render` stitches the previews, stretches the RGB 2-98 % and draws the label
boundaries. The PNG is georeferenced by a world file and an ``.aux.xml`` (:func:`raysam.sinks.style.georeferencing`).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from affine import Affine
from PIL import Image

from raysam.sinks.style import quicklook_transform

OUTLINE_RGB = (255, 220, 0)
NO_IMAGE_GREY = 64  # background where no RGB bands were written
MAX_SIDE_PX = 2048


@dataclass(frozen=True)
class QuicklookFrame:
    """The quicklook's pixel grid: the target grid scaled so its longer side is at most ``max_side``."""

    height: int
    width: int
    max_side: int = MAX_SIDE_PX

    @property
    def shape(self) -> tuple[int, int]:
        scale = min(1.0, self.max_side / max(self.height, self.width, 1))
        return max(1, round(self.height * scale)), max(1, round(self.width * scale))

    def _axis(self, offset: int, length: int, full: int, out: int) -> tuple[int, int, np.ndarray]:
        """Preview indices whose pixel centres fall in [offset, offset + length), and those centres."""
        step = full / out  # grid pixels per quicklook pixel
        first = max(0, int(np.ceil(offset / step - 0.5)))
        stop = min(out, int(np.ceil((offset + length) / step - 0.5)))
        centres = np.floor((np.arange(first, stop) + 0.5) * step).astype(np.int64) - offset
        return first, stop, np.clip(centres, 0, length - 1)

    def span(self, window_px: Sequence[int]) -> tuple[tuple[int, int, np.ndarray], tuple[int, int, np.ndarray]]:
        """(rows, cols) of the quicklook a window covers: (first, stop, centres in window pixels) each."""
        x, y, w, h = (int(v) for v in window_px)
        out_h, out_w = self.shape
        return self._axis(y, h, self.height, out_h), self._axis(x, w, self.width, out_w)

    def transform(self, grid_transform: Sequence[float]) -> Affine:
        """The quicklook's affine (for its world file)."""
        return quicklook_transform(grid_transform, (self.height, self.width), self.shape)


def label_preview(labels: np.ndarray, window_px: Sequence[int], frame: QuicklookFrame) -> np.ndarray:
    """The ids at the quicklook pixel centres inside the window (nearest sampling)."""
    (_, _, ys), (_, _, xs) = frame.span(window_px)
    return labels[np.ix_(ys, xs)]


def rgb_preview(dn_rgb: np.ndarray, window_px: Sequence[int], frame: QuicklookFrame) -> np.ndarray:
    """float32 (3, h, w) mean DN of each quicklook pixel's footprint inside the window (0 = no data)."""
    (r0, r1, _), (c0, c1, _) = frame.span(window_px)
    x, y, w, h = (int(v) for v in window_px)
    out_h, out_w = frame.shape
    if r1 <= r0 or c1 <= c0:
        return np.zeros((3, 0, 0), np.float32)
    row_starts = np.clip(np.floor(np.arange(r0, r1) * frame.height / out_h).astype(np.int64) - y, 0, h - 1)
    col_starts = np.clip(np.floor(np.arange(c0, c1) * frame.width / out_w).astype(np.int64) - x, 0, w - 1)
    data = dn_rgb.astype(np.float64)
    valid = (data.sum(axis=0) > 0).astype(np.float64)
    sums = np.add.reduceat(np.add.reduceat(data, row_starts, axis=1), col_starts, axis=2)
    counts = np.add.reduceat(np.add.reduceat(valid, row_starts, axis=0), col_starts, axis=1)
    return (sums / np.maximum(counts, 1)).astype(np.float32)


def render(frame: QuicklookFrame, labels: Iterable[tuple[Sequence[int], np.ndarray]],
           rgb: Iterable[tuple[Sequence[int], np.ndarray]]) -> np.ndarray:
    """The quicklook image (uint8 (h, w, 3)) from per-window previews.

    Args:
        frame: the quicklook grid.
        labels: (window_px, :func:`label_preview`) per label tile.
        rgb: (window_px, :func:`rgb_preview`) per Sentinel-2 tile; none gives a grey background.
    """
    shape = frame.shape
    ids = np.zeros(shape, np.uint32)
    for window, preview in labels:
        (r0, r1, _), (c0, c1, _) = frame.span(window)
        ids[r0:r1, c0:c1] = preview
    dn = np.zeros((3, *shape), np.float32)
    have_rgb = False
    for window, preview in rgb:
        (r0, r1, _), (c0, c1, _) = frame.span(window)
        dn[:, r0:r1, c0:c1] = preview
        have_rgb = True
    image = _stretch(dn) if have_rgb else np.full((*shape, 3), NO_IMAGE_GREY, np.uint8)
    edge = np.zeros(shape, bool)
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edge[:-1, :] |= ids[:-1, :] != ids[1:, :]
    image[edge] = OUTLINE_RGB
    return image


def _stretch(dn: np.ndarray) -> np.ndarray:
    """RGB (3, h, w) stretched 2-98 % over pixels with data, as uint8 (h, w, 3)."""
    rgb = np.moveaxis(dn, 0, -1)
    valid = rgb.sum(axis=-1) > 0
    lo, hi = np.percentile(rgb[valid], (2, 98)) if valid.any() else (0.0, 1.0)
    return (np.clip((rgb - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding (no ``optimize``: it costs seconds and saves a few percent)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
