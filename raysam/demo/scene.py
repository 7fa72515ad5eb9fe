"""The demo's synthetic land cover and its rendering into Sentinel-2 L2A rasters, in memory.

Owns the scene (:func:`make_scene`: fields on a jittered grid, roads and a river, defined once
in lon/lat), the demo tile's geometry (:class:`DemoTile`, its transform and footprints), and
the per-pixel synthesis for one tile and date: land-cover classes (:func:`class_raster`),
reflectances (:func:`reflectance_table`), the cloud patch (:func:`cloud_opacity`), DNs with the
baseline-04.00 offset (:func:`band_dn`, in strips: :func:`band_dn_in_strips`) and the scene
classification (:func:`scl_raster`). Pure numpy, shapely and pyproj: no files are written
here (:mod:`raysam.demo.catalog` writes them), and each output is deterministic for its
random generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from affine import Affine
from pyproj import Transformer
from rasterio.features import rasterize
from shapely.geometry import LineString, Polygon, box

from raysam.errors import ConfigError

TILE_PX = 2048  # 10 m pixels per tile side (20.48 km; real MGRS tiles are 10980 px)
GSD_M = 10.0
STRIP_ROWS = 512  # 10 m rows rendered at once (even: the noise is drawn at 20 m); bounds the generator's memory
SCL_GSD_M = 20.0
BOA_ADD_OFFSET_DN = 1000  # baked into DNs for processing baseline >= 04.00
CLOUD_CENTER_WGS84 = (-89.93, 41.86)  # inside the AOI, in tile 16TBM only
CLOUD_RADIUS_M = 1800.0

REFLECTANCE_BANDS = ("B02", "B03", "B04", "B08")
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


def band_dn_in_strips(rng: np.random.Generator, classes_10m: np.ndarray, table: np.ndarray, band_index: int,
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

