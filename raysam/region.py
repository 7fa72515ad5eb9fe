"""Regions of interest: an AOI geometry in EPSG:4326 plus a UTC time range.

A :class:`RegionSpec` is what a user writes (``conf/region/*.yaml``); :func:`load_region`
validates it and resolves the geometry into a shapely (Multi)Polygon in lon/lat. Geometry can
be given as a bbox (``"minx,miny,maxx,maxy"`` or a list of four numbers, lon/lat), a WKT string
(lon/lat), or a path to a GeoJSON, GeoParquet or other OGR-readable file (reprojected to
EPSG:4326). ``pkg://raysam/data/iowa.geojson`` names a file shipped inside an installed package,
so configs work from any working directory.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyproj
import shapely
from shapely.geometry import MultiPolygon, Polygon, shape

from raysam.errors import ConfigError, DataError
from raysam.selection import DEFAULT_MIN_TILE_COVER

PKG_SCHEME = "pkg://"
WGS84 = "EPSG:4326"
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
MAX_NAME_CHARS = 128  # a date group's directory and lock add ~40 characters; file names stop at 255
# Bounds on one region, checked before any search: one target grid (the UTM zone of the AOI
# centroid) serves the whole AOI, and its scale error grows off the zone's centre (about 3.5 %
# at 15 degrees of longitude), so wider regions must be split. The area cap is above Texas
# (696,000 km², the largest contiguous US state): about 40,000 chips per date at overlap 0.5.
MAX_AOI_LON_SPAN_DEG = 30.0
MAX_AOI_KM2 = 1_000_000.0
# Any WKT geometry (a point or a line is parsed too, to be refused for having no area).
_WKT_RE = re.compile(r"^\s*(MULTI)?(POINT|LINESTRING|POLYGON)\b|^\s*GEOMETRYCOLLECTION\b", re.IGNORECASE)
_PROJECTED_HINT = ("these look like projected coordinates (metres?), not degrees: give lon/lat in "
                   "EPSG:4326, or a GeoJSON/GeoParquet file that declares its CRS")
_GEOJSON_SUFFIXES = (".geojson", ".json")
_PARQUET_SUFFIXES = (".parquet", ".geoparquet")
# RFC 7946: a GeoJSON without a "crs" member is lon/lat WGS84; these names all mean that.
_WGS84_NAMES = {"EPSG:4326", "OGC:CRS84", "OGC:1.3:CRS84", "URN:OGC:DEF:CRS:OGC:1.3:CRS84",
                "URN:OGC:DEF:CRS:EPSG::4326"}


@dataclass(frozen=True)
class RegionSpec:
    """A region as configured; its name, time range and limits are checked on construction.

    Attributes:
        name: a safe path component (letters, digits, ``-``, ``_``, ``.``); names outputs.
        geometry: bbox string ``"minx,miny,maxx,maxy"`` or list of 4 floats (lon/lat), a WKT
            (Multi)Polygon (lon/lat), or a path (``pkg://package/rel/path`` allowed) to a
            GeoJSON / GeoParquet / OGR-readable file.
        time_range: (start, end) ISO dates or datetimes; a date-only end includes its whole day.
        max_cloud_cover: keep items with ``eo:cloud_cover`` <= this (percent 0-100); None = all.
        min_tile_cover: fraction (0, 1] of the AOI that a date's tiles must cover together
            for the date to be used (FarmVibes' ``min_tile_cover``).
        max_tiles_per_date: at most this many tiles per date (None = no limit).
        utm_epsg: force the target grid's CRS (a projected CRS in metres); None = the UTM
            zone of the AOI centroid.
    """

    name: str
    geometry: str | list[float] | tuple[float, ...]
    time_range: tuple[Any, Any]
    max_cloud_cover: float | None = None
    min_tile_cover: float = DEFAULT_MIN_TILE_COVER
    max_tiles_per_date: int | None = None
    utm_epsg: int | None = None

    def __post_init__(self) -> None:
        validate_name(self.name)
        parse_time_range(self.time_range, self.name)
        _validate_limits(self)


@dataclass(frozen=True)
class Region:
    """A validated region.

    Attributes:
        name: safe path component.
        aoi_wgs84: valid, non-empty Polygon or MultiPolygon in EPSG:4326 (x = lon, y = lat).
        start_utc: first instant (timezone-aware UTC).
        end_utc: last instant, inclusive (a date-only end becomes 23:59:59.999999 that day).
        max_cloud_cover, min_tile_cover, max_tiles_per_date, utm_epsg: as in RegionSpec.
    """

    name: str
    aoi_wgs84: Polygon | MultiPolygon
    start_utc: datetime
    end_utc: datetime
    max_cloud_cover: float | None
    min_tile_cover: float
    max_tiles_per_date: int | None
    utm_epsg: int | None

    @property
    def stac_datetime(self) -> str:
        """The time range as a STAC API ``datetime`` interval (``start/end``, RFC 3339 Z)."""
        fmt = "%Y-%m-%dT%H:%M:%S.%fZ"
        return f"{self.start_utc.strftime(fmt)}/{self.end_utc.strftime(fmt)}"


def load_region(spec: RegionSpec) -> Region:
    """Resolve a region spec's geometry and time range (the spec checked the rest).

    Args:
        spec: the configured region.

    Returns:
        The region with its AOI in EPSG:4326 and its time range in UTC.

    Raises:
        ConfigError: a bad bbox or WKT, or an AOI too large for one target grid.
        DataError: a geometry file that is missing, unreadable, has no CRS or bad geometry.
    """
    name = spec.name
    start_utc, end_utc = parse_time_range(spec.time_range, name)
    aoi = validate_aoi(resolve_geometry(spec.geometry, name), name)
    return Region(name, aoi, start_utc, end_utc, spec.max_cloud_cover, spec.min_tile_cover,
                  spec.max_tiles_per_date, spec.utm_epsg)


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe path component, else raise ConfigError.

    The name becomes a directory under the output root and the prefix of every date-group
    directory, so it must not be able to leave the root (``..``, slashes, absolute paths, NUL),
    hide itself (a leading dot), start like an option (a leading ``-``) or overflow a file name.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise _unsafe_name(repr(name), "this one", "use only letters, digits, '-', '_' and '.' "
                           "(no '..', no slashes)")
    if not name[0].isalnum():
        raise _unsafe_name(repr(name), f"one starting with {name[0]!r}", "start it with a letter or digit")
    if len(name) > MAX_NAME_CHARS:
        raise _unsafe_name(f"{name[:20]!r}...", f"one of {len(name)} characters",
                           f"use at most {MAX_NAME_CHARS}")
    return name


def _unsafe_name(shown: str, which: str, fix: str) -> ConfigError:
    """The one-line error for an unsafe region name."""
    return ConfigError(f"region.name={shown} is not a safe name: region names become directories, "
                       f"and {which} is not a safe path component; {fix}")


def parse_time_range(time_range: Any, name: str = "region") -> tuple[datetime, datetime]:
    """Parse ``(start, end)`` into UTC datetimes; a date-only end includes its whole day."""
    if not isinstance(time_range, (list, tuple)) or len(time_range) != 2:
        raise ConfigError(f"region {name}: time_range must be [start, end] ISO dates, "
                          f"got {time_range!r}; e.g. ['2024-06-01', '2024-08-31']")
    start = _parse_instant(time_range[0], name, end_of_day=False)
    end = _parse_instant(time_range[1], name, end_of_day=True)
    if end < start:
        raise ConfigError(f"region {name}: time_range end {time_range[1]} is before start "
                          f"{time_range[0]}; swap them")
    if start > datetime.now(UTC):
        raise ConfigError(f"region {name}: time_range starts {time_range[0]}, in the future, so "
                          "no imagery exists yet; give a start date in the past")
    return start, end


def _parse_instant(value: Any, name: str, end_of_day: bool) -> datetime:
    """Parse one ISO date/datetime (str, date or datetime) into an aware UTC datetime."""
    if isinstance(value, datetime):
        parsed: datetime | date = value
    elif isinstance(value, date):
        parsed = value
    else:
        text = str(value).strip()
        try:
            parsed = (date.fromisoformat(text) if len(text) == 10
                      else datetime.fromisoformat(text.replace("Z", "+00:00")))
        except ValueError:
            raise ConfigError(f"region {name}: cannot parse date {value!r}; use ISO 8601 "
                              "like 2024-06-01 or 2024-06-01T00:00:00Z") from None
    if not isinstance(parsed, datetime):
        day_start = datetime.combine(parsed, time(0), tzinfo=UTC)
        return day_start + timedelta(days=1, microseconds=-1) if end_of_day else day_start
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _validate_limits(spec: RegionSpec) -> None:
    """Check the numeric selection parameters of a spec."""
    cc = spec.max_cloud_cover
    if cc is not None and not 0 <= float(cc) <= 100:
        raise ConfigError(f"region {spec.name}: max_cloud_cover {cc} is not a percentage; "
                          "use 0-100 or null")
    if not 0 < float(spec.min_tile_cover) <= 1:
        raise ConfigError(f"region {spec.name}: min_tile_cover {spec.min_tile_cover} must be "
                          "in (0, 1]")
    mt = spec.max_tiles_per_date
    if mt is not None and (int(mt) != mt or mt < 1):
        raise ConfigError(f"region {spec.name}: max_tiles_per_date {mt} must be a positive "
                          "integer or null")
    if spec.utm_epsg is not None:
        _check_metric_crs(spec.utm_epsg, spec.name)


def _check_metric_crs(epsg: int, name: str) -> None:
    """Raise ConfigError unless ``epsg`` is a projected CRS in metres."""
    try:
        crs = pyproj.CRS.from_epsg(int(epsg))
    except (pyproj.exceptions.CRSError, ValueError, TypeError):
        raise ConfigError(f"region {name}: utm_epsg {epsg!r} is not a known EPSG code; use "
                          "e.g. 32615 (UTM 15N) or null") from None
    units = {axis.unit_name for axis in crs.axis_info}
    if not crs.is_projected or units != {"metre"}:
        raise ConfigError(f"region {name}: utm_epsg {epsg} is not a projected CRS in metres; "
                          "use a UTM code like 32615 or null")


def resolve_geometry(geometry: Any, name: str = "region") -> shapely.Geometry:
    """Turn a bbox, WKT or file reference into a shapely geometry in EPSG:4326."""
    if isinstance(geometry, (list, tuple)):
        return bbox_polygon(geometry, name)
    if not isinstance(geometry, str) or not geometry.strip():
        raise ConfigError(f"region {name}: geometry must be a bbox, WKT or file path, got "
                          f"{geometry!r}")
    text = geometry.strip()
    if _looks_like_bbox(text):
        return bbox_polygon(text.split(","), name)
    if _WKT_RE.match(text):
        try:
            return shapely.from_wkt(text)
        except shapely.errors.GEOSException as err:
            raise ConfigError(f"region {name}: cannot parse WKT geometry ({err}); give a "
                              "lon/lat POLYGON or MULTIPOLYGON") from None
    return read_geometry_file(resolve_path(text), name)


def _looks_like_bbox(text: str) -> bool:
    """True for ``"a,b,c,d"`` with four numbers."""
    parts = text.split(",")
    if len(parts) != 4:
        return False
    try:
        [float(p) for p in parts]
    except ValueError:
        return False
    return True


def bbox_polygon(values: Any, name: str = "region") -> Polygon:
    """Build a lon/lat box from ``(minx, miny, maxx, maxy)``, checking order and range."""
    try:
        minx, miny, maxx, maxy = (float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"region {name}: bbox must be 4 numbers minx,miny,maxx,maxy "
                          f"(lon/lat), got {values!r}") from None
    if not (-180 <= minx <= 180 and -180 <= maxx <= 180 and -90 <= miny <= 90
            and -90 <= maxy <= 90):
        raise ConfigError(f"region {name}: bbox {values!r} is outside lon -180..180 / lat "
                          f"-90..90; {_PROJECTED_HINT}")
    if minx - maxx > 180 and miny < maxy:  # RFC 7946 5.2: minx > maxx means crossing lon 180
        raise ConfigError(f"region {name}: bbox {values!r} crosses the antimeridian (minx > "
                          "maxx), which one UTM grid cannot hold; split it into two regions at "
                          "lon 180")
    if not (minx < maxx and miny < maxy):
        raise ConfigError(f"region {name}: bbox {values!r} is empty or reversed; give "
                          "minx,miny,maxx,maxy with min < max")
    return shapely.box(minx, miny, maxx, maxy)


def resolve_path(ref: str) -> Path:
    """Resolve ``pkg://package/rel/path`` to a file inside an installed package, else a Path."""
    if not ref.startswith(PKG_SCHEME):
        return Path(ref).expanduser()
    package, _, rel = ref[len(PKG_SCHEME):].partition("/")
    try:
        return Path(str(resources.files(package).joinpath(rel)))
    except (ModuleNotFoundError, TypeError):
        raise DataError(f"cannot resolve {ref}: package {package!r} is not importable; "
                        "install it or use a plain file path") from None


def read_geometry_file(path: Path, name: str = "region") -> shapely.Geometry:
    """Read all geometries of a vector file, union them and reproject them to EPSG:4326."""
    if path.is_dir():
        raise DataError(f"region {name}: geometry {path} is a directory, not a file; give a "
                        "GeoJSON/GeoParquet file, a WKT polygon or a bbox")
    if not path.is_file():
        raise DataError(f"region {name}: geometry file {path} does not exist; check the path "
                        "(pkg://raysam/data/... for packaged files)")
    suffix = path.suffix.lower()
    if suffix in _GEOJSON_SUFFIXES:
        geoms, crs = _read_geojson(path, name)
    elif suffix in _PARQUET_SUFFIXES:
        geoms, crs = _read_geoparquet(path, name)
    else:
        geoms, crs = _read_ogr(path, name)
    if not geoms:
        raise DataError(f"region {name}: {path} holds no geometry; give a file with at least "
                        "one polygon")
    return to_wgs84(shapely.union_all(geoms), crs, name)


def _read_geojson(path: Path, name: str) -> tuple[list[shapely.Geometry], pyproj.CRS]:
    """Geometries and CRS of a GeoJSON (RFC 7946 lon/lat unless a legacy ``crs`` member)."""
    try:
        doc = json.loads(path.read_text())
        feats = doc["features"] if doc.get("type") == "FeatureCollection" else [doc]
        geoms = [shape(f["geometry"] if f.get("type") == "Feature" else f)
                 for f in feats if (f.get("geometry") if f.get("type") == "Feature" else f)]
    except (ValueError, KeyError, TypeError, AttributeError, shapely.errors.GEOSException) as err:
        raise DataError(f"region {name}: {path} is not valid GeoJSON ({err}); fix or "
                        "re-export the file") from None
    return geoms, _geojson_crs(doc.get("crs") if isinstance(doc, dict) else None, path, name)


def _geojson_crs(member: Any, path: Path, name: str) -> pyproj.CRS:
    """The CRS a GeoJSON's legacy ``crs`` member names (none: lon/lat, RFC 7946).

    Named (``{"type": "name", "properties": {"name": "EPSG:32615"}}``), EPSG
    (``{"type": "EPSG", "properties": {"code": 32615}}``, GeoJSON 2008) and plain strings are
    read; a linked CRS or anything else is refused in one line.
    """
    if member is None or member == {}:
        return pyproj.CRS.from_user_input("OGC:CRS84")
    props = member.get("properties") if isinstance(member, dict) else None
    kind = str(member.get("type", "")).lower() if isinstance(member, dict) else ""
    if isinstance(member, str):
        value = member
    elif kind == "name" and isinstance(props, dict) and isinstance(props.get("name"), str):
        value = props["name"]
    elif kind == "epsg" and isinstance(props, dict) and isinstance(props.get("code"), int | str):
        value = f"EPSG:{props['code']}"
    else:
        raise DataError(f"region {name}: {path} has a 'crs' member raysam cannot read ({json.dumps(member)[:80]}); "
                        "re-export it as RFC 7946 GeoJSON (lon/lat, no crs member) or as GeoParquet")
    if value.upper() in _WGS84_NAMES:
        return pyproj.CRS.from_user_input("OGC:CRS84")
    return _parse_crs(value, path, name)


def _read_geoparquet(path: Path, name: str) -> tuple[list[shapely.Geometry], pyproj.CRS]:
    """Geometries and CRS of a GeoParquet file's primary geometry column.

    Per GeoParquet 1.x, a column whose metadata lacks ``crs`` is OGC:CRS84; ``crs: null``
    means an unknown CRS, which is refused, as is a Parquet file without ``geo`` metadata.
    """
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
        geo = json.loads(meta[b"geo"]) if b"geo" in meta else None
        if geo is None:
            raise DataError(f"region {name}: {path} has no GeoParquet 'geo' metadata, so its "
                            "CRS is unknown; write it with geopandas.to_parquet or GDAL")
        column = geo["primary_column"]
        col_meta = geo["columns"][column]
        wkb = pq.read_table(path, columns=[column]).column(column).to_pylist()
        geoms = [shapely.from_wkb(b) for b in wkb if b is not None]
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - pyarrow raises many types for a corrupt file
        raise DataError(f"region {name}: cannot read GeoParquet {path} ({err}); fix or "
                        "re-export the file") from None
    if "crs" in col_meta and col_meta["crs"] is None:
        raise DataError(f"region {name}: {path} declares no CRS (crs: null); set one, e.g. "
                        "gdf.set_crs(4326).to_parquet(...)")
    crs_json = col_meta.get("crs", "OGC:CRS84")
    crs = _parse_crs(json.dumps(crs_json) if isinstance(crs_json, dict) else crs_json, path, name)
    return geoms, crs


def _read_ogr(path: Path, name: str) -> tuple[list[shapely.Geometry], pyproj.CRS]:
    """Geometries and CRS of any OGR-readable file (shapefile, GeoPackage...) via pyogrio."""
    try:
        from pyogrio.raw import read as ogr_read
    except ImportError:
        raise DataError(f"region {name}: reading {path.suffix} files needs pyogrio; pip install "
                        "pyogrio, or convert the file to GeoJSON") from None
    try:
        meta, _, wkb, _ = ogr_read(path, read_geometry=True, columns=[])
        geoms = [shapely.from_wkb(b) for b in wkb if b is not None]
    except Exception as err:  # noqa: BLE001 - GDAL errors come in many types
        raise DataError(f"region {name}: cannot read {path} ({err}); check the file") from None
    if not meta.get("crs"):
        raise DataError(f"region {name}: {path} has no CRS (.prj missing?); define one, e.g. "
                        "ogr2ogr -a_srs EPSG:4326")
    return geoms, _parse_crs(meta["crs"], path, name)


def _parse_crs(value: str, path: Path, name: str) -> pyproj.CRS:
    """Parse a CRS string from a file, naming the file on failure."""
    try:
        return pyproj.CRS.from_user_input(value)
    except (pyproj.exceptions.CRSError, TypeError, ValueError):
        raise DataError(f"region {name}: {path} has an unrecognised CRS {str(value)[:80]!r}; re-export "
                        "it in EPSG:4326") from None


def to_wgs84(geom: shapely.Geometry, crs: pyproj.CRS, name: str = "region") -> shapely.Geometry:
    """Reproject a geometry from ``crs`` to lon/lat EPSG:4326 (x = lon).

    Raises:
        DataError: ``crs`` cannot be transformed to lon/lat (an engineering or geocentric CRS).
    """
    target = pyproj.CRS.from_user_input("OGC:CRS84")
    if crs.equals(target) or crs.equals(pyproj.CRS.from_epsg(4326), ignore_axis_order=True):
        return geom
    try:
        transformer = pyproj.Transformer.from_crs(crs, target, always_xy=True)
        return shapely.transform(
            geom, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1], errcheck=True)))
    except (pyproj.exceptions.ProjError, pyproj.exceptions.CRSError) as err:
        raise DataError(f"region {name}: the AOI's CRS ({crs.name}) cannot be transformed to lon/lat "
                        f"({str(err).splitlines()[0][:120]}); re-export the file in EPSG:4326") from None


def validate_aoi(geom: shapely.Geometry, name: str = "region") -> Polygon | MultiPolygon:
    """Check an AOI is a valid, non-empty (Multi)Polygon within lon/lat range."""
    if geom is None or geom.is_empty:
        raise DataError(f"region {name}: the AOI geometry is empty; give a polygon with area")
    if geom.geom_type == "GeometryCollection":
        geom = shapely.union_all([g for g in geom.geoms if g.geom_type.endswith("Polygon")])
    if geom.geom_type not in ("Polygon", "MultiPolygon"):
        raise ConfigError(f"region {name}: the AOI is a {geom.geom_type}, not a polygon: an AOI needs an "
                          "area; give a Polygon or MultiPolygon (buffer points or lines first)")
    if not geom.is_valid:
        raise DataError(f"region {name}: the AOI polygon is invalid "
                        f"({shapely.is_valid_reason(geom)}); fix the geometry (e.g. remove the "
                        "self-intersection) and retry")
    if geom.area == 0:
        raise DataError(f"region {name}: the AOI polygon has zero area; give a polygon with area")
    minx, miny, maxx, maxy = geom.bounds
    if max(abs(minx), abs(maxx)) > 360 or max(abs(miny), abs(maxy)) > 90:
        raise ConfigError(f"region {name}: AOI bounds {tuple(round(v, 3) for v in geom.bounds)} are outside "
                          f"lon/lat range; {_PROJECTED_HINT}")
    if _crosses_antimeridian(geom):
        raise ConfigError(f"region {name}: the AOI crosses the antimeridian (lon 180), which one "
                          "UTM grid cannot hold; split it into two regions at lon 180")
    if minx < -180 or maxx > 180 or miny < -90 or maxy > 90:
        raise DataError(f"region {name}: AOI bounds {geom.bounds} exceed lon/lat range; is the "
                        "file's CRS declared correctly?")
    check_aoi_size(geom, name)
    return geom


def _crosses_antimeridian(geom: Polygon | MultiPolygon) -> bool:
    """True if a ring jumps more than 180 degrees of longitude (-179 to 179 the short way) or
    runs past lon +-180, as antimeridian-crossing GeoJSON and WKT do."""
    minx, _, maxx, _ = geom.bounds
    if (-180 <= minx and 180 < maxx <= 360) or (-360 <= minx < -180 and maxx <= 180):
        return True
    polygons = geom.geoms if geom.geom_type == "MultiPolygon" else [geom]
    return any(np.any(np.abs(np.diff(np.asarray(p.exterior.coords)[:, 0])) > 180) for p in polygons)


def check_aoi_size(geom: Polygon | MultiPolygon, name: str = "region") -> None:
    """Refuse an AOI wider than :data:`MAX_AOI_LON_SPAN_DEG` or larger than :data:`MAX_AOI_KM2`."""
    minx, _, maxx, _ = geom.bounds
    if maxx - minx > MAX_AOI_LON_SPAN_DEG:
        raise ConfigError(f"region {name}: the AOI spans {maxx - minx:.1f} degrees of longitude, "
                          f"more than one grid can hold ({MAX_AOI_LON_SPAN_DEG:g}); split it into "
                          "smaller regions (e.g. one per state)")
    area_km2 = abs(pyproj.Geod(ellps="WGS84").geometry_area_perimeter(geom)[0]) / 1e6
    if area_km2 > MAX_AOI_KM2:
        raise ConfigError(f"region {name}: the AOI covers {area_km2:,.0f} km², more than the "
                          f"{MAX_AOI_KM2:,.0f} km² one run may plan; split it into smaller "
                          "regions (e.g. one per state)")
