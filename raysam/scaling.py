"""Radiometric scaling: band DNs to SAM's RGB uint8, with one stretch per date group.

The seed's ``band_names``/``band_scaling``/``band_offset``: reflectance =
(DN + offset_dn) * scale, with the item's offset and scale unless overridden per band; then
``mode="reflectance"`` gives clip(reflectance, 0, 1) * 255 (FarmVibes' default) and
``mode="stretch"`` maps per-band low..high reflectance to 0..255, with low/high computed once
per date group by :func:`compute_stretch` (from coarse reads of every item), never per chip.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyproj
import rasterio
import shapely
from affine import Affine
from rasterio.enums import Resampling
from rasterio.features import geometry_mask

from raysam.errors import ConfigError
from raysam.grid import BandRead, DateGroup, item_read
from raysam.items import canonical_band, check_band_names
from raysam.remote_io import NetworkPolicy, Signer, gdal_env_options, read_asset


DN_MAX = 65535  # the largest uint16 DN; 0 is nodata


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
            raise ConfigError(f"mode={self.mode!r}: use reflectance or stretch")
        if len(self.band_names) != 3:
            raise ConfigError(f"band_names={list(self.band_names)}: give exactly 3 bands (R, G, B)")
        check_band_names("band_names", self.band_names)
        for name in ("band_scaling", "band_offset", "low", "high"):
            values = getattr(self, name)
            if values is not None and len(values) != 3:
                raise ConfigError(f"{name} needs one value per band (3), got {list(values)}")
        self._check_makes_an_image()

    def _check_makes_an_image(self) -> None:
        """Refuse overrides under which no DN can give anything but one flat colour: a scale
        that is not a positive number, or (reflectance mode) one that maps every valid DN
        (1..65535, plus the offset) outside 0..1."""
        if self.band_scaling is None:
            return
        for i, scale in enumerate(self.band_scaling):
            band = self.band_names[i]
            if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
                raise ConfigError(f"band_scaling={list(self.band_scaling)}: band {band} gets scale {scale!r}, which "
                                  "turns every pixel into one value: give positive reflectance-per-DN factors "
                                  "(Sentinel-2 L2A: 0.0001), or null to use the items' own")
            offset = self.band_offset[i] if self.band_offset is not None else 0.0
            low, high = (1 + offset) * scale, (DN_MAX + offset) * scale
            if self.mode == "reflectance" and (high <= 0.0 or low >= 1.0):
                raise ConfigError(f"band_scaling={list(self.band_scaling)}: band {band} maps every DN to a "
                                  f"reflectance in [{low:g}, {high:g}], outside 0..1, so the image is flat: "
                                  "give reflectance-per-DN factors (Sentinel-2 L2A: 0.0001) or use scaling=stretch")

    @property
    def per_group(self) -> bool:
        """True if each date group computes its own scaling from its items (:func:`group_scaling`)."""
        return self.mode == "stretch"

    @property
    def band_ids(self) -> tuple[str, ...]:
        """Canonical band ids in RGB order."""
        return tuple(canonical_band(b) for b in self.band_names)


def band_scale(band: BandRead, scaling: ScalingSpec, index: int) -> tuple[float, float]:
    """(offset_dn, scale) of a band: the seed's overrides if given, else the item's."""
    offset = scaling.band_offset[index] if scaling.band_offset is not None else band.offset_dn
    scale = scaling.band_scaling[index] if scaling.band_scaling is not None else band.scale
    return float(offset), float(scale)


def reflectance(dn: np.ndarray, offset_dn: float, scale: float) -> np.ndarray:
    """(DN + offset_dn) * scale as float32."""
    out = dn.astype(np.float32)
    out += np.float32(offset_dn)
    out *= np.float32(scale)
    return out


def to_uint8(refl: np.ndarray, scaling: ScalingSpec) -> np.ndarray:
    """(3, H, W) reflectance -> (H, W, 3) uint8, by the scaling mode (rounded to nearest)."""
    return np.stack([band_to_uint8(layer, scaling, i) for i, layer in enumerate(refl)], axis=-1)


def band_to_uint8(refl: np.ndarray, scaling: ScalingSpec, index: int) -> np.ndarray:
    """Reflectance of RGB band ``index`` -> uint8, by the scaling mode (rounded to nearest)."""
    return _unit_to_uint8(refl, *_stretch_bounds(scaling, index))


LUT_DTYPES = ("uint8", "uint16")  # DN types whose every value indexes a 65,536-entry table


def dn_to_uint8(dn: np.ndarray, offset_dn: float, scale: float, scaling: ScalingSpec, index: int) -> np.ndarray:
    """DN of RGB band ``index`` -> uint8: ``band_to_uint8(reflectance(dn, offset_dn, scale))``,
    through a table of all 65,536 DNs for unsigned DNs (the same float32 arithmetic, once per
    band instead of once per pixel)."""
    low, high = _stretch_bounds(scaling, index)
    if dn.dtype.name not in LUT_DTYPES:
        return _unit_to_uint8(reflectance(dn, offset_dn, scale), low, high)
    return _dn_table(float(offset_dn), float(scale), low, high)[dn]


@functools.lru_cache(maxsize=64)
def _dn_table(offset_dn: float, scale: float, low: float | None, high: float | None) -> np.ndarray:
    return _unit_to_uint8(reflectance(np.arange(2**16, dtype=np.uint16), offset_dn, scale), low, high)


def _stretch_bounds(scaling: ScalingSpec, index: int) -> tuple[float | None, float | None]:
    """(low, high) reflectance of band ``index`` in stretch mode; (None, None) otherwise."""
    if scaling.mode != "stretch":
        return None, None
    if scaling.low is None or scaling.high is None:
        raise ConfigError("stretch scaling has no low/high; compute them once per date "
                          "group with raysam.scaling.compute_stretch")
    return scaling.low[index], scaling.high[index]


def _unit_to_uint8(refl: np.ndarray, low: float | None, high: float | None) -> np.ndarray:
    """Reflectance -> uint8: clip to 0..1 (after mapping low..high to 0..1 if given), * 255, rounded."""
    if low is None:
        unit = refl
    else:
        low32 = np.float32(low)
        unit = (refl - low32) / np.maximum(np.float32(high) - low32, np.float32(1e-6))
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def compute_stretch(group: DateGroup, bands: Sequence[str] = ("R", "G", "B"),
                    percentiles: tuple[float, float] = (2.0, 98.0),
                    signer: Signer | None = None, max_side_px: int = 512,
                    base: ScalingSpec | None = None,
                    network: NetworkPolicy | None = None) -> ScalingSpec:
    """Per-band contrast stretch for a whole date group, from coarse reads of each item.

    Each item band is read decimated to at most ``max_side_px`` per side (GDAL uses the COG's
    overviews), restricted to valid pixels inside the AOI; low/high are the given percentiles of
    all items' reflectance together. Called once per date group, never per chip.

    Args:
        group: the date group.
        bands: three band ids or aliases in RGB order.
        percentiles: (low, high) percentiles in 0..100.
        signer: href signer, as for :func:`raysam.read.read_chip`.
        max_side_px: longest side of the coarse read.
        base: scaling whose band_scaling/band_offset overrides apply (default none).
        network: as for :func:`raysam.read.read_chip`.

    Returns:
        A ``mode="stretch"`` ScalingSpec; low=0, high=1 if the group has no valid pixel.
    """
    lo_pct, hi_pct = percentiles
    if not 0 <= lo_pct < hi_pct <= 100:
        raise ConfigError(f"stretch percentiles {percentiles} must satisfy 0 <= low < high <= 100")
    spec = replace(base or ScalingSpec(), mode="stretch", band_names=tuple(bands),
                   low=None, high=None)
    samples = _coarse_samples(group, spec, signer, max_side_px, network)
    if samples.shape[1] == 0:
        return replace(spec, low=(0.0,) * 3, high=(1.0,) * 3)
    low = np.percentile(samples, lo_pct, axis=1)
    high = np.percentile(samples, hi_pct, axis=1)
    return replace(spec, low=tuple(map(float, low)), high=tuple(map(float, high)))


def _coarse_samples(group: DateGroup, spec: ScalingSpec, signer: Signer | None,
                    max_side_px: int, network: NetworkPolicy | None = None) -> np.ndarray:
    """Reflectance (3, N) of valid in-AOI pixels of every item, from decimated reads."""
    per_item = []
    with rasterio.Env(**gdal_env_options(network)):
        for item in group.items:
            reads = item_read(item, spec.band_ids)
            layers = [_coarse_band(reads.item_id, b, group, signer, max_side_px, network)
                      for b in reads.bands]
            ok = np.logical_and.reduce([m for _, m in layers])
            per_item.append(np.stack([reflectance(dn[ok], *band_scale(b, spec, i))
                                      for i, ((dn, _), b) in enumerate(zip(layers, reads.bands))]))
    return np.concatenate(per_item, axis=1) if per_item else np.zeros((3, 0), np.float32)


def _coarse_band(item_id: str, band: BandRead, group: DateGroup, signer: Signer | None,
                 max_side_px: int,
                 network: NetworkPolicy | None = None) -> tuple[np.ndarray, np.ndarray]:
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

    return read_asset(item_id, band, signer, read, network)


def _aoi_in_crs(group: DateGroup, crs: Any) -> shapely.Geometry:
    """The group's AOI reprojected from the grid CRS to ``crs``."""
    aoi = group.aoi_utm
    if pyproj.CRS.from_user_input(crs).equals(pyproj.CRS.from_epsg(group.grid.epsg)):
        return aoi
    transformer = pyproj.Transformer.from_crs(group.grid.epsg, crs, always_xy=True)
    return shapely.transform(
        aoi, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))


def group_scaling(scaling: ScalingSpec, group: DateGroup, signer: Signer | None = None,
                  network: NetworkPolicy | None = None) -> ScalingSpec:
    """A date group's RGB scaling: ``scaling`` itself, or its per-group stretch (computed once per
    group, never per chip, so neighbouring chips see the same colours)."""
    if scaling.per_group:
        return compute_stretch(group, scaling.band_names, signer=signer, base=scaling, network=network)
    return scaling
