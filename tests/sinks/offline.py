"""Run a validator's real command-line entry point with no network, schemas read from local copies.

Usage (any Python that has the validator installed; this file imports nothing from raysam):

    python offline.py [--schemas index.json] MODULE:FUNCTION ARG...

Every attempt to resolve a host name or to open an internet socket raises (an audit hook), and
each attempt is listed on stderr; the exit status is then 3 whatever the validator said, so a
validator that quietly fell back to the network can never pass. ``--schemas`` names a JSON
file mapping schema URLs to local files (paths relative to that file). fiboa-cli (vecorel-cli)
accepts a URL -> file map only for the fiboa schemas (``-s``); the GeoParquet schema it loads
by URL and the PROJJSON schema referenced from it are served from the same copies by filling
vecorel-cli's own cache of loaded files and its ``$ref`` retriever.
"""

from __future__ import annotations

import importlib
import json
import socket
import sys
from pathlib import Path

NETWORK_EVENTS = ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
                  "socket.gethostbyaddr", "urllib.Request")
attempts: list[str] = []


def _no_network(event: str, args: tuple) -> None:
    if event == "socket.connect":
        family = getattr(args[0], "family", None)
        if family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(f"{event} {args[1]!r}")
            raise OSError(f"offline: blocked {event} to {args[1]!r}")
    elif event in NETWORK_EVENTS:
        attempts.append(f"{event} {args[:2]!r}")
        raise OSError(f"offline: blocked {event} {args[:2]!r}")


def _serve_vecorel_schemas(local: dict[str, Path]) -> None:
    """Make vecorel-cli read every mapped schema URL from its local copy."""
    import referencing
    import referencing.jsonschema
    from vecorel_cli.validate_schema import ValidateSchema
    from vecorel_cli.vecorel import util

    for url, path in local.items():
        util.file_cache[url] = util.load_file(path)

    def retrieve(uri: str) -> referencing.Resource:
        if uri not in local:
            raise OSError(f"offline: no local copy of {uri}")
        return referencing.Resource.from_contents(
            json.loads(local[uri].read_text()), default_specification=referencing.jsonschema.DRAFT202012)

    ValidateSchema.retrieve_remote_schema = staticmethod(retrieve)


def main(argv: list[str]) -> int:
    local: dict[str, Path] = {}
    if argv[:1] == ["--schemas"]:
        index = Path(argv[1])
        local = {url: index.parent / rel for url, rel in json.loads(index.read_text()).items()}
        argv = argv[2:]
    target, args = argv[0], argv[1:]
    sys.addaudithook(_no_network)
    if target.startswith(("fiboa_cli", "vecorel_cli")):
        _serve_vecorel_schemas(local)
    module, function = target.split(":")
    sys.argv = [target, *args]
    try:  # fiboa_cli.cli.setup runs its command line when imported
        status = getattr(importlib.import_module(module), function)()
    except SystemExit as done:
        status = done.code
    status = status if isinstance(status, int) else (0 if status in (None, True) else 1)
    if attempts:
        print("offline: network access attempted:\n  " + "\n  ".join(attempts), file=sys.stderr)
        return 3
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
