"""A synthetic Sentinel-2 L2A catalog with known ground truth, and a local STAC API serving it.

:func:`make_demo_catalog` writes two small MGRS-style tiles in adjacent UTM zones (15 and 16,
whose boundary is the meridian 90°W, near Clinton, Iowa) at two dates, one COG per band per
item, STAC item JSON in Planetary Computer layout, a ``sentinel-2-l2a`` collection and the
ground-truth fields (``fields.parquet``). Fields are defined once in lon/lat and rendered
into each tile's own CRS, so the same field has the same shape in both zones. Other tiles, up
to full-size 10,980 px MGRS tiles, make larger catalogs of the same kind
(``scripts/bench_scale.py``); bands are rendered in strips, so memory stays bounded.

Layout under ``root``::

    collection.json                 STAC collection "sentinel-2-l2a"
    items/<item id>.json            one STAC item per file
    items.ndjson                    the same items, one per line (what rustac serves)
    cogs/<tile>/<yyyymmdd>/<band>.tif   B02, B03, B04, B08 (10 m), SCL (20 m)
    fields.parquet                  GeoParquet, EPSG:4326, columns id, geometry
    demo_catalog.json               CatalogInfo, written last (completion marker)

:func:`serve_catalog` serves the items with ``rustac serve`` (memory backend).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
import shapely
from affine import Affine
from pyproj import CRS, Transformer
from rasterio.features import rasterize
from shapely.geometry import LineString, Polygon, box, mapping

from raysam.errors import ConfigError, DataError

FORMAT = "raysam-demo-catalog/1"
DEMO_ROOT = Path("demo_data/catalog")
COLLECTION_ID = "sentinel-2-l2a"
# West, south, east, north; crosses the zone 15/16 boundary (lon -90) and lies inside the
# union of the two tiles, so it needs both of them (about 23 km x 11 km: several 1024 chips).
DEMO_AOI_WGS84 = (-90.14, 41.79, -89.86, 41.89)
DEMO_TIME_RANGE = ("2024-06-28", "2024-07-14")  # inclusive UTC dates holding both dates

TILE_PX = 2048  # 10 m pixels per tile side (20.48 km; real MGRS tiles are 10980 px)
GSD_M = 10.0
STRIP_ROWS = 512  # 10 m rows rendered at once (even: the noise is drawn at 20 m); bounds the generator's memory
SCL_GSD_M = 20.0
BASELINE = "05.10"
OLD_BASELINE = "05.00"  # the reprocessed duplicate that selection must drop
BOA_ADD_OFFSET_DN = 1000  # baked into DNs for processing baseline >= 04.00
RELATIVE_ORBIT = 69


@dataclass(frozen=True)
class DemoTile:
    """One synthetic tile: id, CRS, upper-left corner (a multiple of 60 m, as real tiles) and size.

    Attributes:
        tile_id: MGRS-style id (``16TBM``); its first two digits are the UTM zone.
        epsg: the tile's UTM CRS.
        x0_m, y0_m: upper-left corner in the tile CRS.
        size_px: pixels per side at 10 m (even: SCL is at 20 m); real MGRS tiles have 10980.
    """

    tile_id: str
    epsg: int
    x0_m: float
    y0_m: float
    size_px: int = TILE_PX

    def __post_init__(self) -> None:
        if self.size_px <= 0 or self.size_px % 2:
            raise ConfigError(f"DemoTile size_px={self.size_px}: use a positive even number of 10 m pixels")

    def shape_px(self, gsd_m: float) -> tuple[int, int]:
        """(rows, cols) of the tile's raster at ``gsd_m``."""
        n = int(self.size_px * GSD_M / gsd_m)
        return n, n


# Origins chosen so tile 15TYG spans about lon -90.20..-89.95 and 16TBM -90.05..-89.80.
TILES = (
    DemoTile("15TYG", 32615, 732180.0, 4645800.0),
    DemoTile("16TBM", 32616, 247140.0, 4646520.0),
)
DATES = (
    datetime(2024, 7, 1, 16, 58, 49, 24000, tzinfo=timezone.utc),
    datetime(2024, 7, 11, 16, 58, 49, 24000, tzinfo=timezone.utc),
)
CLOUDY_DATE_INDEX = 1
CLOUD_CENTER_WGS84 = (-89.93, 41.86)  # inside the AOI, in tile 16TBM only
CLOUD_RADIUS_M = 1800.0

REFLECTANCE_BANDS = ("B02", "B03", "B04", "B08")
BAND_INFO = {  # name, common name, centre wavelength (um), FWHM (um): Sentinel-2A MSI
    "B02": ("blue", 0.49, 0.098),
    "B03": ("green", 0.56, 0.045),
    "B04": ("red", 0.665, 0.038),
    "B08": ("nir", 0.842, 0.145),
}
# July surface reflectance per land cover, bands B02, B03, B04, B08 (typical Corn Belt values).
COVER_REFLECTANCE = {
    "corn": (0.030, 0.070, 0.040, 0.450),
    "soy": (0.035, 0.085, 0.050, 0.380),
    "bare": (0.080, 0.110, 0.140, 0.220),
    "hay": (0.045, 0.090, 0.065, 0.300),
}
GRASS_REFLECTANCE = (0.040, 0.075, 0.060, 0.280)  # field margins, farmsteads
ROAD_REFLECTANCE = (0.120, 0.130, 0.140, 0.180)
WATER_REFLECTANCE = (0.040, 0.050, 0.030, 0.010)
CLOUD_REFLECTANCE = (0.550, 0.560, 0.570, 0.600)
SCL_VEGETATION, SCL_NOT_VEGETATED, SCL_WATER = 4, 5, 6
SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH, SCL_CIRRUS = 8, 9, 10


@dataclass(frozen=True)
class CatalogInfo:
    """What :func:`make_demo_catalog` wrote, with the known answers tests check against.

    Attributes:
        root: catalog directory.
        collection_path: the collection JSON.
        items_dir: one item JSON per file.
        items_ndjson: all items, newline-delimited (load this into ``rustac serve``).
        fields_path: ground-truth GeoParquet (EPSG:4326, columns id, geometry).
        aoi_wgs84: demo region (west, south, east, north), crossing lon -90.
        time_range: inclusive UTC dates (start, end) that hold both acquisition dates.
        tiles: tile id -> EPSG code.
        dates: acquisition dates (ISO ``YYYY-MM-DD``).
        item_ids: every item id, the duplicate included.
        duplicate_item_id: the reprocessed item (older baseline) that dedupe must drop.
        cloudy_date: the date with a cloud patch (SCL 8/9/10) inside the AOI.
        cloud_cover: item id -> ``eo:cloud_cover`` (percent of the tile).
        n_fields: number of ground-truth fields.
        boundary_field_ids: ids of the fields that straddle lon -90.
        size_bytes: total size of the catalog on disk.
        seed: the generator seed.
    """

    root: Path
    collection_path: Path
    items_dir: Path
    items_ndjson: Path
    fields_path: Path
    aoi_wgs84: tuple[float, float, float, float]
    time_range: tuple[str, str]
    tiles: dict[str, int]
    dates: tuple[str, ...]
    item_ids: tuple[str, ...]
    duplicate_item_id: str
    cloudy_date: str
    cloud_cover: dict[str, float]
    n_fields: int
    boundary_field_ids: tuple[int, ...]
    size_bytes: int
    seed: int


@dataclass(frozen=True)
class Scene:
    """Land cover shared by all tiles and dates, in EPSG:4326."""

    fields: list[Polygon]
    covers: list[str]
    roads: shapely.Geometry
    river: shapely.Geometry


# ---------------------------------------------------------------- scene (lon/lat, once)


def _m_per_deg(lat: float) -> tuple[float, float]:
    """Metres per degree of longitude and of latitude at ``lat`` (spherical approximation)."""
    return 111_320.0 * np.cos(np.radians(lat)), 110_950.0


def _edges(rng: np.random.Generator, start: float, stop: float, anchor: float, step_deg: tuple[float, float]) -> np.ndarray:
    """Cell edges from ``start`` to ``stop`` with random widths; ``anchor`` falls inside a cell."""
    lo, hi = step_deg
    left = [anchor - 0.4 * hi]
    while left[-1] > start:
        left.append(left[-1] - rng.uniform(lo, hi))
    right = [left[0] + hi]
    while right[-1] < stop:
        right.append(right[-1] + rng.uniform(lo, hi))
    return np.array(sorted(left + right))


def _jittered_cell(rng: np.random.Generator, x0: float, x1: float, y0: float, y1: float, margin: tuple[float, float]) -> Polygon:
    """A field: the cell shrunk by ``margin`` (deg x, deg y), corners jittered by a fifth of it."""
    mx, my = margin
    xs = np.array([x0 + mx, x1 - mx, x1 - mx, x0 + mx])
    ys = np.array([y0 + my, y0 + my, y1 - my, y1 - my])
    xs += rng.uniform(-0.2, 0.2, 4) * mx
    ys += rng.uniform(-0.2, 0.2, 4) * my
    return Polygon(np.column_stack([xs, ys]))


def _river(bounds: tuple[float, float, float, float], lat: float) -> shapely.Geometry:
    """A meandering river, 120 m wide, running NNW-SSE through the east tile."""
    west, south, east, north = bounds
    t = np.linspace(0.0, 1.0, 200)
    lon = -89.985 + 0.13 * t + 0.012 * np.sin(7.0 * np.pi * t)
    lats = north - (north - south) * t
    mx, my = _m_per_deg(lat)
    line_m = LineString(np.column_stack([lon * mx, lats * my]))  # local equirectangular metres
    return shapely.transform(line_m.buffer(60.0), lambda xy: xy / np.array([mx, my]))


def _roads(xs: np.ndarray, ys: np.ndarray, lat: float) -> shapely.Geometry:
    """Gravel roads (12 m wide) along every third cell edge, like Iowa's mile grid."""
    mx, my = _m_per_deg(lat)
    lines = [LineString([(x * mx, ys[0] * my), (x * mx, ys[-1] * my)]) for x in xs[::3]]
    lines += [LineString([(xs[0] * mx, y * my), (xs[-1] * mx, y * my)]) for y in ys[::3]]
    roads_m = shapely.union_all(lines).buffer(6.0, cap_style="flat")
    return shapely.transform(roads_m, lambda xy: xy / np.array([mx, my]))


def make_scene(rng: np.random.Generator, bounds_wgs84: tuple[float, float, float, float]) -> Scene:
    """Fields on a jittered grid (300-800 m cells, 30 m margins), roads and a river, in lon/lat.

    One cell is anchored on lon -90 so that at least one field straddles the zone boundary;
    fields touching the river are dropped; one cell in ten is left as grass.
    """
    west, south, east, north = bounds_wgs84
    lat = 0.5 * (south + north)
    mx, my = _m_per_deg(lat)
    xs = _edges(rng, west, east, -90.0, (300 / mx, 800 / mx))
    ys = _edges(rng, south, north, lat, (300 / my, 800 / my))
    river = _river(bounds_wgs84, lat)
    near_river = river.buffer(30.0 / mx)
    fields, covers = [], []
    for x0, x1 in zip(xs[:-1], xs[1:]):
        for y0, y1 in zip(ys[:-1], ys[1:]):
            field = _jittered_cell(rng, x0, x1, y0, y1, (15 / mx, 15 / my))
            keep = rng.uniform() > 0.1 or (x0 < -90.0 < x1)
            if keep and not field.intersects(near_river):
                fields.append(field)
                covers.append(str(rng.choice(list(COVER_REFLECTANCE))))
    return Scene(fields, covers, _roads(xs, ys, lat), river)


# ---------------------------------------------------------------- rendering (per tile, date)


def tile_transform(tile: DemoTile, gsd_m: float) -> Affine:
    """The tile's affine transform at ``gsd_m``."""
    return Affine(gsd_m, 0.0, tile.x0_m, 0.0, -gsd_m, tile.y0_m)


def tile_footprint_wgs84(tile: DemoTile) -> Polygon:
    """The tile's square in EPSG:4326 (edges densified every 512 m before reprojecting)."""
    side_m = tile.size_px * GSD_M
    square = box(tile.x0_m, tile.y0_m - side_m, tile.x0_m + side_m, tile.y0_m)
    to_wgs84 = Transformer.from_crs(tile.epsg, 4326, always_xy=True)
    return shapely.transform(shapely.segmentize(square, 512.0), lambda xy: np.column_stack(to_wgs84.transform(xy[:, 0], xy[:, 1])))


def tile_inner_bbox_wgs84(tile: DemoTile, margin_m: float) -> tuple[float, float, float, float]:
    """A lon/lat box (west, south, east, north) inside the tile shrunk by ``margin_m``: each side
    lies on the innermost point of that edge of the shrunk square (UTM squares are slanted in
    lon/lat). An AOI that needs nothing but this tile and covers almost all of it."""
    side_m = tile.size_px * GSD_M
    x0, x1 = tile.x0_m + margin_m, tile.x0_m + side_m - margin_m
    y0, y1 = tile.y0_m - side_m + margin_m, tile.y0_m - margin_m
    along = np.linspace(0.0, 1.0, 65)
    to_wgs84 = Transformer.from_crs(tile.epsg, 4326, always_xy=True)

    def edge(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return to_wgs84.transform(np.broadcast_to(xs, along.shape), np.broadcast_to(ys, along.shape))

    west = edge(np.float64(x0), y0 + along * (y1 - y0))[0].max()
    east = edge(np.float64(x1), y0 + along * (y1 - y0))[0].min()
    south = edge(x0 + along * (x1 - x0), np.float64(y0))[1].max()
    north = edge(x0 + along * (x1 - x0), np.float64(y1))[1].min()
    return float(west), float(south), float(east), float(north)


def _to_tile_crs(geoms: list[shapely.Geometry], epsg: int) -> list[shapely.Geometry]:
    """Reproject lon/lat geometries into the tile CRS."""
    to_utm = Transformer.from_crs(4326, epsg, always_xy=True)
    return [shapely.transform(g, lambda xy: np.column_stack(to_utm.transform(xy[:, 0], xy[:, 1]))) for g in geoms]


def class_raster(scene: Scene, tile: DemoTile, gsd_m: float) -> np.ndarray:
    """Per-pixel class: 0 grass, 1..N field index + 1, N+1 road, N+2 water (int32)."""
    n = len(scene.fields)
    shape = tile.shape_px(gsd_m)
    geoms = _to_tile_crs([*scene.fields, scene.roads, scene.river], tile.epsg)
    shapes = [(g, i + 1) for i, g in enumerate(geoms[:n])] + [(geoms[n], n + 1), (geoms[n + 1], n + 2)]
    return rasterize(shapes, out_shape=shape, transform=tile_transform(tile, gsd_m), fill=0, dtype="int32")


def reflectance_table(rng: np.random.Generator, scene: Scene, field_jitter: np.ndarray) -> np.ndarray:
    """Reflectance per class and band, shape (N+3, 4): per-field jitter plus a per-date drift."""
    base = np.array([COVER_REFLECTANCE[c] for c in scene.covers])
    drift = 1.0 + rng.uniform(-0.05, 0.05, base.shape)
    fields = base * field_jitter * drift
    return np.vstack([GRASS_REFLECTANCE, fields, ROAD_REFLECTANCE, WATER_REFLECTANCE])


def cloud_opacity(tile: DemoTile, gsd_m: float, rows: slice = slice(None)) -> np.ndarray:
    """Cloud opacity in 0..0.95, a soft disc around CLOUD_CENTER_WGS84 (float32, tile grid;
    only ``rows`` of it, all by default)."""
    to_utm = Transformer.from_crs(4326, tile.epsg, always_xy=True)
    cx, cy = to_utm.transform(*CLOUD_CENTER_WGS84)
    n = tile.shape_px(gsd_m)[0]
    centers = (np.arange(n) + 0.5) * gsd_m
    dx = tile.x0_m + centers - cx
    dy = tile.y0_m - centers[rows] - cy
    dist_m = np.hypot(dx[None, :], dy[:, None])
    return np.clip(1.3 * (1.0 - dist_m / (1.4 * CLOUD_RADIUS_M)), 0.0, 0.95).astype("float32")


def band_dn(refl: np.ndarray, noise: np.ndarray, opacity: np.ndarray | None, band_index: int) -> np.ndarray:
    """Reflectance (+ cloud, + noise) to uint16 DN with the baseline-04.00 offset; never 0."""
    if opacity is not None:
        refl = refl * (1.0 - opacity) + CLOUD_REFLECTANCE[band_index] * opacity
    dn = np.rint(refl * 1e4 + noise) + BOA_ADD_OFFSET_DN
    return np.clip(dn, 1, 65535).astype("uint16")


def scl_raster(classes_20m: np.ndarray, scene: Scene, opacity_20m: np.ndarray | None) -> np.ndarray:
    """Scene classification at 20 m: vegetation, bare fields/roads, water, cloud classes."""
    n = len(scene.fields)
    bare = np.array([c == "bare" for c in scene.covers])
    lut = np.full(n + 3, SCL_VEGETATION, dtype="uint8")
    lut[1 : n + 1][bare] = SCL_NOT_VEGETATED
    lut[n + 1], lut[n + 2] = SCL_NOT_VEGETATED, SCL_WATER
    scl = lut[classes_20m]
    if opacity_20m is not None:
        scl[opacity_20m > 0.05] = SCL_CIRRUS
        scl[opacity_20m > 0.3] = SCL_CLOUD_MEDIUM
        scl[opacity_20m > 0.7] = SCL_CLOUD_HIGH
    return scl


def write_cog(path: Path, data: np.ndarray, tile: DemoTile, gsd_m: float, resampling: str) -> None:
    """Write one band as a tiled, ZSTD-compressed Cloud-Optimized GeoTIFF with overviews."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(
        driver="COG", width=data.shape[1], height=data.shape[0], count=1, dtype=data.dtype.name,
        crs=f"EPSG:{tile.epsg}", transform=tile_transform(tile, gsd_m), nodata=0,
        compress="ZSTD", predictor=2, blocksize=512, overview_resampling=resampling,  # ZSTD level: 9, the default
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)


# ---------------------------------------------------------------- STAC JSON


def item_id(tile: DemoTile, when: datetime, processed: datetime) -> str:
    """A Planetary-Computer-style id: S2A_MSIL2A_<sensing>_R<orbit>_T<tile>_<processing>."""
    return f"S2A_MSIL2A_{when:%Y%m%dT%H%M%S}_R{RELATIVE_ORBIT:03d}_T{tile.tile_id}_{processed:%Y%m%dT%H%M%S}"


def _asset(href: str, band: str, tile: DemoTile) -> dict:
    """A Planetary-Computer-style band asset with eo:bands and proj fields."""
    gsd = SCL_GSD_M if band == "SCL" else GSD_M
    asset = {
        "href": href,
        "type": "image/tiff; application=geotiff; profile=cloud-optimized",
        "roles": ["data"],
        "gsd": gsd,
        "proj:shape": list(tile.shape_px(gsd)),
        "proj:transform": list(tile_transform(tile, gsd))[:6],
    }
    if band == "SCL":
        asset["title"] = "Scene classfication map (SCL)"
        return asset
    common, center, fwhm = BAND_INFO[band]
    asset["title"] = f"Band {int(band[1:])} - {common.capitalize()} - 10m"
    asset["eo:bands"] = [{"name": band, "common_name": common, "center_wavelength": center, "full_width_half_max": fwhm}]
    return asset


def make_item(tile: DemoTile, when: datetime, processed: datetime, baseline: str, hrefs: dict[str, str], cloud_cover: float) -> dict:
    """One STAC item (STAC 1.1, eo/proj/sat/s2 fields as on Planetary Computer)."""
    footprint = tile_footprint_wgs84(tile)
    zone, band_letter, square = tile.tile_id[:2], tile.tile_id[2], tile.tile_id[3:]
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
            "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
            "https://stac-extensions.github.io/sat/v1.0.0/schema.json",
        ],
        "id": item_id(tile, when, processed),
        "collection": COLLECTION_ID,
        "geometry": mapping(footprint),
        "bbox": list(footprint.bounds),
        "properties": {
            "datetime": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "platform": "Sentinel-2A",
            "constellation": "Sentinel 2",
            "instruments": ["msi"],
            "eo:cloud_cover": cloud_cover,
            "proj:epsg": tile.epsg,
            "proj:code": f"EPSG:{tile.epsg}",
            "s2:mgrs_tile": tile.tile_id,
            "mgrs:utm_zone": int(zone),
            "mgrs:latitude_band": band_letter,
            "mgrs:grid_square": square,
            "s2:processing_baseline": baseline,
            "s2:product_type": "S2MSI2A",
            "s2:generation_time": processed.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "sat:relative_orbit": RELATIVE_ORBIT,
            "sat:orbit_state": "descending",
        },
        "links": [{"rel": "collection", "href": f"../collection.json", "type": "application/json"}],
        "assets": {band: _asset(href, band, tile) for band, href in hrefs.items()},
    }


def make_collection(bounds_wgs84: tuple[float, float, float, float]) -> dict:
    """The ``sentinel-2-l2a`` collection JSON."""
    return {
        "type": "Collection",
        "stac_version": "1.1.0",
        "id": COLLECTION_ID,
        "title": "Sentinel-2 Level-2A (raysam synthetic demo)",
        "description": "Synthetic Sentinel-2 L2A scenes with known fields, for offline runs and tests.",
        "license": "CC-BY-4.0",
        "extent": {
            "spatial": {"bbox": [list(bounds_wgs84)]},
            "temporal": {"interval": [[DATES[0].strftime("%Y-%m-%dT%H:%M:%SZ"), DATES[-1].strftime("%Y-%m-%dT%H:%M:%SZ")]]},
        },
        "links": [],
    }


# ---------------------------------------------------------------- writing


def write_fields(path: Path, fields: list[Polygon]) -> None:
    """Write the fields as GeoParquet 1.1 (WKB geometry, EPSG:4326) with pyarrow only (no geopandas)."""
    crs = CRS.from_epsg(4326).to_json_dict()  # GeoParquet stores lon/lat (x, y) whatever the axis order
    bbox = list(shapely.union_all(fields).bounds)
    geo = {"version": "1.1.0", "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": crs, "bbox": bbox}}}
    table = pa.table({"id": pa.array(range(1, len(fields) + 1), pa.int64()), "geometry": pa.array(shapely.to_wkb(fields), pa.binary())})
    table = table.replace_schema_metadata({b"geo": json.dumps(geo).encode()})
    pq.write_table(table, path)


def _render_tile_date(root: Path, scene: Scene, tile: DemoTile, date_index: int, table: np.ndarray, seed: int,
                      classes: tuple[np.ndarray, np.ndarray]) -> tuple[dict[str, Path], float]:
    """Write the five COGs of one tile at one date (classes at 10 m and 20 m given); returns
    band -> path and eo:cloud_cover."""
    rng = np.random.default_rng([seed, date_index, int(tile.tile_id[:2])])
    cogs = root / "cogs" / tile.tile_id / f"{DATES[date_index]:%Y%m%d}"
    cloudy = date_index == CLOUDY_DATE_INDEX
    paths = {}
    for b, band in enumerate(REFLECTANCE_BANDS):
        paths[band] = cogs / f"{band}.tif"
        write_cog(paths[band], _band_dn_in_strips(rng, classes[0], table, b, tile, cloudy), tile, GSD_M, "average")
    scl = scl_raster(classes[1], scene, cloud_opacity(tile, SCL_GSD_M) if cloudy else None)
    paths["SCL"] = cogs / "SCL.tif"
    write_cog(paths["SCL"], scl, tile, SCL_GSD_M, "nearest")
    cloud_cover = float(np.isin(scl, (SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH, SCL_CIRRUS)).mean() * 100.0)
    return paths, round(cloud_cover, 4)


def _band_dn_in_strips(rng: np.random.Generator, classes_10m: np.ndarray, table: np.ndarray, band_index: int,
                       tile: DemoTile, cloudy: bool) -> np.ndarray:
    """One reflectance band as uint16 DN (:func:`band_dn`), rendered STRIP_ROWS rows at a time so
    that no full-tile float64 array exists. The 20 m noise is drawn from ``rng`` in row order, so
    the result equals one full-tile draw, byte for byte."""
    rows, cols = classes_10m.shape
    dn = np.empty((rows, cols), np.uint16)
    for r0 in range(0, rows, STRIP_ROWS):
        r1 = min(r0 + STRIP_ROWS, rows)
        noise = rng.normal(0.0, 4.0, ((r1 - r0) // 2, cols // 2)).repeat(2, 0).repeat(2, 1)  # 20 m texture
        opacity = cloud_opacity(tile, GSD_M, slice(r0, r1)) if cloudy else None
        dn[r0:r1] = band_dn(table[classes_10m[r0:r1], band_index], noise, opacity, band_index)
    return dn


def _href(path: Path, root: Path, base_url: str | None) -> str:
    """Absolute file path, or ``base_url`` + the path relative to ``root``."""
    return f"{base_url.rstrip('/')}/{path.relative_to(root).as_posix()}" if base_url else str(path.resolve())


def _write_items(root: Path, items: list[dict]) -> None:
    """Write one JSON file per item and ``items.ndjson``."""
    (root / "items").mkdir(parents=True, exist_ok=True)
    for item in items:
        (root / "items" / f"{item['id']}.json").write_text(json.dumps(item, indent=1))
    (root / "items.ndjson").write_text("".join(json.dumps(item) + "\n" for item in items))


def _layout(tiles: tuple[DemoTile, ...], aoi_wgs84: tuple[float, float, float, float]) -> dict | None:
    """What the marker records of the tiles and AOI: nothing for the demo's own (so the demo
    catalog's marker keeps its bytes), else every tile's fields and the AOI."""
    if tiles == TILES and tuple(aoi_wgs84) == DEMO_AOI_WGS84:
        return None
    return {"tiles": [asdict(t) for t in tiles], "aoi_wgs84": list(aoi_wgs84)}


def _load_info(marker: Path) -> CatalogInfo | None:
    """The CatalogInfo of a complete catalog, or None."""
    if not marker.exists():
        return None
    raw = json.loads(marker.read_text())
    if raw.pop("format", None) != FORMAT:
        return None
    raw.pop("base_url", None)
    raw.pop("layout", None)
    paths = {k: Path(raw[k]) for k in ("root", "collection_path", "items_dir", "items_ndjson", "fields_path")}
    tuples = {k: tuple(raw[k]) for k in ("aoi_wgs84", "time_range", "dates", "item_ids", "boundary_field_ids")}
    return CatalogInfo(**{**raw, **paths, **tuples})


def _dir_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def make_demo_catalog(root: Path, seed: int = 0, base_url: str | None = None, overwrite: bool = False,
                      tiles: tuple[DemoTile, ...] = TILES,
                      aoi_wgs84: tuple[float, float, float, float] = DEMO_AOI_WGS84) -> CatalogInfo:
    """Write the synthetic Sentinel-2 L2A catalog under ``root`` (deterministic for a seed).

    The defaults write the demo catalog (two 2048 px tiles). Other ``tiles`` give larger
    catalogs, e.g. one full-size 10,980 px tile for ``scripts/bench_scale.py``; bands are
    rendered in strips, so the generator's peak RSS stays about 1.6 GB at that size.

    Args:
        root: output directory; a complete catalog with the same seed, base URL, tiles and AOI
            is reused (any other catalog there is replaced).
        seed: seeds the field layout, land cover, reflectances and noise.
        base_url: if given, asset hrefs are ``base_url/cogs/...`` instead of absolute paths.
        overwrite: regenerate even if a complete catalog is there.
        tiles: the tiles, each rendered at both dates (the first one also gets the duplicate
            item of an older processing baseline).
        aoi_wgs84: the region recorded in the returned info (west, south, east, north).

    Returns:
        What was written, with the known answers (AOI, dates, duplicate, cloudy date, fields).
    """
    root = Path(root).resolve()
    marker = root / "demo_catalog.json"
    layout = _layout(tuple(tiles), aoi_wgs84)
    info = None if overwrite else _load_info(marker)
    if info is not None and info.seed == seed:
        raw = json.loads(marker.read_text())
        if raw.get("base_url") == base_url and raw.get("layout") == layout:
            return info
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    info = _generate(root, seed, base_url, tuple(tiles), tuple(aoi_wgs84))
    extra = {} if layout is None else {"layout": layout}
    marker.write_text(json.dumps({"format": FORMAT, "base_url": base_url, **extra, **asdict(info)}, default=str, indent=1))
    return info


def _generate(root: Path, seed: int, base_url: str | None, tiles: tuple[DemoTile, ...],
              aoi_wgs84: tuple[float, float, float, float]) -> CatalogInfo:
    """Render the scene into every tile and date, write COGs, items, collection and fields."""
    footprints = [tile_footprint_wgs84(t) for t in tiles]
    bounds = shapely.union_all(footprints).bounds
    rng = np.random.default_rng(seed)
    scene = make_scene(rng, bounds)
    field_jitter = rng.uniform(0.85, 1.15, (len(scene.fields), 1))
    items, cloud = [], {}
    classes = {t.tile_id: (class_raster(scene, t, GSD_M), class_raster(scene, t, SCL_GSD_M)) for t in tiles}
    for d, when in enumerate(DATES):
        table = reflectance_table(np.random.default_rng([seed, d]), scene, field_jitter)
        processed = when.replace(hour=23, minute=12, second=5, microsecond=0)
        for tile in tiles:
            paths, cover = _render_tile_date(root, scene, tile, d, table, seed, classes[tile.tile_id])
            hrefs = {band: _href(p, root, base_url) for band, p in paths.items()}
            items.append(make_item(tile, when, processed, BASELINE, hrefs, cover))
            cloud[items[-1]["id"]] = cover
    dup_src = items[0]
    dup = make_item(tiles[0], DATES[0], DATES[0].replace(hour=20, minute=1, second=0, microsecond=0), OLD_BASELINE,
                    {k: a["href"] for k, a in dup_src["assets"].items()}, dup_src["properties"]["eo:cloud_cover"])
    items.append(dup)
    cloud[dup["id"]] = dup["properties"]["eo:cloud_cover"]
    _write_items(root, items)
    (root / "collection.json").write_text(json.dumps(make_collection(bounds), indent=1))
    write_fields(root / "fields.parquet", scene.fields)
    boundary = tuple(i + 1 for i, f in enumerate(scene.fields) if f.bounds[0] < -90.0 < f.bounds[2])
    return CatalogInfo(
        root=root, collection_path=root / "collection.json", items_dir=root / "items",
        items_ndjson=root / "items.ndjson", fields_path=root / "fields.parquet",
        aoi_wgs84=aoi_wgs84, time_range=DEMO_TIME_RANGE, tiles={t.tile_id: t.epsg for t in tiles},
        dates=tuple(f"{d:%Y-%m-%d}" for d in DATES), item_ids=tuple(i["id"] for i in items),
        duplicate_item_id=dup["id"], cloudy_date=f"{DATES[CLOUDY_DATE_INDEX]:%Y-%m-%d}", cloud_cover=cloud,
        n_fields=len(scene.fields), boundary_field_ids=boundary, size_bytes=_dir_size(root), seed=seed,
    )


# ---------------------------------------------------------------- serving


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rustac() -> str:
    """The ``rustac`` CLI next to this interpreter, or on PATH."""
    here = Path(sys.executable).parent / "rustac"
    found = str(here) if here.exists() else shutil.which("rustac")
    if not found:
        raise ConfigError("the rustac CLI is not installed: pip install rustac (it is in raysam's test extra)")
    return found


def _serve_hrefs(source: Path) -> list[str]:
    """What to load: a catalog root or items dir (collection + items), or one ndjson/json file."""
    source = Path(source).resolve()
    if source.is_file():
        collection = source.parent / "collection.json"
        return ([str(collection)] if collection.exists() and collection != source else []) + [str(source)]
    ndjson = source / "items.ndjson"
    if ndjson.exists():
        return _serve_hrefs(ndjson)
    collection = [source.parent / "collection.json"] if (source.parent / "collection.json").exists() else []
    return [str(p) for p in collection + sorted(source.glob("*.json"))]


def _wait_until_up(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200; raise DataError if the server dies or never answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace").strip().splitlines()
            raise DataError(f"rustac serve exited with code {proc.returncode}: {err[-1] if err else 'no output'}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise DataError(f"rustac serve did not answer at {url} within {timeout_s:.0f} s: check the port is free")


def rebase_catalog(info: CatalogInfo, base_url: str, dest: Path) -> Path:
    """Copy a local catalog's collection and items to ``dest`` with asset hrefs under ``base_url``.

    The COGs stay where they are: serve ``info.root`` at ``base_url`` (any HTTP server with
    range requests) and ``dest`` with :func:`serve_catalog`; an asset at ``info.root/cogs/x.tif``
    gets the href ``base_url/cogs/x.tif``.

    Args:
        info: a catalog written with local hrefs (``base_url=None``).
        base_url: ``http://host:port[/prefix]`` that serves ``info.root``.
        dest: directory for ``collection.json`` and ``items.ndjson`` (created).

    Returns:
        ``dest/items.ndjson``, ready for :func:`serve_catalog`.

    Raises:
        DataError: an asset href does not lie under ``info.root``.
    """
    root = Path(info.root).resolve()
    lines = []
    for line in Path(info.items_ndjson).read_text().splitlines():
        item = json.loads(line)
        for asset in item.get("assets", {}).values():
            path = Path(asset["href"])
            if not path.is_absolute() or not path.resolve().is_relative_to(root):
                raise DataError(f"asset href {asset['href']} of item {item['id']} is not a file under {root}: "
                                "rebase a catalog built with local hrefs (base_url=None)")
            asset["href"] = _href(path.resolve(), root, base_url)
        lines.append(json.dumps(item) + "\n")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(info.collection_path, dest / "collection.json")
    (dest / "items.ndjson").write_text("".join(lines))
    return dest / "items.ndjson"


def serve_catalog(items_dir_or_ndjson: Path, port: int, timeout_s: float = 30.0) -> subprocess.Popen:
    """Serve a catalog as a STAC API with ``rustac serve`` on 127.0.0.1 (memory backend).

    Args:
        items_dir_or_ndjson: a catalog root (uses ``items.ndjson``), an items directory or an
            ndjson/JSON item file; a sibling ``collection.json`` is loaded too.
        port: TCP port; the API root is ``http://127.0.0.1:<port>/``.
        timeout_s: how long to wait for the root to answer.

    Returns:
        The server process; stop it with ``proc.terminate(); proc.wait()``.
    """
    addr = f"127.0.0.1:{port}"
    cmd = [_rustac(), "serve", "--addr", addr, "--create-collections", *_serve_hrefs(items_dir_or_ndjson)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_until_up(proc, f"http://{addr}/", timeout_s)
    return proc
