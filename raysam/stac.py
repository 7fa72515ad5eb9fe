"""STAC search and item parsing: the catalog side of a run, up to a list of ParsedItems.

Owns :class:`StacConfig` (where and how to search, checked on construction), :func:`search_items`
(pystac-client, all pages, retries, failures as one-line DataErrors), :func:`parse_item` (one
STAC item dict, Planetary Computer or earth-search layout, into a :class:`ParsedItem` with its
bands' radiometry) and :func:`dedupe_reprocessed` (one item per tile and datetime, newest
processing baseline). Items keep unsigned hrefs: signing is :mod:`raysam.signing`'s job, and
choosing the items of each date :mod:`raysam.selection`'s.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timezone
from urllib.parse import urlparse

import shapely
from shapely.geometry import mapping, shape

from raysam.errors import ConfigError, DataError
from raysam.items import KNOWN_BANDS, REFLECTANCE_SCALE, BandAsset, ParsedItem, canonical_band

__all__ = ["StacConfig", "as_utc", "dedupe_reprocessed", "open_client", "parse_item", "search_items"]

log = logging.getLogger(__name__)

PC_STAC_URL = "https://planetarycomputer.microsoft.com/api/stac/v1"
KINDS = ("planetary_computer", "local")
RGB_BANDS = ("B04", "B03", "B02")
# ESA: from processing baseline 04.00 (2022-01-25) L2A DNs carry BOA_ADD_OFFSET = -1000.
OFFSET_BASELINE = (4, 0)
OFFSET_START_UTC = datetime(2022, 1, 25, tzinfo=timezone.utc)
BOA_ADD_OFFSET_DN = -1000.0
# A Planetary Computer subscription key (Azure API Management) is 32 hex characters; anything
# under half that is a mistake, and a key that short would also match unrelated text.
MIN_PC_KEY_CHARS = 16
RETRY_STATUS = (429, 500, 502, 503, 504)  # transient HTTP answers worth retrying


@dataclass(frozen=True)
class StacConfig:
    """Where and how to search.

    Attributes:
        kind: ``planetary_computer`` (signed Azure hrefs) or ``local`` (any STAC API, no signing).
        url: STAC API root; defaults to Planetary Computer's for that kind.
        collection: collection id.
        sign: sign asset hrefs at read time (Planetary Computer only).
        pc_key: Planetary Computer subscription key (else ``PC_SDK_SUBSCRIPTION_KEY``); never shown.
        page_size: items per search page (``limit``).
        max_items: stop after this many items (None: all pages).
        timeout_s: per-request timeout.
        retries: retries of a request on connection errors and HTTP 429/5xx.
        backoff_s: exponential backoff factor between retries (urllib3 ``backoff_factor``).
    """

    kind: str = "planetary_computer"
    url: str | None = None
    collection: str = "sentinel-2-l2a"
    sign: bool = True
    pc_key: str | None = field(default=None, repr=False)
    page_size: int = 100
    max_items: int | None = None
    timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"stac.kind={self.kind!r} is not one of {', '.join(KINDS)}: pick one")
        if self.kind == "local" and not self.url:
            raise ConfigError("stac.kind=local needs stac.url: set it to the STAC API root, e.g. http://127.0.0.1:7822")
        if self.url is not None and urlparse(self.url).scheme not in ("http", "https"):
            raise ConfigError(f"stac.url={self.url!r} is not an http(s) URL: give a STAC API root such as "
                              f"https://earth-search.aws.element84.com/v1 or http://127.0.0.1:7822")
        if self.pc_key is not None and (len(self.pc_key) < MIN_PC_KEY_CHARS or not self.pc_key.isprintable()
                                        or any(c.isspace() for c in self.pc_key)):
            raise ConfigError(f"the Planetary Computer key (stac.pc_key or PC_SDK_SUBSCRIPTION_KEY) has "
                              f"{len(self.pc_key)} character(s) or blanks, so it cannot be one: a subscription key is "
                              "32 hexadecimal characters (your profile at planetarycomputer.microsoft.com); "
                              "fix it, or unset it to search without a key")
        if self.page_size < 1 or (self.max_items is not None and self.max_items < 1):
            raise ConfigError(f"stac.page_size={self.page_size} and stac.max_items={self.max_items} must be >= 1: fix them")
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0:
            raise ConfigError("stac.timeout_s must be > 0 and stac.retries, stac.backoff_s >= 0: fix them")

    @property
    def api_url(self) -> str:
        """The STAC API root to open."""
        return self.url or PC_STAC_URL

    def __repr__(self) -> str:
        key = "'***'" if self.pc_key else "None"
        return (f"StacConfig(kind={self.kind!r}, url={self.api_url!r}, collection={self.collection!r}, sign={self.sign}, "
                f"pc_key={key}, page_size={self.page_size}, max_items={self.max_items}, timeout_s={self.timeout_s}, "
                f"retries={self.retries}, backoff_s={self.backoff_s})")

    __str__ = __repr__


# ---------------------------------------------------------------- time range


def as_utc(value: datetime | date | str, end_of_day: bool = False) -> datetime:
    """A timezone-aware UTC datetime; a bare date means its start (or end, if ``end_of_day``)."""
    if isinstance(value, str):
        try:
            value = date.fromisoformat(value) if len(value) == 10 else datetime.fromisoformat(value)
        except ValueError as err:
            raise ConfigError(f"time {value!r} is not ISO 8601: write YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ") from err
    if not isinstance(value, datetime):
        day_time = time(23, 59, 59, 999999) if end_of_day else time(0)
        value = datetime.combine(value, day_time)
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


# ---------------------------------------------------------------- search


def _stac_io(cfg: StacConfig):
    """A pystac-client StacApiIO with urllib3 retries (backoff) on connect errors and 429/5xx."""
    from pystac_client.stac_api_io import StacApiIO
    from urllib3.util.retry import Retry

    retry = Retry(total=cfg.retries, backoff_factor=cfg.backoff_s, status_forcelist=RETRY_STATUS,
                  allowed_methods=None, raise_on_status=True)
    return StacApiIO(timeout=cfg.timeout_s, max_retries=retry)


def _short(err: BaseException) -> str:
    """The root cause of an error (``Connection refused``), else its text cut to 200 characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    errno = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if errno:
        return errno.group(1).strip()
    return text if len(text) <= 200 else text[:197] + "..."


def _gave_up(text: str) -> tuple[str, str] | None:
    """(path, last failure) of urllib3's ``Max retries exceeded`` text for a flaky server, else None."""
    match = re.search(r"Max retries exceeded with url: (\S+) \(Caused by (.*)\)$", text)
    if not match:
        return None
    cause = match.group(2)
    status = re.search(r"too many (\d{3}) error responses", cause)
    if status:
        return match.group(1), f"HTTP {status.group(1)}"
    if "timed out" in cause.lower():
        return match.group(1), "timed out"
    if re.search(r"reset|RemoteDisconnected|aborted", cause):
        return match.group(1), "connection reset"
    return None  # e.g. connection refused: the server is down, not flaky


def _api_error(cfg: StacConfig, err: Exception) -> DataError:
    """Translate a pystac-client/requests/JSON failure into a one-line DataError."""
    from pystac import STACTypeError
    from pystac_client.exceptions import APIError

    url = cfg.api_url
    if isinstance(err, APIError) and getattr(err, "status_code", None):
        return DataError(f"STAC API at {url} answered HTTP {err.status_code}: {_short(err)}: check stac.url and stac.collection")
    gave_up = _gave_up(" ".join(str(err).split())) if isinstance(err, APIError) else None
    if gave_up:
        return DataError(f"STAC API at {url} is unreachable: {cfg.retries + 1} tries of {gave_up[0]} failed (last: {gave_up[1]}): "
                         "check the URL and that the server is up, or raise stac.retries/stac.timeout_s")
    if isinstance(err, APIError):
        return DataError(f"STAC API at {url} is unreachable: {_short(err)}: check the URL and that the server is up")
    if isinstance(err, (json.JSONDecodeError, STACTypeError, KeyError, TypeError, ValueError)):
        return DataError(f"STAC API at {url} sent a malformed response ({type(err).__name__}: {_short(err)}): check stac.url points at a STAC API root")
    return DataError(f"STAC API at {url} failed: {_short(err)}")


def open_client(cfg: StacConfig):
    """Open the STAC API root with retries; failures become one-line DataErrors."""
    from pystac_client import Client

    try:
        return Client.open(cfg.api_url, stac_io=_stac_io(cfg), timeout=cfg.timeout_s)
    except Exception as err:  # noqa: BLE001 - every failure mode gets a user-facing message
        raise _api_error(cfg, err) from err


def cloud_filter_params(client, max_cloud_cover: float | None) -> dict:
    """Search kwargs filtering ``eo:cloud_cover`` server-side if the API conforms to query or filter."""
    from pystac_client import ConformanceClasses

    if max_cloud_cover is None:
        return {}
    if client.conforms_to(ConformanceClasses.QUERY):
        return {"query": {"eo:cloud_cover": {"lte": max_cloud_cover}}}
    if client.conforms_to(ConformanceClasses.FILTER):
        return {"filter": {"op": "<=", "args": [{"property": "eo:cloud_cover"}, max_cloud_cover]}, "filter_lang": "cql2-json"}
    return {}


def _fetch_dicts(cfg: StacConfig, client, aoi_wgs84: shapely.Geometry, start: datetime, end: datetime, extra: dict) -> list[dict]:
    """All matching item dicts, following ``next`` links through every page."""
    try:
        search = client.search(collections=[cfg.collection], intersects=mapping(aoi_wgs84), datetime=(start, end),
                               limit=cfg.page_size, max_items=cfg.max_items, **extra)
        return [item for page in search.pages_as_dicts() for item in page["features"]]
    except NotImplementedError as err:
        raise DataError(f"STAC API at {cfg.api_url} does not support item search: point stac.url at a STAC API, not a static catalog") from err
    except Exception as err:  # noqa: BLE001
        raise _api_error(cfg, err) from err


def search_items(cfg: StacConfig, aoi_wgs84: shapely.Geometry, start: datetime | date | str, end: datetime | date | str,
                 max_cloud_cover: float | None = None) -> list[ParsedItem]:
    """Search Sentinel-2 items intersecting the AOI in a time range, through all pages.

    ``eo:cloud_cover <= max_cloud_cover`` is filtered server-side when the API conforms to the
    query or filter extension, and always checked client-side (items without it are kept).

    Args:
        cfg: where to search.
        aoi_wgs84: the region, EPSG:4326 lon/lat.
        start: first instant (a bare date means 00:00 UTC).
        end: last instant (a bare date means 23:59:59.999999 UTC).
        max_cloud_cover: percent, or None for no cloud filter.

    Returns:
        Parsed items (unsigned hrefs), duplicates included: see :func:`dedupe_reprocessed`.

    Raises:
        DataError: unreachable or malformed API, malformed item, or nothing found.
    """
    start_utc, end_utc = as_utc(start), as_utc(end, end_of_day=True)
    client = open_client(cfg)
    dicts = _fetch_dicts(cfg, client, aoi_wgs84, start_utc, end_utc, cloud_filter_params(client, max_cloud_cover))
    window = f"{start_utc:%Y-%m-%dT%H:%M:%SZ} and {end_utc:%Y-%m-%dT%H:%M:%SZ}"
    if not dicts:
        raise DataError(f"no Sentinel-2 items in {cfg.collection} intersect the region between {window}: widen the time range or check the region")
    items = [parse_item(d) for d in dicts]
    if max_cloud_cover is not None:
        items = [i for i in items if i.cloud_cover is None or i.cloud_cover <= max_cloud_cover]
    if not items:
        raise DataError(f"no Sentinel-2 items in {cfg.collection} between {window} have eo:cloud_cover <= {max_cloud_cover}: raise max_cloud_cover or widen the time range")
    return items


# ---------------------------------------------------------------- parsing


def _missing(item_id: str, what: str) -> DataError:
    return DataError(f"STAC item {item_id} has no {what}: the catalog must provide it (is this a Sentinel-2 L2A item?)")


def _epsg_of(obj: dict) -> int | None:
    """EPSG code from ``proj:epsg`` or ``proj:code`` ("EPSG:32615") of a properties/asset dict."""
    if obj.get("proj:epsg"):
        return int(obj["proj:epsg"])
    code = obj.get("proj:code") or ""
    match = re.fullmatch(r"EPSG:(\d+)", str(code))
    return int(match.group(1)) if match else None


def _item_epsg(item: dict, props: dict) -> int:
    """The tile CRS from the item's properties, else from any asset."""
    epsg = _epsg_of(props)
    for asset in item.get("assets", {}).values():
        epsg = epsg or _epsg_of(asset)
    if epsg is None:
        raise _missing(item["id"], "proj:epsg or proj:code (on the item or its assets)")
    return epsg


def _tile_id(item_id: str, props: dict) -> str:
    """MGRS tile from ``s2:mgrs_tile``, the ``mgrs:`` fields, ``grid:code`` or the item id."""
    if props.get("s2:mgrs_tile"):
        return str(props["s2:mgrs_tile"])
    if all(props.get(k) is not None for k in ("mgrs:utm_zone", "mgrs:latitude_band", "mgrs:grid_square")):
        return f"{int(props['mgrs:utm_zone']):02d}{props['mgrs:latitude_band']}{props['mgrs:grid_square']}"
    if str(props.get("grid:code", "")).startswith("MGRS-"):
        return props["grid:code"][5:]
    match = re.search(r"_T(\d{2}[C-X][A-Z]{2})_", item_id) or re.search(r"^S2[A-D]_(\d{2}[C-X][A-Z]{2})_", item_id)
    if match:
        return match.group(1)
    raise _missing(item_id, "MGRS tile (s2:mgrs_tile, mgrs:* or a tile in the id)")


def _band_of(key: str, asset: dict) -> str | None:
    """Canonical band id of a single-band asset, by eo:bands name/common name, else by key."""
    if "jp2" in key.lower() or "jp2" in str(asset.get("type", "")):
        return None
    bands = asset.get("eo:bands") or asset.get("bands") or []
    if len(bands) > 1:
        return None
    names = [bands[0].get(k) for k in ("name", "common_name", "eo:common_name")] if bands else [key]
    for name in filter(None, names):
        if canonical_band(name) in KNOWN_BANDS:
            return canonical_band(name)
    return None


def _baseline_tuple(baseline: str | None) -> tuple[int, int] | None:
    """``"05.10"`` -> (5, 10); None if absent or unparseable."""
    match = re.fullmatch(r"(\d+)\.(\d+)", str(baseline or "").strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


def offset_applies(baseline: str | None, when_utc: datetime) -> bool:
    """True if DNs carry the -1000 offset: baseline >= 04.00, or (no baseline) since 2022-01-25."""
    parsed = _baseline_tuple(baseline)
    return parsed >= OFFSET_BASELINE if parsed else when_utc >= OFFSET_START_UTC


def _band_asset(band: str, key: str, asset: dict, offset: bool) -> BandAsset:
    """Radiometry of one asset: a declared raster:bands offset wins, so it is applied once."""
    raster = (asset.get("raster:bands") or [{}])[0]
    gsd = asset.get("gsd") or raster.get("spatial_resolution") or (abs(asset["proj:transform"][0]) if asset.get("proj:transform") else None)
    nodata = raster.get("nodata", 0)
    if band == "SCL":
        return BandAsset(key, asset["href"], gsd, 0.0, 1.0, nodata)
    if raster.get("offset") is not None:
        scale = float(raster.get("scale") or REFLECTANCE_SCALE)
        return BandAsset(key, asset["href"], gsd, float(raster["offset"]) / scale, scale, nodata)
    return BandAsset(key, asset["href"], gsd, BOA_ADD_OFFSET_DN if offset else 0.0, REFLECTANCE_SCALE, nodata)


def _bands(item: dict, offset: bool, required: Iterable[str]) -> dict[str, BandAsset]:
    """Canonical band id -> asset for every single-band data asset; check the required ones."""
    bands: dict[str, BandAsset] = {}
    for key, asset in (item.get("assets") or {}).items():
        band = _band_of(key, asset)
        if band and band not in bands and asset.get("href"):
            bands[band] = _band_asset(band, key, asset, offset)
    lacking = [b for b in required if b not in bands]
    if lacking:
        raise _missing(item["id"], f"asset for band(s) {', '.join(lacking)} in 'assets' (resolved by eo:bands name/common_name)")
    return bands


def _parse_time(item_id: str, value: str | None, what: str) -> datetime | None:
    if value is None:
        return None
    try:
        return as_utc(datetime.fromisoformat(str(value).replace("Z", "+00:00")))
    except ValueError as err:
        raise DataError(f"STAC item {item_id} has an invalid {what} {value!r}: the catalog must give ISO 8601 times") from err


def parse_item(item: dict, required_bands: Iterable[str] = RGB_BANDS) -> ParsedItem:
    """Parse one STAC item dict (Planetary Computer or earth-search layout) into a ParsedItem.

    Args:
        item: the item as a GeoJSON dict.
        required_bands: canonical band ids that must resolve to an asset.

    Returns:
        The parsed record; hrefs stay unsigned.

    Raises:
        DataError: naming the item and the missing or invalid field.
    """
    item_id = item.get("id") or "<without id>"
    props = item.get("properties") or {}
    when = _parse_time(item_id, props.get("datetime") or props.get("start_datetime"), "datetime")
    if when is None:
        raise _missing(item_id, "properties.datetime")
    if not item.get("geometry"):
        raise _missing(item_id, "geometry")
    footprint = shape(item["geometry"])
    baseline = props.get("s2:processing_baseline")
    return ParsedItem(
        id=item_id, collection=item.get("collection") or "", datetime_utc=when, tile_id=_tile_id(item_id, props),
        epsg=_item_epsg({**item, "id": item_id}, props), bbox_wgs84=tuple(item.get("bbox") or footprint.bounds)[:4],
        footprint_wkb=shapely.to_wkb(footprint), cloud_cover=props.get("eo:cloud_cover"),
        processing_baseline=str(baseline) if baseline is not None else None,
        relative_orbit=props.get("sat:relative_orbit"),
        bands=_bands({**item, "id": item_id}, offset_applies(baseline, when), required_bands),
        processed_utc=_parse_time(item_id, props.get("s2:generation_time") or props.get("processing:datetime")
                                  or props.get("updated") or props.get("created"), "generation time"),
    )


def dedupe_reprocessed(items: Iterable[ParsedItem]) -> list[ParsedItem]:
    """Of items with the same tile and datetime keep one: newest baseline, then processed time, then id.

    Returns:
        The kept items sorted by (datetime, tile); one INFO line per dropped item.
    """
    groups: dict[tuple[str, datetime], list[ParsedItem]] = defaultdict(list)
    for item in items:
        groups[(item.tile_id, item.datetime_utc)].append(item)
    oldest = datetime.min.replace(tzinfo=timezone.utc)
    kept = []
    for group in groups.values():
        group.sort(key=lambda i: (_baseline_tuple(i.processing_baseline) or (0, 0), i.processed_utc or oldest, i.id))
        kept.append(group[-1])
        for dropped in group[:-1]:
            log.info("dropping reprocessed duplicate %s (baseline %s): keeping %s (baseline %s)",
                     dropped.id, dropped.processing_baseline, group[-1].id, group[-1].processing_baseline)
    return sorted(kept, key=lambda i: (i.datetime_utc, i.tile_id))
