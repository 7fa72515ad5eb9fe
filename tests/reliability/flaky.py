"""Fault-injecting HTTP servers for the flaky-network tests.

:class:`FlakyFileServer` serves a directory (the demo catalog's COGs) with HTTP range requests,
single and multipart, as GDAL's ``/vsicurl/`` issues them. :class:`FlakyProxy` sits in front of
another HTTP server (``rustac serve``) and forwards GET/POST, rewriting the upstream's own URL
in the bodies it returns so that ``next`` links lead back through the proxy.

Both fail a configurable share of requests with :class:`Faults`: an HTTP 5xx answer, a
connection reset (RST before any byte), or a stall (no answer until the client has timed out,
then a close). Whether a request fails is a pure function of (seed, request key, attempt
number for that key), so a run sees the same faults whatever order its threads ask in, and
at ``rate=1.0`` every attempt fails. Every attempt is counted per key.

:class:`FlakyFileServer` can also demand a token (``?token=...``, as a SAS-signed URL): with
:meth:`FlakyFileServer.expire_token` the current one becomes stale and requests carrying it get
HTTP 403 until the client fetches the new one (:attr:`FlakyFileServer.token`).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

FAULT_KINDS = ("status", "reset", "stall")
RANGE_RE = re.compile(r"(\d*)-(\d*)")
BOUNDARY = "raysam-flaky-boundary"


@dataclass(frozen=True)
class Faults:
    """Which requests fail, and how.

    Attributes:
        rate: share of attempts that fail, in [0, 1].
        kinds: fault kinds drawn from: ``status`` (HTTP ``status``), ``reset`` (TCP RST),
            ``stall`` (silence for ``stall_s``, then close).
        seed: makes the draw reproducible.
        stall_s: how long a stall lasts; make it longer than the client's timeout.
        status: the HTTP status of a ``status`` fault.
    """

    rate: float = 0.0
    kinds: tuple[str, ...] = FAULT_KINDS
    seed: int = 0
    stall_s: float = 3.0
    status: int = 503

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0 or not self.kinds or set(self.kinds) - set(FAULT_KINDS):
            raise ValueError(f"bad faults {self}: rate in [0, 1], kinds from {FAULT_KINDS}")

    def draw(self, key: str, attempt: int) -> str | None:
        """The fault for the ``attempt``-th request with this key, or None (serve it)."""
        digest = hashlib.sha256(f"{self.seed}|{key}|{attempt}".encode()).digest()
        unit = int.from_bytes(digest[:8], "big") / 2.0**64
        return self.kinds[digest[8] % len(self.kinds)] if unit < self.rate else None


class _Counts:
    """Thread-safe counters: attempts per key and per path, faults per kind, 403s."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.attempts: Counter[str] = Counter()
        self.paths: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.forbidden: Counter[str] = Counter()
        self.forbidden_opens: Counter[str] = Counter()  # 403s of a request that opens the file (no range, or from byte 0)

    def attempt(self, key: str, path: str) -> int:
        """Count one attempt; return its number for this key (1, 2, ...)."""
        with self._lock:
            self.attempts[key] += 1
            self.paths[path] += 1
            return self.attempts[key]

    def fault(self, kind: str) -> None:
        with self._lock:
            self.faults[kind] += 1

    def refuse(self, path: str, first_byte: int | None) -> None:
        with self._lock:
            self.forbidden[path] += 1
            self.forbidden_opens[path] += not first_byte

    def reset(self) -> None:
        with self._lock:
            for counter in (self.attempts, self.paths, self.faults, self.forbidden, self.forbidden_opens):
                counter.clear()


class _FaultyHandler(BaseHTTPRequestHandler):
    """Draws a fault for each request and acts it out; subclasses serve the healthy ones."""

    protocol_version = "HTTP/1.1"
    server: _FlakyServer

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - keep test output quiet
        return

    def _request_key(self, body: bytes) -> str:
        extra = hashlib.sha256(body).hexdigest()[:16] if body else ""
        return f"{self.command} {urlsplit(self.path).path} {self.headers.get('Range', '')} {extra}"

    def _inject(self, body: bytes = b"") -> bool:
        """Count the attempt and act out its fault; True if one was injected."""
        key = self._request_key(body)
        attempt = self.server.counts.attempt(key, urlsplit(self.path).path)
        kind = self.server.faults.draw(key, attempt)
        if kind is None:
            return False
        self.server.counts.fault(kind)
        self.close_connection = True
        if kind == "status":
            self._send(self.server.faults.status, b"injected fault\n", {"Content-Type": "text/plain"})
        elif kind == "reset":  # RST (linger 0, closed without shutdown), no byte of an answer
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            os.close(self.connection.detach())
        else:
            time.sleep(self.server.faults.stall_s)
        return True

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _FlakyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, handler: type[_FaultyHandler], faults: Faults):
        super().__init__(("127.0.0.1", 0), handler)
        self.faults = faults
        self.counts = _Counts()


class _Serving:
    """Start/stop a server on a daemon thread; ``with`` support; fault and count access."""

    def __init__(self, server: _FlakyServer):
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (no trailing slash)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def counts(self) -> _Counts:
        return self._server.counts

    @property
    def faults(self) -> Faults:
        return self._server.faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        self._server.faults = faults

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------- files with range requests


def _ranges(header: str | None, size: int) -> list[tuple[int, int]] | None:
    """Inclusive (start, end) byte ranges of a ``Range: bytes=...`` header; None: whole file."""
    if not header or not header.startswith("bytes="):
        return None
    out = []
    for part in header[len("bytes="):].split(","):
        match = RANGE_RE.fullmatch(part.strip())
        if not match or match.groups() == ("", ""):
            return None
        first, last = match.groups()
        start, end = (size - int(last), size - 1) if first == "" else (int(first), min(int(last or size - 1), size - 1))
        if start <= end:
            out.append((max(start, 0), end))
    return out


class _FileHandler(_FaultyHandler):
    server: _FileServer

    def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        if self._forbidden() or self._inject():
            return
        path = self.server.root / urlsplit(self.path).path.lstrip("/")
        if not path.resolve().is_relative_to(self.server.root) or not path.is_file():
            self._send(404, b"not found\n", {"Content-Type": "text/plain"})
            return
        self._send_ranges(path)

    def _forbidden(self) -> bool:
        """HTTP 403 for a missing or stale token (when the server wants one)."""
        if self.server.token is None:
            return False
        token = parse_qs(urlsplit(self.path).query).get("token", [None])[0]
        if token == self.server.token:
            return False
        ranges = _ranges(self.headers.get("Range"), 2**62)
        self.server.counts.refuse(urlsplit(self.path).path, ranges[0][0] if ranges else None)
        self._send(403, b"AuthenticationFailed: signature expired\n", {"Content-Type": "text/plain"})
        return True

    def _send_ranges(self, path: Path) -> None:
        data = path.read_bytes()
        ranges = _ranges(self.headers.get("Range"), len(data))
        if ranges is None:
            self._send(200, data, {"Content-Type": "image/tiff", "Accept-Ranges": "bytes"})
        elif not ranges:
            self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
        elif len(ranges) == 1:
            (start, end), = ranges
            self._send(206, data[start:end + 1], {"Content-Type": "image/tiff",
                                                   "Content-Range": f"bytes {start}-{end}/{len(data)}"})
        else:
            parts = [f"--{BOUNDARY}\r\nContent-Type: image/tiff\r\nContent-Range: bytes {s}-{e}/{len(data)}\r\n\r\n"
                     .encode() + data[s:e + 1] + b"\r\n" for s, e in ranges]
            body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
            self._send(206, body, {"Content-Type": f"multipart/byteranges; boundary={BOUNDARY}"})


class _FileServer(_FlakyServer):
    def __init__(self, root: Path, faults: Faults):
        super().__init__(_FileHandler, faults)
        self.root = Path(root).resolve()
        self.token: str | None = None


class FlakyFileServer(_Serving):
    """Serves the files under ``root`` over HTTP with range requests and injected faults.

    Args:
        root: directory served at ``/``.
        faults: what fails (default: nothing).
        require_token: demand ``?token=<current token>`` (403 otherwise).
    """

    def __init__(self, root: Path, faults: Faults = Faults(), require_token: bool = False):
        super().__init__(_FileServer(root, faults))
        self._generation = 0
        if require_token:
            self.expire_token()

    @property
    def token(self) -> str | None:
        """The token the server accepts now (what a signing service would hand out)."""
        return self._server.token

    def expire_token(self) -> None:
        """Make the current token stale: requests carrying it get HTTP 403 from now on."""
        self._generation += 1
        self._server.token = f"gen{self._generation}-{os.urandom(4).hex()}"


# ---------------------------------------------------------------- proxy in front of an API


class _ProxyHandler(_FaultyHandler):
    server: _ProxyServer

    def do_GET(self) -> None:  # noqa: N802
        self._forward(b"")

    def do_POST(self) -> None:  # noqa: N802
        self._forward(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

    def _forward(self, body: bytes) -> None:
        if self._inject(body):
            return
        upstream = urlsplit(self.server.upstream)
        conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read().replace(self.server.upstream.encode(), self.server.public_url.encode())
            keep = {k: v for k, v in resp.getheaders()
                    if k.lower() not in ("content-length", "connection", "transfer-encoding", "content-encoding")}
            self._send(resp.status, data, keep)
        finally:
            conn.close()


class _ProxyServer(_FlakyServer):
    def __init__(self, upstream: str, faults: Faults):
        super().__init__(_ProxyHandler, faults)
        self.upstream = upstream.rstrip("/")
        self.public_url = f"http://127.0.0.1:{self.server_address[1]}"


class FlakyProxy(_Serving):
    """An HTTP proxy in front of ``upstream`` (e.g. ``rustac serve``) with injected faults.

    Args:
        upstream: ``http://host:port`` of the real server; its URL in response bodies is
            replaced by the proxy's, so links (``next`` pages) come back through the proxy.
        faults: what fails (default: nothing).
    """

    def __init__(self, upstream: str, faults: Faults = Faults()):
        super().__init__(_ProxyServer(upstream, faults))
