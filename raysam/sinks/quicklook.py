"""quicklook.png: the date group's RGB with mask outlines, at most ``max_side`` pixels wide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.enums import Resampling

OUTLINE_RGB = (255, 220, 0)


def _decimated_shape(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _read_rgb(s2_dir: Path | None, shape: tuple[int, int]) -> np.ndarray:
    """R, G, B (B04, B03, B02) stretched 2-98 % to uint8, or grey where the bands were not written."""
    paths = [s2_dir / f"{b}.tif" for b in ("B04", "B03", "B02")] if s2_dir else []
    if not paths or not all(p.exists() for p in paths):
        return np.full((*shape, 3), 64, np.uint8)
    bands = []
    for p in paths:
        with rasterio.open(p) as src:
            bands.append(src.read(1, out_shape=shape, resampling=Resampling.average).astype(np.float32))
    rgb = np.stack(bands, axis=-1)
    valid = rgb.sum(axis=-1) > 0
    lo, hi = np.percentile(rgb[valid], (2, 98)) if valid.any() else (0.0, 1.0)
    return (np.clip((rgb - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def write_quicklook(labels_path: Path, s2_dir: Path | None, out_path: Path, max_side: int = 2048) -> None:
    """Draw label boundaries (pixels whose right or lower neighbour has another id) over RGB."""
    with rasterio.open(labels_path) as src:
        shape = _decimated_shape(src.width, src.height, max_side)
        labels = src.read(1, out_shape=shape, resampling=Resampling.nearest)
    rgb = _read_rgb(s2_dir, shape)
    edge = np.zeros(shape, bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    rgb[edge] = OUTLINE_RGB
    Image.fromarray(rgb).save(out_path, optimize=True)
