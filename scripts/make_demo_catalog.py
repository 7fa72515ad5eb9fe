#!/usr/bin/env python
"""Write the synthetic Sentinel-2 demo catalog and optionally serve it as a STAC API.

    .venv/bin/python scripts/make_demo_catalog.py [--root demo_data/catalog] [--seed 0] [--serve PORT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from raysam.demo.catalog import DEMO_ROOT, make_demo_catalog
from raysam.demo.serve import serve_catalog
from raysam.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    """Build (or reuse) the catalog, print its summary, serve it until Ctrl-C if asked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEMO_ROOT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-url", default=None, help="asset hrefs become BASE_URL/cogs/... instead of file paths")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--serve", type=int, metavar="PORT", help="serve the items with rustac on 127.0.0.1:PORT")
    args = parser.parse_args(argv)

    def build_and_serve() -> None:
        info = make_demo_catalog(args.root, seed=args.seed, base_url=args.base_url, overwrite=args.overwrite)
        print(json.dumps({"root": str(info.root), "aoi_wgs84": info.aoi_wgs84, "time_range": info.time_range,
                          "items": len(info.item_ids), "size_mb": round(info.size_bytes / 1e6, 1)}))
        if args.serve:
            proc = serve_catalog(info.root, args.serve)
            print(f"STAC API at http://127.0.0.1:{args.serve}/ (Ctrl-C to stop)")
            try:
                proc.wait()
            except KeyboardInterrupt:
                proc.terminate()

    return run_cli(build_and_serve)


if __name__ == "__main__":
    sys.exit(main())
