"""Serving the demo catalog: a local STAC API over its items, and items rebased onto a URL.

Owns :func:`serve_catalog` (``rustac serve`` on 127.0.0.1 with the memory backend, waited on
until its root answers), :func:`rebase_catalog` (a copy of a catalog's items whose asset hrefs
point at an HTTP server instead of local files) and :func:`free_port`. Nothing here renders or
writes the catalog itself: that is :mod:`raysam.demo.catalog`'s job.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from raysam.demo.catalog import CatalogInfo, asset_href
from raysam.errors import ConfigError, DataError


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
            asset["href"] = asset_href(path.resolve(), root, base_url)
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
