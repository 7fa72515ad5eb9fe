"""Builders of bad and hostile inputs for tests/reliability/test_bad_inputs.py.

Every builder writes a small, broken copy of something real (the demo catalog's items and
COGs, the demo model, an AOI file) so that each error is provoked on the real code path.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import rasterio

from raysam.demo.catalog import CatalogInfo

# One chip per date: straddles lon -90, so it needs both demo tiles (as tests/test_cli.py).
SMALL_AOI = "-90.035,41.815,-89.965,41.865"
ONE_DATE = ("2024-06-28", "2024-07-05")


# ---------------------------------------------------------------- AOI files


# A 1 km box in UTM zone 16N metres (inside the demo region): what a projected AOI looks like.
UTM_BOX = (600000, 4630000, 601000, 4631000)
UTM_WKT = "POLYGON ((600000 4630000, 601000 4630000, 601000 4631000, 600000 4631000, 600000 4630000))"


def _feature_collection(geometry: dict, crs: object = None) -> str:
    doc: dict = {"type": "FeatureCollection",
                 "features": [{"type": "Feature", "properties": {}, "geometry": geometry}]}
    if crs is not None:
        doc["crs"] = crs
    return json.dumps(doc)


def _geoparquet(path: Path, wkb: list[bytes], crs: object) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    geo = {"version": "1.1.0", "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": crs}}}
    table = pa.table({"geometry": pa.array(wkb, pa.binary())})
    pq.write_table(table.replace_schema_metadata({b"geo": json.dumps(geo).encode()}), path)


def write_aoi_files(root: Path) -> dict[str, Path]:
    """AOI files that are empty, not GeoJSON, without geometry, a point, a line, without a CRS,
    in metres without saying so, with ``crs`` members raysam cannot read, with unreadable WKB,
    and a directory where a file is expected."""
    import shapely

    root.mkdir(parents=True, exist_ok=True)
    names = {"empty": "empty.geojson", "not_geojson": "notes.geojson", "no_features": "no_features.geojson",
             "point": "point.geojson", "line": "line.geojson", "no_crs": "no_crs.parquet",
             "utm_unsaid": "utm_unsaid.geojson", "crs_link": "crs_link.geojson", "crs_number": "crs_number.geojson",
             "crs_unknown": "crs_unknown.geojson", "bad_wkb": "bad_wkb.parquet", "a_dir": "aoi.geojson.d"}
    files = {key: root / name for key, name in names.items()}
    box = shapely.geometry.mapping(shapely.box(-90.03, 41.82, -89.97, 41.86))
    utm = shapely.geometry.mapping(shapely.box(*UTM_BOX))
    files["empty"].write_bytes(b"")
    files["not_geojson"].write_text("<html><body>this is not GeoJSON</body></html>\n")
    files["no_features"].write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    files["point"].write_text(json.dumps({"type": "Point", "coordinates": [-90.0, 41.84]}))
    files["line"].write_text(_feature_collection({"type": "LineString", "coordinates": [[-90.03, 41.82], [-89.97, 41.86]]}))
    files["utm_unsaid"].write_text(_feature_collection(utm))  # metres, but no crs member: read as lon/lat
    files["crs_link"].write_text(_feature_collection(box, {"type": "link", "properties": {"href": "http://x/crs.prj",
                                                                                           "type": "esriwkt"}}))
    files["crs_number"].write_text(_feature_collection(box, {"type": "name", "properties": {"name": 4326}}))
    files["crs_unknown"].write_text(_feature_collection(box, {"type": "name", "properties": {"name": "EPSG:999999"}}))
    _geoparquet(files["no_crs"], [shapely.to_wkb(shapely.box(*UTM_BOX))], None)
    _geoparquet(files["bad_wkb"], [b"\x01\x03\x00\x00\x00garbage"], "OGC:CRS84")
    files["a_dir"].mkdir()
    return files


# ---------------------------------------------------------------- STAC items


def read_items(info: CatalogInfo) -> list[dict]:
    """The demo catalog's items (as served)."""
    return [json.loads(line) for line in info.items_ndjson.read_text().splitlines() if line.strip()]


def write_items(root: Path, info: CatalogInfo, items: list[dict]) -> Path:
    """A catalog directory (collection + items.ndjson) that ``serve_catalog`` can serve."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(info.collection_path, root / "collection.json")
    (root / "items.ndjson").write_text("".join(json.dumps(i) + "\n" for i in items))
    return root / "items.ndjson"


def without_band(items: list[dict], band: str) -> list[dict]:
    """Items whose ``band`` asset is gone (a catalog that lacks a required band)."""
    return [{**i, "assets": {k: a for k, a in i["assets"].items() if k != band}} for i in items]


def without_projection(items: list[dict]) -> list[dict]:
    """Items with no ``proj:epsg``/``proj:code`` anywhere (tile CRS unknown)."""
    def strip(d: dict) -> dict:
        return {k: v for k, v in d.items() if k not in ("proj:epsg", "proj:code")}

    return [{**i, "properties": strip(i["properties"]), "assets": {k: strip(a) for k, a in i["assets"].items()}}
            for i in items]


def with_band_href(items: list[dict], band: str, href_of: dict[str, str]) -> list[dict]:
    """Items whose ``band`` asset points at ``href_of[tile]`` (a broken copy of the COG)."""
    out = []
    for item in items:
        asset = {**item["assets"][band], "href": href_of[item["properties"]["s2:mgrs_tile"]]}
        out.append({**item, "assets": {**item["assets"], band: asset}})
    return out


# ---------------------------------------------------------------- COGs


def truncated_copy(src: Path, dst: Path, keep: float = 0.3) -> str:
    """The first ``keep`` of a COG's bytes: header intact, tiles cut off."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return str(dst)


def rewritten_copy(src: Path, dst: Path, crs: str | None = None, dtype: str | None = None) -> str:
    """A copy of a COG declaring another CRS or holding another dtype (pixels otherwise equal)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(src) as s:
        data, profile = s.read(1), s.profile
    profile.update(driver="GTiff", tiled=True, blockxsize=512, blockysize=512)
    if crs:
        profile["crs"] = crs
    if dtype:
        profile["dtype"], profile["predictor"] = dtype, 1
        data = data.astype(dtype) / np.float32(10000.0) if dtype.startswith("float") else data.astype(dtype)
    with rasterio.open(dst, "w", **profile) as d:
        d.write(data, 1)
    return str(dst)


def cog_of(items: list[dict], band: str) -> dict[str, Path]:
    """Tile id -> the demo COG of ``band`` (first item of each tile)."""
    out: dict[str, Path] = {}
    for item in items:
        out.setdefault(item["properties"]["s2:mgrs_tile"], Path(item["assets"][band]["href"]))
    return out


# ---------------------------------------------------------------- models


def model_copy(src: Path, dst: Path) -> Path:
    """A copy of a model directory."""
    shutil.copytree(src, dst)
    return dst


def truncate_file(path: Path, keep: float = 0.5) -> None:
    """Cut a file to ``keep`` of its size."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def edit_manifest(model_dir: Path, **changes: object) -> None:
    """Change top-level fields of a model's manifest.json."""
    path = model_dir / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))


def swap_graphs(model_dir: Path) -> None:
    """Swap encoder.onnx and decoder.onnx and re-hash them in the manifest: checksums pass, graphs don't."""
    import hashlib

    enc, dec = model_dir / "encoder.onnx", model_dir / "decoder.onnx"
    enc_bytes, dec_bytes = enc.read_bytes(), dec.read_bytes()
    enc.write_bytes(dec_bytes)
    dec.write_bytes(enc_bytes)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    for graph, data in (("encoder", dec_bytes), ("decoder", enc_bytes)):
        manifest[graph].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (model_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))


# ---------------------------------------------------------------- a STAC API that answers garbage


class _GarbageSearch(BaseHTTPRequestHandler):
    """A STAC API landing page that conforms to item search, and a /search that answers garbage."""

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def _send(self, body: bytes, ctype: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _landing(self) -> bytes:
        url = f"http://{self.headers['Host']}"
        return json.dumps({
            "type": "Catalog", "id": "garbage", "description": "answers garbage", "stac_version": "1.0.0",
            "conformsTo": ["https://api.stacspec.org/v1.0.0/core", "https://api.stacspec.org/v1.0.0/item-search"],
            "links": [{"rel": "self", "href": url}, {"rel": "root", "href": url},
                      {"rel": "search", "href": f"{url}/search", "method": "GET", "type": "application/geo+json"},
                      {"rel": "search", "href": f"{url}/search", "method": "POST", "type": "application/geo+json"}],
        }).encode()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.split("?")[0] in ("", "/"):
            self._send(self._landing(), "application/json")
        else:
            self._send(b'{"type": "FeatureCollection", "features": [{"id": ', "application/geo+json")

    do_POST = do_GET  # noqa: N815


@contextmanager
def black_hole():
    """A localhost TCP server that accepts connections and never answers; yields it (``port``,
    ``connections()``). What an unreachable cloud endpoint, or a hung server, looks like."""
    server = BlackHole()
    try:
        yield server
    finally:
        server.close()


class BlackHole:
    """See :func:`black_hole`."""

    def __init__(self) -> None:
        # every interface: Ray resolves 127.0.0.1 to the node's own address before connecting
        self._listener = socket.create_server(("0.0.0.0", 0), backlog=64)
        self.port = self._listener.getsockname()[1]
        self._accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._accepted.append(conn)

    def connections(self) -> int:
        """How many connections it has accepted so far."""
        return len(self._accepted)

    def close(self) -> None:
        self._listener.close()
        for conn in self._accepted:
            conn.close()


def closed_port() -> int:
    """A localhost port nobody listens on (connections are refused)."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


@contextmanager
def garbage_stac_api():
    """A local STAC API whose /search returns malformed JSON; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _GarbageSearch)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- an error raysam does not expect


class BoomHandler(logging.Handler):
    """A logging handler that cannot be built: named in Hydra's job logging
    (``+hydra.job_logging.handlers.boom.class=...``), it makes the job fail in code outside raysam's
    checks, which the command line must report as an internal error: one line naming the log
    file that holds the traceback."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("boom: a failure no raysam check expects")
