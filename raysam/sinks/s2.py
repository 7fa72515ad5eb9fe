"""s2_raster: the Sentinel-2 bands a date group used, as COGs on its target grid, clipped to the AOI.

DNs are written as the catalog has them (uint16, nodata 0); each band's GDAL scale/offset
tags turn them into reflectance (``DN * 1e-4 - 0.1`` for processing baseline >= 04.00), so GIS
tools show reflectance without applying the baseline offset twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.enums import Resampling
from rasterio.windows import Window

from raysam.grid import DateGroup, plan_chip_tasks
from raysam.items import canonical_band
from raysam.read import Signer, aoi_mask, gdal_env_options, read_band_dn

TILE_PX = 2048  # window read per step; a multiple of the COG block size
BLOCK = 512


def write_s2_rasters(group: DateGroup, bands: Sequence[str], out_dir: Path, signer: Signer | None = None) -> list[Path]:
    """Write one COG per band (``<out_dir>/<band>.tif``) and return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    band_ids = tuple(dict.fromkeys(canonical_band(b) for b in bands))
    grid = group.grid
    tmp_paths = {b: out_dir / f".{b}.tiled.tif" for b in band_ids}
    profile = dict(
        driver="GTiff", width=grid.width, height=grid.height, count=1, dtype="uint16", nodata=0,
        crs=f"EPSG:{grid.epsg}", transform=Affine(*grid.transform), tiled=True, blockxsize=BLOCK,
        blockysize=BLOCK, compress="deflate", predictor=2, BIGTIFF="IF_SAFER",
    )
    scale_offset: dict[str, tuple[float, float]] = {}
    dsts = {b: rasterio.open(p, "w", **profile) for b, p in tmp_paths.items()}
    try:
        with rasterio.Env(**gdal_env_options()):
            for task in plan_chip_tasks(group, band_ids, chip_size=TILE_PX, spatial_overlap=0.0):
                col_off, row_off, width, height = task.window_px
                w, h = min(width, grid.width - col_off), min(height, grid.height - row_off)
                in_aoi = aoi_mask(task)[:h, :w]
                for band_id, dst in dsts.items():
                    dn, band = read_band_dn(task, band_id, signer, Resampling.bilinear)
                    scale_offset.setdefault(band_id, (band.scale, band.offset_dn * band.scale))
                    tile = np.where(in_aoi, dn[:h, :w], 0).astype(np.uint16)
                    dst.write(tile[None], window=Window(col_off, row_off, w, h))
    finally:
        for dst in dsts.values():
            dst.close()
    paths = []
    for band_id, tmp in tmp_paths.items():
        final = out_dir / f"{band_id}.tif"
        with rasterio.open(tmp, "r+") as src:
            scale, offset = scale_offset.get(band_id, (1e-4, 0.0))
            src.scales, src.offsets = (scale,), (offset,)
            src.set_band_description(1, band_id)
        rasterio.shutil.copy(tmp, final, driver="COG", compress="DEFLATE", predictor="2",
                             overview_resampling="AVERAGE", blocksize=BLOCK, BIGTIFF="IF_SAFER")
        tmp.unlink()
        paths.append(final)
    return paths
