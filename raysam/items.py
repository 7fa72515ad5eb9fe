"""Parsed STAC items: the small frozen records that travel instead of pystac objects.

:mod:`raysam.stac` parses each catalog item once into a :class:`ParsedItem`; selection,
chip planning and chip reads only see these records (cheap to pickle, no pystac).
Band keys are canonical Sentinel-2 band ids (``B02``, ``B03``, ``B04``, ``B08``, ``SCL``, ...),
resolved from ``eo:bands`` names and common names, whatever the catalog's asset keys are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from raysam.errors import ConfigError

# Seed parameter ``band_names`` uses R, G, B; map them (and STAC common names) to band ids.
BAND_ALIASES: dict[str, str] = {
    "R": "B04", "G": "B03", "B": "B02", "N": "B08",
    "red": "B04", "green": "B03", "blue": "B02", "nir": "B08",
    "coastal": "B01", "rededge1": "B05", "rededge2": "B06", "rededge3": "B07",
    "nir08": "B8A", "nir09": "B09", "swir16": "B11", "swir22": "B12",
}
REFLECTANCE_SCALE = 1e-4  # Sentinel-2 L2A: reflectance = (DN + offset) * 1e-4
KNOWN_BANDS = frozenset([f"B{i:02d}" for i in range(1, 13)] + ["B8A", "SCL"])


def canonical_band(name: str) -> str:
    """Return the Sentinel-2 band id for a band id, seed alias (R/G/B) or STAC common name."""
    return BAND_ALIASES.get(name, BAND_ALIASES.get(name.lower(), name.upper()))


def check_band_names(setting: str, bands: Sequence[str]) -> None:
    """Refuse names that are no Sentinel-2 band (id, alias or common name), naming the setting.

    Raises:
        ConfigError: ``<setting> has 'B99', which is not a Sentinel-2 band: ...``.
    """
    unknown = [b for b in bands if not isinstance(b, str) or canonical_band(b) not in KNOWN_BANDS]
    if unknown:
        raise ConfigError(f"{setting} has {', '.join(map(repr, unknown))}, which is not a Sentinel-2 band: use "
                          "B01-B12, B8A or SCL (or R, G, B, N, or a STAC common name such as red or nir)")


@dataclass(frozen=True)
class BandAsset:
    """One band of one item.

    Attributes:
        key: the asset key in the catalog (``B04`` on Planetary Computer, ``red`` on earth-search).
        href: the unsigned asset URL or path; sign it only when reading.
        gsd_m: ground sample distance in metres, if known (10, 20 or 60).
        offset_dn: DN offset to add before scaling (-1000 for processing baseline >= 04.00
            unless the catalog already declares it in ``raster:bands``); 0 for SCL.
        scale: reflectance per DN after the offset (1e-4); 1.0 for categorical bands (SCL).
        nodata: the nodata DN (0 for Sentinel-2 L2A).
    """

    key: str
    href: str
    gsd_m: float | None = None
    offset_dn: float = 0.0
    scale: float = 1.0
    nodata: float | None = 0


@dataclass(frozen=True)
class ParsedItem:
    """One Sentinel-2 L2A scene (one MGRS tile at one datetime), parsed once.

    Attributes:
        id: STAC item id.
        collection: STAC collection id.
        datetime_utc: acquisition time (timezone-aware UTC).
        tile_id: MGRS tile (``15TVG``).
        epsg: the tile's native CRS (from ``proj:epsg`` or ``proj:code``).
        bbox_wgs84: (west, south, east, north).
        footprint_wkb: the data footprint in EPSG:4326 as WKB (shapely.from_wkb to use).
        cloud_cover: ``eo:cloud_cover`` in percent, if given.
        processing_baseline: ``s2:processing_baseline`` (``05.10``), if given.
        relative_orbit: ``sat:relative_orbit``, if given.
        bands: canonical band id -> asset.
        processed_utc: when the product was generated (``s2:generation_time``), if given;
            breaks ties between reprocessed duplicates.
    """

    id: str
    collection: str
    datetime_utc: datetime
    tile_id: str
    epsg: int
    bbox_wgs84: tuple[float, float, float, float]
    footprint_wkb: bytes = field(repr=False)
    cloud_cover: float | None = None
    processing_baseline: str | None = None
    relative_orbit: int | None = None
    bands: dict[str, BandAsset] = field(default_factory=dict)
    processed_utc: datetime | None = None
