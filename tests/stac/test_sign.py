"""Late href signing: identity for local catalogs; planetary_computer's own token code path
pointed at a local SAS token server (no internet), with caching, re-signing and a hidden key."""

import http.server
import json
import logging
import pickle
import threading
from datetime import datetime, timedelta, timezone

import pytest
from planetary_computer import sas
from planetary_computer.settings import Settings

from raysam.errors import DataError
from raysam.signing import make_href_signer, signer_spec
from raysam.stac import StacConfig

KEY = "pc-secret-key-0123456789"
HREF = "https://sentinel2l2a01.blob.core.windows.net/sentinel2-l2/15/T/YG/2024/07/06/B04_10m.tif"


class _TokenHandler(http.server.BaseHTTPRequestHandler):
    """A Planetary Computer SAS token endpoint: GET /token/<account>/<container>."""

    def do_GET(self):  # noqa: N802 - http.server API
        server = self.server
        server.requests.append((self.path, self.headers.get("Ocp-Apim-Subscription-Key")))
        if server.status != 200:
            self.send_response(server.status)
            self.end_headers()
            return
        expiry = datetime.now(timezone.utc) + server.ttl
        body = {"msft:expiry": expiry.strftime("%Y-%m-%dT%H:%M:%SZ"), "token": f"st=x&se=y&sp=rl&sig=tok{len(server.requests)}"}
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def token_server(monkeypatch):
    """A local token endpoint that planetary_computer's get_token talks to (via Settings.sas_url)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenHandler)
    server.requests, server.status, server.ttl = [], 200, timedelta(hours=1)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = Settings.get()
    monkeypatch.setattr(settings, "sas_url", f"http://127.0.0.1:{server.server_address[1]}/token")
    monkeypatch.setattr(settings, "subscription_key", None)
    monkeypatch.setattr(sas, "TOKEN_CACHE", {})
    monkeypatch.delenv("PC_SDK_SUBSCRIPTION_KEY", raising=False)
    yield server
    server.shutdown()
    server.server_close()


def test_local_kind_is_identity():
    signer = make_href_signer(StacConfig(kind="local", url="http://127.0.0.1:1"))
    assert signer(HREF) == HREF and signer.resign("/data/B04.tif") == "/data/B04.tif"
    assert make_href_signer(StacConfig(sign=False))(HREF) == HREF


def test_key_hidden_from_repr_and_str():
    cfg = StacConfig(pc_key=KEY)
    assert KEY not in repr(cfg) and KEY not in str(cfg) and "pc_key='***'" in repr(cfg)
    assert KEY not in repr(make_href_signer(cfg))


def test_signs_with_key_from_param_and_caches(token_server, caplog):
    caplog.set_level(logging.DEBUG)
    signer = make_href_signer(StacConfig(pc_key=KEY))
    first = signer(HREF)
    assert first == f"{HREF}?st=x&se=y&sp=rl&sig=tok1"
    assert token_server.requests == [("/token/sentinel2l2a01/sentinel2-l2", KEY)]
    other = HREF.replace("B04", "B03")
    assert signer(other) == f"{other}?st=x&se=y&sp=rl&sig=tok1"  # same container: cached token
    assert len(token_server.requests) == 1
    assert signer.resign(HREF) == f"{HREF}?st=x&se=y&sp=rl&sig=tok2"  # the 403 path: fresh token
    assert len(token_server.requests) == 2
    assert KEY not in caplog.text


def test_key_from_environment(token_server, monkeypatch):
    monkeypatch.setenv("PC_SDK_SUBSCRIPTION_KEY", "env-key-42")
    make_href_signer(StacConfig())(HREF)
    assert token_server.requests[-1][1] == "env-key-42"


def test_token_near_expiry_is_refreshed(token_server):
    token_server.ttl = timedelta(minutes=2)  # inside the 5-minute refresh margin
    signer = make_href_signer(StacConfig(pc_key=KEY))
    signer(HREF)
    signer(HREF)
    assert len(token_server.requests) == 2


def test_non_azure_hrefs_pass_through(token_server):
    signer = make_href_signer(StacConfig(pc_key=KEY))
    for href in ("/tmp/B04.tif", "https://example.com/B04.tif", HREF + "?st=already&se=x&sp=r"):
        assert signer(href) == href
    assert token_server.requests == []


def test_refused_token_message_hides_key(token_server):
    token_server.status = 401
    with pytest.raises(DataError) as err:
        make_href_signer(StacConfig(pc_key=KEY, retries=0))(HREF)
    assert str(err.value) == ("could not get a Planetary Computer SAS token for sentinel2l2a01/sentinel2-l2 (HTTP 401): "
                              "HTTPError: check the network and PC_SDK_SUBSCRIPTION_KEY / stac.pc_key")
    assert KEY not in str(err.value) and err.value.__cause__ is None


def test_workers_sign_with_their_environments_key_never_a_pickled_one(token_server, monkeypatch):
    spec = signer_spec(StacConfig(pc_key=KEY))
    blob = pickle.dumps(spec)
    assert KEY.encode() not in blob
    monkeypatch.setenv("PC_SDK_SUBSCRIPTION_KEY", "worker-env-key")
    signer = make_href_signer(pickle.loads(blob))
    assert signer(HREF) == f"{HREF}?st=x&se=y&sp=rl&sig=tok1"
    assert token_server.requests == [("/token/sentinel2l2a01/sentinel2-l2", "worker-env-key")]
    assert make_href_signer(signer_spec(StacConfig(kind="local", url="http://127.0.0.1:1")))(HREF) == HREF
