"""The outputs as STAC: one Item per published date group, one Collection over the groups.

Layout (every href relative, so a published tree can be moved or synced to an object store)::

    <collection dir>/collection.json         update_collection(): rebuilt from the items present
    <collection dir>/<group>/item.json       group_item_json(): written before the group's marker
    <collection dir>/<group>/labels.tif ...  the group's files, the item's assets

:class:`PublishedGroup` says what one date group published; :func:`group_item` turns it into a
``pystac.Item`` with the projection extension (per raster asset: code, shape, transform), the
raster extension (data type, nodata, scale/offset) and the processing extension (model, software
versions, the parameters that made the masks). MLM is not used: it describes a model, and its
schema requires the model file as an asset of the item.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import pystac
from shapely.geometry import mapping
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension
from shapely.geometry.base import BaseGeometry

from raysam.sinks.style import LABEL_BAND_DESCRIPTION
from raysam.storage.backends import Storage
from raysam.storage.locks import held_briefly
from raysam.storage.publish import publisher_for
from raysam.storage.root import MARKER, OutputRoot

ITEM_FILE = "item.json"
COLLECTION_FILE = "collection.json"
PROCESSING_EXTENSION = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
MEDIA_VRT = "application/xml"  # a GDAL VRT is XML; there is no registered VRT media type
MEDIA_QML = "application/xml"
SOURCES_PROPERTY = "raysam:source_items"  # ids of the Sentinel-2 items the group was made from
COLLECTION_LOCK_WAIT_S = 30.0  # a rewrite of collection.json waits this long for another run's

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Band:
    """The one band of a raster output.

    Attributes:
        name: short name (``B04``, ``label id``).
        description: the GDAL band description written into the raster.
        data_type: numpy/GDAL data type name (``uint32``, ``uint16``).
        nodata: the nodata value, if any.
        scale: physical value = DN * scale + offset, if the raster has one.
        offset: see ``scale``.
        unit: unit of the physical value, if any.
    """

    name: str
    description: str
    data_type: str
    nodata: float | None = None
    scale: float | None = None
    offset: float | None = None
    unit: str | None = None


@dataclass(frozen=True)
class RasterOutput:
    """One raster of a date group: a single COG, a VRT mosaic over COG tiles, or both.

    Attributes:
        stem: path without suffix, relative to the group directory (``labels``, ``s2/B04``):
            the COG is ``<stem>.tif``, the mosaic ``<stem>.vrt`` over the tiles in ``<stem>/``.
        band: what the pixels are.
        cog: ``<stem>.tif`` was written.
        mosaic: ``<stem>.vrt`` was written.
        style: a QGIS style ``<stem>.qml`` was written.
    """

    stem: str
    band: Band
    cog: bool = True
    mosaic: bool = False
    style: bool = False


@dataclass(frozen=True)
class PolygonOutput:
    """The polygons of a date group.

    Attributes:
        single_file: ``masks.parquet`` was written.
        parts: the ``masks/`` folder of GeoParquet parts (one schema) was written.
        count: number of polygons, if known.
    """

    single_file: bool = True
    parts: bool = False
    count: int | None = None


@dataclass(frozen=True)
class QuicklookOutput:
    """``quicklook.png``: its pixel shape (rows, cols) and affine transform in the grid's CRS."""

    shape: tuple[int, int]
    transform: tuple[float, float, float, float, float, float]


@dataclass(frozen=True)
class SourceItem:
    """A Sentinel-2 item the date group was made from; ``href`` is its STAC item URL, where known."""

    id: str
    collection: str | None = None
    href: str | None = None


@dataclass(frozen=True)
class Processing:
    """How the masks were made (the processing extension's fields).

    Attributes:
        lineage: one paragraph: model and method (free text, CommonMark allowed).
        software: name -> version of raysam, the model and the libraries that shaped the output.
        parameters: the parameters that made the masks (model identity, SAM/merge/chip settings).
        datetime_utc: when the group was produced.
    """

    lineage: str
    software: Mapping[str, str]
    parameters: Mapping[str, Any]
    datetime_utc: datetime


@dataclass(frozen=True)
class PublishedGroup:
    """What one published date group holds: the input of :func:`group_item`.

    Attributes:
        id: the date group id (the item id; unique in the collection).
        datetime_utc: acquisition time.
        footprint_wgs84: the group's AOI in EPSG:4326 (the item geometry).
        epsg: the target grid's CRS.
        shape: the target grid's (rows, cols).
        transform: the target grid's affine (a, b, c, d, e, f).
        processing: model, parameters and software.
        labels: the label raster, if written.
        polygons: the polygons, if written.
        s2_bands: the Sentinel-2 band rasters written.
        quicklook: the quicklook, if written.
        sources: the Sentinel-2 items used.
        manifest: ``manifest.json`` is in the group directory.
    """

    id: str
    datetime_utc: datetime
    footprint_wgs84: BaseGeometry
    epsg: int
    shape: tuple[int, int]
    transform: tuple[float, float, float, float, float, float]
    processing: Processing
    labels: RasterOutput | None = None
    polygons: PolygonOutput | None = None
    s2_bands: tuple[RasterOutput, ...] = ()
    quicklook: QuicklookOutput | None = None
    sources: tuple[SourceItem, ...] = ()
    manifest: bool = True


LABEL_BAND = Band("label id", LABEL_BAND_DESCRIPTION, "uint32", 0)


def collection_info(manifest_base: Mapping[str, Any], run_key: str) -> dict[str, str]:
    """Keyword arguments of :func:`update_collection` for a region's run directory."""
    region = manifest_base.get("region", {}).get("name", "region")
    return {
        "collection_id": f"raysam-{region}-{run_key}",
        "title": f"raysam masks: {region} ({run_key})",
        "description": (f"Segment Anything masks over Sentinel-2 L2A for region {region}, one item per date "
                        f"group: label raster, polygons (GeoParquet/fiboa), the bands used, a quicklook."),
        "license": "other",
    }


def stac_api_item_href(api_url: str, collection: str, item_id: str) -> str:
    """The URL of an item in a STAC API (``<api>/collections/<collection>/items/<id>``)."""
    return f"{api_url.rstrip('/')}/collections/{quote(collection, safe='')}/items/{quote(item_id, safe='')}"


def processing_from_manifest(manifest_base: Mapping[str, Any]) -> Processing:
    """The processing fields from a date group's run-level manifest (``driver.manifest_base``)."""
    model, config = manifest_base.get("model", {}), manifest_base.get("config", {})
    versions = manifest_base.get("versions", {})
    parameters = {"model": model, **{k: config[k] for k in ("amg", "chip", "merge") if k in config},
                  "sinks": {k: config["output"][k] for k in ("sinks", "s2_bands") if k in config.get("output", {})}}
    lineage = (f"Masks by Segment Anything's automatic mask generator with the {model.get('family')} "
               f"{model.get('type')} model ({model.get('description') or 'no description'}) on RGB chips of "
               f"Sentinel-2 L2A, merged across chips by raysam {versions.get('raysam')}.")
    return Processing(lineage, {k: str(v) for k, v in versions.items()}, parameters, datetime.now(UTC))


def published_group(group: Any, processing: Processing, *, labels: RasterOutput | None = None,
                    polygons: PolygonOutput | None = None, s2_bands: tuple[RasterOutput, ...] = (),
                    quicklook: QuicklookOutput | None = None, stac_api_url: str | None = None) -> PublishedGroup:
    """A :class:`PublishedGroup` for a :class:`raysam.grid.DateGroup` and the outputs written for it.

    Args:
        group: the date group (its grid, AOI and items).
        processing: see :func:`processing_from_manifest`.
        labels, polygons, s2_bands, quicklook: what was written.
        stac_api_url: the STAC API the items came from, when their URLs last (not the demo's
            temporary server): each source item is then linked as ``derived_from``.
    """
    from raysam.sinks.polygons import ToWgs84

    grid = group.grid
    sources = tuple(SourceItem(i.id, i.collection, stac_api_item_href(stac_api_url, i.collection, i.id)
                               if stac_api_url else None) for i in group.items)
    when = min((i.datetime_utc for i in group.items),
               default=datetime.combine(group.date, datetime.min.time(), tzinfo=UTC))
    return PublishedGroup(group.id, when, ToWgs84(grid.epsg)(group.aoi_utm), grid.epsg, (grid.height, grid.width),
                          tuple(grid.transform), processing, labels=labels, polygons=polygons, s2_bands=s2_bands,
                          quicklook=quicklook, sources=sources)


def group_item(group: PublishedGroup, collection_id: str) -> pystac.Item:
    """The STAC Item of one date group; asset hrefs relative to the group directory.

    Args:
        group: what the group published.
        collection_id: the id of the collection (see :func:`update_collection`).

    Returns:
        The item, linked to ``../collection.json`` as its collection, parent and root.
    """
    geometry = mapping(group.footprint_wgs84)
    item = pystac.Item(group.id, geometry, list(group.footprint_wgs84.bounds), group.datetime_utc.astimezone(UTC),
                       properties={SOURCES_PROPERTY: [s.id for s in group.sources]}, collection=collection_id)
    _add_processing(item, group.processing)
    for raster in ([group.labels] if group.labels else []) + list(group.s2_bands):
        _add_raster_assets(item, raster, group)
    if group.polygons is not None:
        _add_polygon_assets(item, group.polygons)
    if group.quicklook is not None:
        asset = pystac.Asset("./quicklook.png", "Quicklook", "RGB with mask outlines (georeferenced by "
                             "quicklook.pgw and quicklook.png.aux.xml)", pystac.MediaType.PNG, ["overview", "visual"])
        item.add_asset("quicklook", asset)
        _project(asset, group.epsg, group.quicklook.shape, group.quicklook.transform)
    if group.manifest:
        item.add_asset("manifest", pystac.Asset("./manifest.json", "Manifest", "Resolved config, versions, model, "
                                                "counts and timings", pystac.MediaType.JSON, ["metadata"]))
    for link in _collection_links(collection_id):
        item.add_link(link)
    for source in (s for s in group.sources if s.href):
        item.add_link(pystac.Link("derived_from", source.href, pystac.MediaType.GEOJSON, f"Sentinel-2 item {source.id}"))
    return item


def group_item_json(group: PublishedGroup, collection_id: str) -> str:
    """:func:`group_item` as the text of ``<group>/item.json`` (written before the group's marker)."""
    return json.dumps(_to_dict(group_item(group, collection_id)), indent=2, default=str)


def update_collection(root: OutputRoot, collection_dir: str, *, collection_id: str, title: str,
                      description: str, license: str = "other") -> pystac.Collection | None:
    """(Re)write ``<collection_dir>/collection.json`` from the items of the published groups there.

    A group counts when its directory holds both ``item.json`` and the completion marker, so a
    crashed or running group is never listed. Idempotent; call it after each publish. Runs that
    share the collection take turns (its lock, ``.collection.json.lock``), so each rewrite sees
    every group published before it; the one holding the lock removes the temporary files of a
    rewrite that a killed run left behind.

    Args:
        root: the output root (local or object store).
        collection_dir: the parent of the group directories, on ``root``.
        collection_id: the collection id (the items' ``collection``).
        title: a short title.
        description: what the collection is (CommonMark allowed).
        license: SPDX id or ``other`` (the default: Copernicus Sentinel data terms plus the model's).

    Returns:
        The collection written, or None (nothing written) when no group is published yet, or
        when another run held the lock for :data:`COLLECTION_LOCK_WAIT_S` (logged; its own
        rewrite, or the next publish, lists this group).
    """
    path = f"{collection_dir}/{COLLECTION_FILE}"
    with held_briefly(root, path, f"the collection {path}", COLLECTION_LOCK_WAIT_S) as held:
        if not held:
            log.warning("%s not rewritten: another run held its lock for %.0f s; the next publish rewrites it",
                        path, COLLECTION_LOCK_WAIT_S)
            return None
        publisher_for(root).remove_leftovers(root, path)
        items = _published_items(root.storage, collection_dir)
        if not items:
            return None
        collection = collection_from_items(items, collection_id=collection_id, title=title,
                                           description=description, license=license)
        root.storage.put_bytes(path, json.dumps(_to_dict(collection), indent=2).encode())
        return collection


def collection_from_items(items: Mapping[str, pystac.Item], *, collection_id: str, title: str, description: str,
                          license: str = "other") -> pystac.Collection:
    """The Collection over ``items`` (group directory name -> item): extent, summaries, item links."""
    ordered = sorted(items.items(), key=lambda kv: kv[0])
    bbox = [min(i.bbox[0] for _, i in ordered), min(i.bbox[1] for _, i in ordered),
            max(i.bbox[2] for _, i in ordered), max(i.bbox[3] for _, i in ordered)]
    times = sorted(i.datetime for _, i in ordered)
    extent = pystac.Extent(pystac.SpatialExtent([bbox]), pystac.TemporalExtent([[times[0], times[-1]]]))
    codes = sorted({a.extra_fields["proj:code"] for _, i in ordered for a in i.assets.values()
                    if "proj:code" in a.extra_fields})
    collection = pystac.Collection(
        collection_id, description, extent, title=title, license=license,
        providers=[pystac.Provider("raysam", roles=[pystac.ProviderRole.PROCESSOR])],
        summaries=pystac.Summaries({"proj:code": codes}) if codes else None,
    )
    collection.add_link(pystac.Link(pystac.RelType.ROOT, f"./{COLLECTION_FILE}", pystac.MediaType.JSON))
    for name, item in ordered:
        collection.add_link(pystac.Link(pystac.RelType.ITEM, f"./{name}/{ITEM_FILE}", pystac.MediaType.GEOJSON,
                                        item.id))
    return collection


def _add_processing(item: pystac.Item, processing: Processing) -> None:
    item.stac_extensions.append(PROCESSING_EXTENSION)
    item.properties.update({
        "processing:lineage": processing.lineage,
        "processing:software": dict(processing.software),
        "processing:expression": {"format": "raysam-parameters", "expression": dict(processing.parameters)},
        "processing:datetime": processing.datetime_utc.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    })


def _add_raster_assets(item: pystac.Item, raster: RasterOutput, group: PublishedGroup) -> None:
    """``<key>`` (the COG) and ``<key>_mosaic`` (the VRT), each with projection and raster fields."""
    key = raster.stem.rsplit("/", 1)[-1]
    band = raster.band
    for suffix, media, what, present in ((".tif", pystac.MediaType.COG, "Cloud-Optimized GeoTIFF", raster.cog),
                                         (".vrt", MEDIA_VRT, f"GDAL VRT mosaic of the COG tiles in {raster.stem}/",
                                          raster.mosaic)):
        if not present:
            continue
        asset = pystac.Asset(f"./{raster.stem}{suffix}", f"{band.name} ({what})", band.description, media, ["data"])
        item.add_asset(key if suffix == ".tif" or not raster.cog else f"{key}_mosaic", asset)
        _project(asset, group.epsg, group.shape, group.transform)
        RasterExtension.ext(asset, add_if_missing=True).apply([RasterBand.create(
            nodata=band.nodata, data_type=DataType(band.data_type), scale=band.scale, offset=band.offset,
            unit=band.unit, spatial_resolution=abs(group.transform[0]))])
    if raster.style:
        item.add_asset(f"{key}_style", pystac.Asset(f"./{raster.stem}.qml", f"{band.name} QGIS style",
                                                    "QGIS loads it with the raster of the same name",
                                                    MEDIA_QML, ["style"]))


def _add_polygon_assets(item: pystac.Item, polygons: PolygonOutput) -> None:
    count = f"{polygons.count} " if polygons.count is not None else ""
    text = (f"{count}mask polygons, GeoParquet 1.1 and fiboa 0.3 (EPSG:4326); "
            "label_id matches the label raster")
    for key, href, what, present in (("polygons", "./masks.parquet", "one file", polygons.single_file),
                                     ("polygon_parts", "./masks/", "a folder of parts with one schema",
                                      polygons.parts)):
        if present:
            asset = pystac.Asset(href, f"Polygons ({what})", text, pystac.MediaType.VND_APACHE_PARQUET, ["data"])
            item.add_asset(key, asset)
            ProjectionExtension.ext(asset, add_if_missing=True).apply(code="EPSG:4326")


def _project(asset: pystac.Asset, epsg: int, shape: tuple[int, int], transform: tuple[float, ...]) -> None:
    ProjectionExtension.ext(asset, add_if_missing=True).apply(
        code=f"EPSG:{epsg}", shape=[int(shape[0]), int(shape[1])], transform=[float(v) for v in transform[:6]])


def _collection_links(collection_id: str) -> list[pystac.Link]:
    href = f"../{COLLECTION_FILE}"
    return [pystac.Link(rel, href, pystac.MediaType.JSON, collection_id if rel == pystac.RelType.COLLECTION else None)
            for rel in (pystac.RelType.COLLECTION, pystac.RelType.PARENT, pystac.RelType.ROOT)]


def _to_dict(obj: pystac.Item | pystac.Collection) -> dict[str, Any]:
    """The JSON of an object whose links were all set by hand (relative hrefs kept as given)."""
    return obj.to_dict(include_self_link=False, transform_hrefs=False)


def _published_items(storage: Storage, collection_dir: str) -> dict[str, pystac.Item]:
    """Group directory name -> item, for every group with both item.json and its marker."""
    items = {}
    for name in storage.list_names(collection_dir):
        if name.startswith(".") or not storage.is_dir(f"{collection_dir}/{name}"):
            continue
        item_path, marker = f"{collection_dir}/{name}/{ITEM_FILE}", f"{collection_dir}/{name}/{MARKER}"
        if not (storage.exists(item_path) and storage.exists(marker)):
            continue
        items[name] = pystac.Item.from_dict(json.loads(storage.read_bytes(item_path)), migrate=False)
    return items
