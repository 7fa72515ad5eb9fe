"""s2_raster: the Sentinel-2 bands a date group used, as COGs on its grid, clipped to the AOI.

DNs are written as the catalog has them (uint16, nodata 0), mosaicked first valid wins over the
group's items like the chips (:func:`raysam.read.read_band_dn`); each band's GDAL scale/offset
tags turn them into reflectance (``DN * 1e-4 - 0.1`` for processing baseline >= 04.00), so GIS
tools show reflectance without applying the baseline offset twice. The grid is streamed in
``TILE_PX`` windows into a tiled GeoTIFF, then copied to a COG with overviews.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.enums import Resampling
from rasterio.windows import Window

from raysam.grid import ChipTask, DateGroup, plan_chip_tasks
from raysam.items import REFLECTANCE_SCALE, canonical_band
from raysam.read import SCL, NetworkPolicy, Signer, aoi_mask, gdal_env_options, read_band_dn
from raysam.sinks.style import s2_band_description

TILE_PX = 2048  # window read per step; a multiple of the COG block size
BLOCK = 512  # COG block side (GDAL's COG default)
CATEGORICAL_BANDS = (SCL,)  # read nearest, never interpolated

ScaleOffset = tuple[float, float]


def write_s2_rasters(group: DateGroup, bands: Sequence[str], out_dir: Path,
                     signer: Signer | None = None, network: NetworkPolicy | None = None) -> list[Path]:
    """Write one COG per band (``<out_dir>/<band id>.tif``) on the group's target grid.

    Args:
        group: the date group (items in priority order, grid, AOI).
        bands: band ids or aliases (``B04``, ``R``, ``SCL``); duplicates are written once.
        out_dir: output folder (created).
        signer: href signer, as for :func:`raysam.read.read_chip`.
        network: timeouts and retries of the reads (None: :class:`NetworkPolicy` defaults).

    Returns:
        The COG paths, in band order. Pixels outside the AOI or without data are 0 (nodata);
        reflectance = DN * scale + offset from the band's GDAL scale/offset.

    Raises:
        DataError: an item lacks a band, or an asset cannot be read.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    band_ids = tuple(dict.fromkeys(canonical_band(b) for b in bands))
    tmp_paths = {b: out_dir / f".{b}.tiled.tif" for b in band_ids}
    scale_offset = _write_tiled(group, tmp_paths, signer, network)
    paths = []
    for band_id, tmp in tmp_paths.items():
        default = (1.0, 0.0) if band_id in CATEGORICAL_BANDS else (REFLECTANCE_SCALE, 0.0)
        paths.append(_to_cog(tmp, out_dir / f"{band_id}.tif", band_id,
                             scale_offset.get(band_id, default)))
    return paths


def _tiled_profile(group: DateGroup) -> dict[str, Any]:
    """Profile of the intermediate tiled GeoTIFF on the group's grid."""
    grid = group.grid
    return dict(driver="GTiff", width=grid.width, height=grid.height, count=1, dtype="uint16",
                nodata=0, crs=grid.crs, transform=Affine(*grid.transform), tiled=True,
                blockxsize=BLOCK, blockysize=BLOCK, compress="deflate", predictor=2,
                BIGTIFF="IF_SAFER")


def _write_tiled(group: DateGroup, tmp_paths: dict[str, Path],
                 signer: Signer | None, network: NetworkPolicy | None) -> dict[str, ScaleOffset]:
    """Stream every band, window by window, into its tiled GeoTIFF; (scale, offset) per band."""
    scale_offset: dict[str, ScaleOffset] = {}
    dsts = {b: rasterio.open(p, "w", **_tiled_profile(group)) for b, p in tmp_paths.items()}
    try:
        with rasterio.Env(**gdal_env_options(network)):
            for task in plan_chip_tasks(group, tuple(dsts), chip_size=TILE_PX,
                                        spatial_overlap=0.0):
                _write_window(task, group, dsts, signer, scale_offset, network)
    finally:
        for dst in dsts.values():
            dst.close()
    return scale_offset


def _write_window(task: ChipTask, group: DateGroup, dsts: dict[str, Any], signer: Signer | None,
                  scale_offset: dict[str, ScaleOffset], network: NetworkPolicy | None) -> None:
    """Read one window of every band, clip it to the AOI and the grid, and write it."""
    col_off, row_off, width, height = task.window_px
    w, h = min(width, group.grid.width - col_off), min(height, group.grid.height - row_off)
    in_aoi = aoi_mask(task)[:h, :w]
    for band_id, dst in dsts.items():
        resampling = (Resampling.nearest if band_id in CATEGORICAL_BANDS
                      else Resampling.bilinear)
        dn, band = read_band_dn(task, band_id, signer, resampling, network=network)
        scale_offset.setdefault(band_id, (band.scale, band.offset_dn * band.scale))
        tile = np.where(in_aoi, dn[:h, :w], 0).astype(np.uint16)
        dst.write(tile[None], window=Window(col_off, row_off, w, h))


def _to_cog(tmp: Path, final: Path, band_id: str, scale_offset: ScaleOffset) -> Path:
    """Tag scale/offset and description on the tiled file, copy it to a COG, drop the temp."""
    with rasterio.open(tmp, "r+") as src:
        src.scales, src.offsets = (scale_offset[0],), (scale_offset[1],)
        src.set_band_description(1, s2_band_description(band_id))
    resampling = "NEAREST" if band_id in CATEGORICAL_BANDS else "AVERAGE"
    rasterio.shutil.copy(tmp, final, driver="COG", compress="DEFLATE", predictor="2",
                         overview_resampling=resampling, blocksize=BLOCK, BIGTIFF="IF_SAFER")
    tmp.unlink()
    return final
