"""The label raster: uint32 mask ids on the target grid, smaller mask wins, written as a COG.

Masks arrive in any order; two memory-mapped scratch arrays (labels and the area of the mask
that owns each pixel) make "smaller wins" order-independent without holding a state-sized
raster in RAM. ``close`` writes a tiled GeoTIFF from the memmaps window by window and turns
it into a Cloud-Optimized GeoTIFF with nearest-neighbour overviews.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.windows import Window

from raysam.sinks.style import LABEL_BAND_DESCRIPTION

BLOCK = 512  # COG tile size (GDAL COG driver default)


class LabelRasterWriter:
    """Paints masks into a uint32 label raster (0 = background) and writes it as a COG."""

    def __init__(self, path: Path, width: int, height: int, transform: Affine, crs_epsg: int, scratch_dir: Path):
        self.path = Path(path)
        self.width, self.height = width, height
        self.transform, self.crs_epsg = transform, crs_epsg
        self._scratch = Path(scratch_dir)
        shape = (height, width)
        self._labels = np.lib.format.open_memmap(self._scratch / "labels.npy", "w+", np.uint32, shape)
        self._area = np.lib.format.open_memmap(self._scratch / "area.npy", "w+", np.uint32, shape)

    def paint(self, mask_id: int, box_xyxy: Sequence[int], mask: np.ndarray, area: int) -> None:
        """Paint one mask (bool crop to its inclusive grid box) where it is smaller than the owner."""
        x0, y0, x1, y1 = (int(v) for v in box_xyxy)
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x1 + 1, self.width), min(y1 + 1, self.height)
        if xa >= xb or ya >= yb:
            return
        sub = mask[ya - y0 : yb - y0, xa - x0 : xb - x0]
        owner_area = self._area[ya:yb, xa:xb]
        win = sub & ((owner_area == 0) | (owner_area > area) | ((owner_area == area) & (self._labels[ya:yb, xa:xb] > mask_id)))
        self._labels[ya:yb, xa:xb][win] = mask_id
        owner_area[win] = area

    def close(self) -> None:
        """Write the COG (deflate, predictor off, nearest overviews) and drop the scratch arrays."""
        tmp = self.path.with_suffix(".tiled.tif")
        profile = dict(
            driver="GTiff", width=self.width, height=self.height, count=1, dtype="uint32", nodata=0,
            crs=f"EPSG:{self.crs_epsg}", transform=self.transform, tiled=True, blockxsize=BLOCK,
            blockysize=BLOCK, compress="deflate", BIGTIFF="IF_SAFER",
        )
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.set_band_description(1, LABEL_BAND_DESCRIPTION)
            for row in range(0, self.height, BLOCK * 4):
                h = min(BLOCK * 4, self.height - row)
                dst.write(self._labels[row : row + h][None], window=Window(0, row, self.width, h))
        rasterio.shutil.copy(
            tmp, self.path, driver="COG", compress="DEFLATE", overview_resampling="NEAREST", blocksize=BLOCK,
            BIGTIFF="IF_SAFER",
        )
        tmp.unlink()
        del self._labels, self._area
        for name in ("labels.npy", "area.npy"):
            (self._scratch / name).unlink(missing_ok=True)
