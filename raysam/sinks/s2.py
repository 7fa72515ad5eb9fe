"""s2_raster: the Sentinel-2 bands a date group used, as COG tiles on its grid, clipped to the AOI.

DNs are written as the catalog has them (uint16, nodata 0), mosaicked first valid wins over the
group's items like the chips (:func:`raysam.read.read_band_dn`); each band's GDAL scale/offset
tags turn them into reflectance (``DN * 1e-4 - 0.1`` for processing baseline >= 04.00), so GIS
tools show reflectance without applying the baseline offset twice. Each sink tile
(:mod:`raysam.tiles`) is one task that reads its window of every band once; a VRT per band
mosaics the tiles. The tasks need no masks, so they start with the date group.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rasterio.enums import Resampling

from raysam.grid import TargetGrid, WindowPlanner
from raysam.items import REFLECTANCE_SCALE, canonical_band
from raysam.layout import S2_DIR, GroupSpec, s2_tile
from raysam.read import SCL, aoi_mask, read_band_dn
from raysam.remote_io import NetworkPolicy, Signer
from raysam.sinks.cog import tile_transform, write_cog
from raysam.sinks.mosaic import MosaicBand, vrt_xml
from raysam.sinks.quicklook import QuicklookFrame, rgb_preview
from raysam.sinks.style import s2_band_description
from raysam.tiles import TileRC

CATEGORICAL_BANDS = (SCL,)  # read nearest, never interpolated
QUICKLOOK_BANDS = ("B04", "B03", "B02")  # R, G, B

ScaleOffset = tuple[float, float]


@dataclass(frozen=True)
class S2TileWritten:
    """What a Sentinel-2 tile task reports: its window, each band's scale/offset, time spent."""

    tile: TileRC
    window_px: tuple[int, int, int, int]
    scale_offset: dict[str, ScaleOffset]
    seconds: float


def band_ids(bands: Sequence[str]) -> tuple[str, ...]:
    """Canonical band ids, duplicates written once."""
    return tuple(dict.fromkeys(canonical_band(b) for b in bands))


def default_scale_offset(band_id: str) -> ScaleOffset:
    """Scale/offset of a band no item had in a tile (reflectance bands: the L2A scale, no offset)."""
    return (1.0, 0.0) if band_id in CATEGORICAL_BANDS else (REFLECTANCE_SCALE, 0.0)


def write_s2_tile(spec: GroupSpec, tile: TileRC, bands: Sequence[str], frame: QuicklookFrame,
                  signer: Signer | None = None, network: NetworkPolicy | None = None) -> S2TileWritten:
    """Read one sink tile of every band once and write one COG per band, plus the RGB preview.

    Pixels outside the AOI or without data are 0 (nodata).

    Raises:
        DataError: an item lacks a band, or an asset cannot be read.
    """
    t0 = time.perf_counter()
    window = spec.tiling.tile_window(tile)
    ids = band_ids(bands)
    task = WindowPlanner(spec.group, ids).task(tile, window)
    in_aoi = aoi_mask(task) if task is not None else None
    transform = tile_transform(spec.group.grid.transform, window)
    scale_offset: dict[str, ScaleOffset] = {}
    preview: dict[str, np.ndarray] = {}
    for band_id in ids:
        if task is None:
            dn = np.zeros((window[3], window[2]), np.uint16)
        else:
            resampling = Resampling.nearest if band_id in CATEGORICAL_BANDS else Resampling.bilinear
            dn, read = read_band_dn(task, band_id, signer, resampling, network=network)
            dn = np.where(in_aoi, dn, 0).astype(np.uint16)
            scale_offset[band_id] = (read.scale, read.offset_dn * read.scale)
        so = scale_offset.get(band_id, default_scale_offset(band_id))
        write_cog(spec.root.storage, spec.out(s2_tile(band_id, tile)), dn, transform, spec.group.grid.epsg,
                  nodata=0, description=s2_band_description(band_id), overview_resampling="NEAREST" if band_id in CATEGORICAL_BANDS else "AVERAGE",
                  predictor=2, scale_offset=so)
        if band_id in QUICKLOOK_BANDS:
            preview[band_id] = dn
    if all(b in preview for b in QUICKLOOK_BANDS):
        rgb = rgb_preview(np.stack([preview[b] for b in QUICKLOOK_BANDS]), window, frame)
        buf = io.BytesIO()
        np.save(buf, rgb)
        spec.root.storage.put_bytes(spec.preview("rgb", tile), buf.getvalue())
    return S2TileWritten(tile, window, scale_offset, time.perf_counter() - t0)


def band_mosaic_xml(grid: TargetGrid, band_id: str, tiles: Sequence[S2TileWritten]) -> str:
    """The VRT of one band over its tiles, to be stored as ``s2/<band>.vrt`` (tile paths relative to it).

    Every tile carries its own scale/offset as well.
    """
    band = MosaicBand("uint16", 0, s2_band_description(band_id), band_scale_offset(band_id, tiles))
    rel = [(s2_tile(band_id, r.tile)[len(S2_DIR) + 1:], r.window_px) for r in sorted(tiles, key=lambda r: r.tile)]
    return vrt_xml(grid.width, grid.height, grid.transform, grid.epsg, band, rel)


def band_scale_offset(band_id: str, tiles: Sequence[S2TileWritten]) -> ScaleOffset:
    """A band's scale/offset for its mosaic: the first tile's (in tile order) that had the band."""
    return next((r.scale_offset[band_id] for r in sorted(tiles, key=lambda r: r.tile) if band_id in r.scale_offset),
                default_scale_offset(band_id))
