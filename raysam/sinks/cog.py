"""Cloud-Optimized GeoTIFFs of in-memory tiles, written through the output root's storage."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.io import MemoryFile

from raysam.storage.backends import Storage

BLOCK = 512  # COG block side (GDAL's COG default)
# ZSTD at level 1: on a 2048 px uint16 Sentinel-2 tile (predictor 2, AVERAGE overviews) it writes
# the COG in 0.12 s against 0.40 s for DEFLATE at its default level, for files 6 % larger
# (ZSTD level 9: 0.23 s, 3 % smaller than DEFLATE). GDAL >= 2.3 and every current GIS read it.
COMPRESSION = {"compress": "ZSTD", "level": 1}
# TIFF predictor numbers as GDAL's COG driver names them (it warns on "1" and ignores it).
COG_PREDICTOR = {1: "NO", 2: "STANDARD", 3: "FLOATING_POINT"}


def write_cog(storage: Storage, path: str, band: np.ndarray, transform: Affine, epsg: int, *, nodata: float,
              description: str, overview_resampling: str, predictor: int = 1,
              scale_offset: tuple[float, float] | None = None) -> None:
    """Write one single-band COG (:data:`COMPRESSION`, internal overviews) atomically to ``path``.

    The COG is built in memory (a tile is at most 2048² px) and stored with one write, so a full
    disk shows as the OS's error (ENOSPC, EFBIG), not as GDAL's "write error at scanline".

    Args:
        storage: where ``path`` lives.
        path: the COG's path.
        band: (h, w) pixels.
        transform, epsg: the tile's georeferencing.
        nodata: the nodata value (0 for labels and DNs).
        description: the band description GIS tools show.
        overview_resampling: ``NEAREST`` for ids and classes, ``AVERAGE`` for reflectance.
        predictor: 2 (horizontal differencing) for continuous integer data, else 1.
        scale_offset: GDAL scale/offset turning DNs into physical values.
    """
    height, width = band.shape
    profile = dict(driver="GTiff", width=width, height=height, count=1, dtype=band.dtype.name, nodata=nodata,
                   crs=f"EPSG:{epsg}", transform=transform, tiled=True, blockxsize=BLOCK, blockysize=BLOCK)
    with MemoryFile() as mem, MemoryFile() as cog:
        with mem.open(**profile) as dst:
            dst.write(band[None])
            dst.set_band_description(1, description)
            if scale_offset is not None:
                dst.scales, dst.offsets = (scale_offset[0],), (scale_offset[1],)
        with mem.open() as src:
            rasterio.shutil.copy(src, cog.name, driver="COG", predictor=COG_PREDICTOR[predictor], **COMPRESSION,
                                 overview_resampling=overview_resampling, blocksize=BLOCK, BIGTIFF="IF_SAFER")
        storage.put_bytes(path, cog.read())


def cog_from_mosaic(vrt_path: Path, out_path: Path, overview_resampling: str, predictor: int = 1) -> None:
    """Copy a local mosaic (VRT) into one local COG; GDAL streams it block by block."""
    rasterio.shutil.copy(str(vrt_path), str(out_path), driver="COG", predictor=COG_PREDICTOR[predictor], **COMPRESSION,
                         overview_resampling=overview_resampling, blocksize=BLOCK, BIGTIFF="IF_SAFER")


def tile_transform(grid_transform: Sequence[float], window_px: Sequence[int]) -> Affine:
    """The affine of a window's own pixel grid."""
    return Affine(*grid_transform[:6]) @ Affine.translation(int(window_px[0]), int(window_px[1]))
