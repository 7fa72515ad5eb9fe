"""Chip reads: windowed, reprojected reads straight from the COGs, and radiometric scaling.

:func:`read_chip` turns one :class:`~raysam.grid.ChipTask` into a SAM-ready RGB uint8 chip plus
valid and cloud masks. Every band of every item is warped on the fly (``rasterio.vrt.WarpedVRT``)
onto the chip's own pixel grid on the target grid: bilinear for reflectance bands (20 m bands
are upsampled), nearest for the categorical SCL, nodata 0. Items are mosaicked first valid
wins, in the order the date group lists them; pixels outside the AOI become nodata.

Scaling (the seed's ``band_names``/``band_scaling``/``band_offset``): reflectance =
(DN + offset_dn) * scale, with the item's offset and scale unless overridden per band; then
``mode="reflectance"`` gives clip(reflectance, 0, 1) * 255 (FarmVibes' default) and
``mode="stretch"`` maps per-band low..high reflectance to 0..255, with low/high computed once
per date group by :func:`compute_stretch`, never per chip.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyproj
import rasterio
import shapely
from affine import Affine
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.features import geometry_mask
from rasterio.vrt import WarpedVRT

from raysam.errors import ConfigError, DataError
from raysam.grid import BandRead, ChipTask, DateGroup, ItemRead, item_read
from raysam.items import canonical_band

# SCL classes (Sentinel-2 L2A product spec): 3 cloud shadow, 8 cloud medium probability,
# 9 cloud high probability, 10 thin cirrus.
DEFAULT_CLOUD_CLASSES = (3, 8, 9, 10)
DEFAULT_MAX_CLOUD_FRACTION = 0.8  # raysam.config.ChipConfig.max_cloud_fraction default
SCL = "SCL"
MAX_REASON_CHARS = 200

Signer = Callable[[str], str]


def gdal_env_options() -> dict[str, Any]:
    """GDAL options for reading COGs over HTTP (used as ``rasterio.Env(**options)``)."""
    return {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no directory listing per open
        "GDAL_HTTP_MAX_RETRY": "4",  # retries on 429/502/503/504
        "GDAL_HTTP_RETRY_DELAY": "1",  # seconds, doubled each retry
        "GDAL_HTTP_MULTIRANGE": "YES",  # one request for several byte ranges
        "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
        "VSI_CACHE": "TRUE",
        "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF",
    }


@dataclass(frozen=True)
class ScalingSpec:
    """How band DNs become RGB uint8.

    Attributes:
        mode: ``"reflectance"`` (clip(reflectance, 0, 1) * 255) or ``"stretch"``
            ((reflectance - low) / (high - low) clipped to 0..1, * 255).
        band_names: the three bands (ids or aliases: R, G, B) in RGB order.
        band_scaling: per band, reflectance per DN (overrides the item's ``scale``).
        band_offset: per band, DN offset added before scaling (overrides ``offset_dn``).
        low: stretch mode: per band reflectance mapped to 0 (from :func:`compute_stretch`).
        high: stretch mode: per band reflectance mapped to 255.
    """

    mode: str = "reflectance"
    band_names: tuple[str, ...] = ("R", "G", "B")
    band_scaling: tuple[float, ...] | None = None
    band_offset: tuple[float, ...] | None = None
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("reflectance", "stretch"):
            raise ConfigError(f"scaling mode {self.mode!r} is unknown; use reflectance or stretch")
        if len(self.band_names) != 3:
            raise ConfigError(f"band_names {list(self.band_names)} must name 3 bands (R, G, B)")
        for name in ("band_scaling", "band_offset", "low", "high"):
            values = getattr(self, name)
            if values is not None and len(values) != 3:
                raise ConfigError(f"{name} needs one value per band (3), got {list(values)}")

    @property
    def band_ids(self) -> tuple[str, ...]:
        """Canonical band ids in RGB order."""
        return tuple(canonical_band(b) for b in self.band_names)


@dataclass(frozen=True)
class ChipPixels:
    """A read chip.

    Attributes:
        date_group_id, chip_id, window_px: from the task.
        rgb: uint8 (H, W, 3); 0 where not valid.
        valid: bool (H, W): data in every RGB band and inside the AOI.
        cloud: bool (H, W): valid and SCL in the cloud classes (False without SCL).
        stats: valid_fraction, cloud_fraction (of valid pixels), items_read.
    """

    date_group_id: str
    chip_id: tuple[int, int]
    window_px: tuple[int, int, int, int]
    rgb: np.ndarray
    valid: np.ndarray
    cloud: np.ndarray
    stats: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SkippedChip:
    """A chip not worth segmenting, with the reason (``no valid pixels``, ``cloudy ...``)."""

    date_group_id: str
    chip_id: tuple[int, int]
    reason: str
    stats: dict[str, float] = field(default_factory=dict)
    rgb: None = None


def read_chip(task: ChipTask, signer: Signer | None = None,
              scaling: ScalingSpec | None = None,
              cloud_classes: Sequence[int] = DEFAULT_CLOUD_CLASSES,
              max_cloud_fraction: float = DEFAULT_MAX_CLOUD_FRACTION) -> ChipPixels | SkippedChip:
    """Read, mosaic, mask and scale one chip.

    Args:
        task: the chip to read.
        signer: turns an href into a readable URL (e.g. Planetary Computer SAS signing); if it
            has ``resign(href)``, that is called once on HTTP 403 before retrying.
        scaling: DN to uint8 conversion; default reflectance R, G, B.
        cloud_classes: SCL classes counted as cloud.
        max_cloud_fraction: skip the chip if more than this fraction of its valid pixels is
            cloud.

    Returns:
        ChipPixels, or SkippedChip for a chip with no valid pixels or too much cloud.

    Raises:
        DataError: an asset cannot be read (missing, corrupt, refused).
    """
    scaling = scaling or ScalingSpec()
    in_aoi = aoi_mask(task)
    if not in_aoi.any():
        return SkippedChip(task.date_group_id, task.chip_id, "no valid pixels",
                           {"valid_fraction": 0.0})
    with rasterio.Env(**gdal_env_options()):
        refl, valid, scl, used = _mosaic(task, scaling, in_aoi, signer)
    cloud = valid & np.isin(scl, np.asarray(cloud_classes, dtype=np.uint8))
    stats = _chip_stats(valid, cloud, used)
    reason = _skip_reason(stats, max_cloud_fraction)
    if reason:
        return SkippedChip(task.date_group_id, task.chip_id, reason, stats)
    rgb = to_uint8(refl, scaling)
    rgb[~valid] = 0
    return ChipPixels(task.date_group_id, task.chip_id, task.window_px, rgb, valid, cloud, stats)


def aoi_mask(task: ChipTask) -> np.ndarray:
    """Bool (H, W): chip pixels whose centre lies inside the task's AOI clip."""
    _, _, width, height = task.window_px
    if task.aoi_clip_wkb is None:
        return np.ones((height, width), dtype=bool)
    clip = shapely.from_wkb(task.aoi_clip_wkb)
    if clip.is_empty:
        return np.zeros((height, width), dtype=bool)
    return geometry_mask([clip], out_shape=(height, width),
                         transform=Affine(*task.chip_transform), invert=True)


def _mosaic(task: ChipTask, scaling: ScalingSpec, in_aoi: np.ndarray,
            signer: Signer | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """First-valid-wins mosaic over the task's items: reflectance (3, H, W), valid, SCL, items."""
    shape = in_aoi.shape
    refl = np.zeros((3, *shape), dtype=np.float32)
    valid = np.zeros(shape, dtype=bool)
    scl = np.zeros(shape, dtype=np.uint8)
    used = 0
    for item in task.items:
        if valid.sum() == in_aoi.sum():
            break
        item_refl, item_valid = _read_item_rgb(item, task, scaling, signer)
        take = item_valid & in_aoi & ~valid
        if not take.any():
            continue
        used += 1
        refl[:, take] = item_refl[:, take]
        valid |= take
        if item.band(SCL) is not None:
            scl[take] = _read_band(item.item_id, item.band(SCL), task, signer,
                                   Resampling.nearest)[take]
    return refl, valid, scl, used


def _read_item_rgb(item: ItemRead, task: ChipTask, scaling: ScalingSpec,
                   signer: Signer | None) -> tuple[np.ndarray, np.ndarray]:
    """Reflectance (3, H, W) of one item's RGB bands and where all three have data."""
    layers, valid = [], None
    for i, band_id in enumerate(scaling.band_ids):
        band = item.band(band_id)
        if band is None:
            raise DataError(f"chip task for item {item.item_id} lacks band {band_id}; plan "
                            f"chip tasks with bands {list(scaling.band_names)} + SCL")
        dn = _read_band(item.item_id, band, task, signer, Resampling.bilinear)
        has_data = dn != band.nodata if band.nodata is not None else np.ones(dn.shape, bool)
        valid = has_data if valid is None else valid & has_data
        layers.append(reflectance(dn, *_band_scale(band, scaling, i)))
    return np.stack(layers), valid


def _band_scale(band: BandRead, scaling: ScalingSpec, index: int) -> tuple[float, float]:
    """(offset_dn, scale) of a band: the seed's overrides if given, else the item's."""
    offset = scaling.band_offset[index] if scaling.band_offset is not None else band.offset_dn
    scale = scaling.band_scaling[index] if scaling.band_scaling is not None else band.scale
    return float(offset), float(scale)


def reflectance(dn: np.ndarray, offset_dn: float, scale: float) -> np.ndarray:
    """(DN + offset_dn) * scale as float32."""
    return ((dn.astype(np.float32) + np.float32(offset_dn)) * np.float32(scale)).astype(np.float32)


def to_uint8(refl: np.ndarray, scaling: ScalingSpec) -> np.ndarray:
    """(3, H, W) reflectance -> (H, W, 3) uint8, by the scaling mode (rounded to nearest)."""
    if scaling.mode == "stretch":
        if scaling.low is None or scaling.high is None:
            raise ConfigError("stretch scaling has no low/high; compute them once per date "
                              "group with raysam.read.compute_stretch")
        low = np.asarray(scaling.low, np.float32)[:, None, None]
        span = np.maximum(np.asarray(scaling.high, np.float32)[:, None, None] - low, 1e-6)
        unit = (refl - low) / span
    else:
        unit = refl
    u8 = np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(u8, 0, -1))


def _chip_stats(valid: np.ndarray, cloud: np.ndarray, items_read: int) -> dict[str, float]:
    """Fractions describing a chip."""
    n_valid = int(valid.sum())
    return {"valid_fraction": n_valid / valid.size,
            "cloud_fraction": float(cloud.sum()) / n_valid if n_valid else 0.0,
            "items_read": float(items_read)}


def _skip_reason(stats: dict[str, float], max_cloud_fraction: float) -> str | None:
    """Why a chip should be skipped, or None."""
    if stats["valid_fraction"] == 0:
        return "no valid pixels"
    if stats["cloud_fraction"] > max_cloud_fraction:
        return f"cloudy: {stats['cloud_fraction']:.2f} > {max_cloud_fraction:.2f}"
    return None


def _read_band(item_id: str, band: BandRead, task: ChipTask, signer: Signer | None,
               resampling: Resampling) -> np.ndarray:
    """One band warped onto the chip grid; 403 -> re-sign once; failures -> DataError."""
    _, _, width, height = task.window_px
    vrt_args = {"crs": task.crs, "transform": Affine(*task.chip_transform), "width": width,
                "height": height, "resampling": resampling, "nodata": band.nodata}
    return _with_signed_href(item_id, band, signer, lambda src: _warp(src, band, vrt_args))


def _warp(src: rasterio.DatasetReader, band: BandRead, vrt_args: dict[str, Any]) -> np.ndarray:
    """Read band 1 of ``src`` through a WarpedVRT with ``vrt_args``."""
    src_nodata = src.nodata if src.nodata is not None else band.nodata
    with WarpedVRT(src, src_nodata=src_nodata, **vrt_args) as vrt:
        return vrt.read(1)


def _with_signed_href(item_id: str, band: BandRead, signer: Signer | None,
                      fn: Callable[[rasterio.DatasetReader], Any]) -> Any:
    """Open the band's (signed) href and apply ``fn``; re-sign once on HTTP 403."""
    href = signer(band.href) if signer else band.href
    tries = 0
    while True:
        tries += 1
        try:
            with rasterio.open(href) as src:
                return fn(src)
        except (RasterioError, OSError) as err:
            resign = getattr(signer, "resign", None)
            if tries == 1 and resign is not None and _is_forbidden(err):
                href = resign(band.href)
                continue
            raise DataError(f"item {item_id} asset {band.key}: cannot read {band.href}: "
                            f"{_reason(err)} (after {tries} tries)") from None


def _is_forbidden(err: Exception) -> bool:
    """True if a GDAL error is an HTTP 403 (expired or missing SAS token)."""
    text = str(err)
    return "403" in text or "Forbidden" in text


def _reason(err: Exception) -> str:
    """The first line of an error, bounded in length."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    return lines[0][:MAX_REASON_CHARS]


def compute_stretch(group: DateGroup, bands: Sequence[str] = ("R", "G", "B"),
                    percentiles: tuple[float, float] = (2.0, 98.0),
                    signer: Signer | None = None, max_side_px: int = 512,
                    base: ScalingSpec | None = None) -> ScalingSpec:
    """Per-band contrast stretch for a whole date group, from coarse reads of each item.

    Each item band is read decimated to at most ``max_side_px`` per side (GDAL uses the COG's
    overviews), restricted to valid pixels inside the AOI; low/high are the given percentiles of
    all items' reflectance together. Called once per date group, never per chip.

    Args:
        group: the date group.
        bands: three band ids or aliases in RGB order.
        percentiles: (low, high) percentiles in 0..100.
        signer: href signer, as for :func:`read_chip`.
        max_side_px: longest side of the coarse read.
        base: scaling whose band_scaling/band_offset overrides apply (default none).

    Returns:
        A ``mode="stretch"`` ScalingSpec; low=0, high=1 if the group has no valid pixel.
    """
    lo_pct, hi_pct = percentiles
    if not 0 <= lo_pct < hi_pct <= 100:
        raise ConfigError(f"stretch percentiles {percentiles} must satisfy 0 <= low < high <= 100")
    spec = replace(base or ScalingSpec(), mode="stretch", band_names=tuple(bands),
                   low=None, high=None)
    samples = _coarse_samples(group, spec, signer, max_side_px)
    if samples.shape[1] == 0:
        return replace(spec, low=(0.0,) * 3, high=(1.0,) * 3)
    low = np.percentile(samples, lo_pct, axis=1)
    high = np.percentile(samples, hi_pct, axis=1)
    return replace(spec, low=tuple(map(float, low)), high=tuple(map(float, high)))


def _coarse_samples(group: DateGroup, spec: ScalingSpec, signer: Signer | None,
                    max_side_px: int) -> np.ndarray:
    """Reflectance (3, N) of valid in-AOI pixels of every item, from decimated reads."""
    per_item = []
    with rasterio.Env(**gdal_env_options()):
        for item in group.items:
            reads = item_read(item, spec.band_ids)
            layers = [_coarse_band(reads.item_id, b, group, signer, max_side_px)
                      for b in reads.bands]
            ok = np.logical_and.reduce([m for _, m in layers])
            per_item.append(np.stack([reflectance(dn[ok], *_band_scale(b, spec, i))
                                      for i, ((dn, _), b) in enumerate(zip(layers, reads.bands))]))
    return np.concatenate(per_item, axis=1) if per_item else np.zeros((3, 0), np.float32)


def _coarse_band(item_id: str, band: BandRead, group: DateGroup, signer: Signer | None,
                 max_side_px: int) -> tuple[np.ndarray, np.ndarray]:
    """A decimated read of one band and its valid-and-in-AOI mask."""
    def read(src: rasterio.DatasetReader) -> tuple[np.ndarray, np.ndarray]:
        factor = max(1, math.ceil(max(src.width, src.height) / max_side_px))
        out_shape = (math.ceil(src.height / factor), math.ceil(src.width / factor))
        dn = src.read(1, out_shape=out_shape, resampling=Resampling.nearest)
        transform = src.transform @ Affine.scale(src.width / out_shape[1],
                                                 src.height / out_shape[0])
        aoi = _aoi_in_crs(group, src.crs)
        inside = geometry_mask([aoi], out_shape=out_shape, transform=transform, invert=True)
        nodata = src.nodata if src.nodata is not None else band.nodata
        return dn, inside & (dn != nodata if nodata is not None else True)

    return _with_signed_href(item_id, band, signer, read)


def _aoi_in_crs(group: DateGroup, crs: Any) -> shapely.Geometry:
    """The group's AOI reprojected from the grid CRS to ``crs``."""
    aoi = group.aoi_utm
    if pyproj.CRS.from_user_input(crs).equals(pyproj.CRS.from_epsg(group.grid.epsg)):
        return aoi
    transformer = pyproj.Transformer.from_crs(group.grid.epsg, crs, always_xy=True)
    return shapely.transform(
        aoi, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))
