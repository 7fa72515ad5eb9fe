"""search_items against a live rustac STAC API serving the demo catalog."""

import http.server
import threading
import urllib.request

import pytest
from shapely.geometry import box

from raysam.demo.serve import free_port
from raysam.errors import DataError
from raysam.stac import StacConfig, cloud_filter_params, open_client, search_items


def _cfg(url, **kw):
    return StacConfig(kind="local", url=url, retries=kw.pop("retries", 1), backoff_s=kw.pop("backoff_s", 0.01), **kw)


def test_finds_both_zones_both_dates_through_pages(stac_server):
    url, info = stac_server
    items = search_items(_cfg(url, page_size=2), box(*info.aoi_wgs84), *info.time_range)
    assert sorted(i.id for i in items) == sorted(info.item_ids)  # 5 items over 3 pages of 2
    assert {(i.tile_id, i.epsg) for i in items} == {("15TYG", 32615), ("16TBM", 32616)}
    assert {i.datetime_utc.date().isoformat() for i in items} == set(info.dates)
    assert all(i.bands["B04"].href.endswith("B04.tif") and i.bands["B04"].offset_dn == -1000 for i in items)


def test_max_items_stops_paging(stac_server):
    url, info = stac_server
    items = search_items(_cfg(url, page_size=2, max_items=3), box(*info.aoi_wgs84), *info.time_range)
    assert len(items) == 3


def test_region_and_time_narrow_the_search(stac_server):
    url, info = stac_server
    west_only = box(-90.19, 41.80, -90.10, 41.85)  # inside 15TYG only
    items = search_items(_cfg(url), west_only, "2024-07-11", "2024-07-11")
    assert [(i.tile_id, i.datetime_utc.day) for i in items] == [("15TYG", 11)]


def test_cloud_filter_is_client_side_when_api_lacks_query_and_filter(stac_server):
    url, info = stac_server
    cfg = _cfg(url)
    assert cloud_filter_params(open_client(cfg), 1.0) == {}  # rustac conforms to neither
    items = search_items(cfg, box(*info.aoi_wgs84), *info.time_range, max_cloud_cover=1.0)
    kept = {i.id for i in items}
    assert kept == {k for k, v in info.cloud_cover.items() if v <= 1.0} and len(kept) == 4


def test_nothing_found_message(stac_server):
    url, info = stac_server
    with pytest.raises(DataError) as err:
        search_items(_cfg(url), box(*info.aoi_wgs84), "2023-01-01", "2023-01-31")
    assert str(err.value) == ("no Sentinel-2 items in sentinel-2-l2a intersect the region between 2023-01-01T00:00:00Z "
                              "and 2023-01-31T23:59:59Z: widen the time range or check the region")


def test_everything_too_cloudy_message(stac_server):
    url, info = stac_server
    with pytest.raises(DataError, match=r"have eo:cloud_cover <= 0.01: raise max_cloud_cover"):
        search_items(_cfg(url), box(-89.95, 41.85, -89.91, 41.87), "2024-07-11", "2024-07-11", max_cloud_cover=0.01)


def test_catalog_down_message():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DataError) as err:
        search_items(_cfg(url), box(0, 0, 1, 1), "2024-07-01", "2024-07-02")
    assert str(err.value) == f"STAC API at {url} is unreachable: Connection refused: check the URL and that the server is up"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers '/' with a canned status/body; other paths 404. Set on a subclass."""

    replies: list[tuple[int, bytes]] = []
    upstream: str | None = None

    def do_GET(self):  # noqa: N802 - http.server API
        status, body = self.replies.pop(0) if self.replies else (200, None)
        if body is None and self.upstream:
            with urllib.request.urlopen(self.upstream + self.path) as resp:
                body = resp.read()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_api():
    """Start a one-route HTTP server; yields a function (replies, upstream) -> url."""
    servers = []

    def start(replies, upstream=None):
        handler = type("H", (_Handler,), {"replies": list(replies), "upstream": upstream})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_malformed_response_message(fake_api):
    url = fake_api([(200, b"<html>not a STAC API</html>")])
    with pytest.raises(DataError) as err:
        search_items(_cfg(url), box(0, 0, 1, 1), "2024-07-01", "2024-07-02")
    assert str(err.value).startswith(f"STAC API at {url} sent a malformed response (JSONDecodeError")
    assert str(err.value).endswith("check stac.url points at a STAC API root")


def test_http_error_message(fake_api):
    url = fake_api([(404, b'{"code": "NotFound"}')])
    with pytest.raises(DataError, match=rf"^STAC API at {url} answered HTTP 404: .*: check stac.url and stac.collection$"):
        search_items(_cfg(url, retries=0), box(0, 0, 1, 1), "2024-07-01", "2024-07-02")


def test_transient_errors_are_retried(fake_api, stac_server):
    """Two 503s on the landing page, then the real one: the search still succeeds."""
    upstream, info = stac_server
    url = fake_api([(503, b""), (503, b"")], upstream=upstream)
    items = search_items(_cfg(url, retries=2), box(*info.aoi_wgs84), *info.time_range)
    assert len(items) == len(info.item_ids)
    with pytest.raises(DataError, match="is unreachable: .*503"):
        search_items(_cfg(fake_api([(503, b"")] * 3, upstream=upstream), retries=1), box(*info.aoi_wgs84), *info.time_range)
