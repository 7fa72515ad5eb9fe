"""A synthetic Sentinel-2 L2A catalog with known ground truth, written to disk.

:func:`make_demo_catalog` writes two small MGRS-style tiles in adjacent UTM zones (15 and 16,
whose boundary is the meridian 90°W, near Clinton, Iowa) at two dates, one COG per band per
item, STAC item JSON in Planetary Computer layout, a ``sentinel-2-l2a`` collection and the
ground-truth fields (``fields.parquet``). This module owns the catalog's layout (tiles, dates,
the reprocessed duplicate, the cloudy date), its STAC JSON and the writing; the land cover
and its rasters come from :mod:`raysam.demo.scene` (fields defined once in lon/lat and
rendered into each tile's own CRS, so the same field has the same shape in both zones), and
serving it as a STAC API is :mod:`raysam.demo.serve`'s job. Other tiles, up to full-size
10,980 px MGRS tiles, make larger catalogs of the same kind (``scripts/bench_scale.py``);
bands are rendered in strips, so memory stays bounded.

Layout under ``root``::

    collection.json                 STAC collection "sentinel-2-l2a"
    items/<item id>.json            one STAC item per file
    items.ndjson                    the same items, one per line (what rustac serves)
    cogs/<tile>/<yyyymmdd>/<band>.tif   B02, B03, B04, B08 (10 m), SCL (20 m)
    fields.parquet                  GeoParquet, EPSG:4326, columns id, geometry
    demo_catalog.json               CatalogInfo, written last (completion marker)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
import shapely
from pyproj import CRS
from shapely.geometry import Polygon, mapping

from raysam.demo.scene import (GSD_M, REFLECTANCE_BANDS, SCL_CIRRUS, SCL_CLOUD_HIGH, SCL_CLOUD_MEDIUM, SCL_GSD_M,
                               DemoTile, Scene, band_dn_in_strips, class_raster, cloud_opacity, make_scene,
                               reflectance_table, scl_raster, tile_footprint_wgs84, tile_transform)

FORMAT = "raysam-demo-catalog/1"
DEMO_ROOT = Path("demo_data/catalog")
COLLECTION_ID = "sentinel-2-l2a"
# West, south, east, north; crosses the zone 15/16 boundary (lon -90) and lies inside the
# union of the two tiles, so it needs both of them (about 23 km x 11 km: several 1024 chips).
DEMO_AOI_WGS84 = (-90.14, 41.79, -89.86, 41.89)
DEMO_TIME_RANGE = ("2024-06-28", "2024-07-14")  # inclusive UTC dates holding both dates

BASELINE = "05.10"
OLD_BASELINE = "05.00"  # the reprocessed duplicate that selection must drop
RELATIVE_ORBIT = 69
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
BAND_INFO = {  # name, common name, centre wavelength (um), FWHM (um): Sentinel-2A MSI
    "B02": ("blue", 0.49, 0.098),
    "B03": ("green", 0.56, 0.045),
    "B04": ("red", 0.665, 0.038),
    "B08": ("nir", 0.842, 0.145),
}


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
        write_cog(paths[band], band_dn_in_strips(rng, classes[0], table, b, tile, cloudy), tile, GSD_M, "average")
    scl = scl_raster(classes[1], scene, cloud_opacity(tile, SCL_GSD_M) if cloudy else None)
    paths["SCL"] = cogs / "SCL.tif"
    write_cog(paths["SCL"], scl, tile, SCL_GSD_M, "nearest")
    cloud_cover = float(np.isin(scl, (SCL_CLOUD_MEDIUM, SCL_CLOUD_HIGH, SCL_CIRRUS)).mean() * 100.0)
    return paths, round(cloud_cover, 4)


def asset_href(path: Path, root: Path, base_url: str | None) -> str:
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
            hrefs = {band: asset_href(p, root, base_url) for band, p in paths.items()}
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
