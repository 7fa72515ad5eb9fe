"""The third-party validators, run for real and offline on any output file.

Each function takes one path (a file, or a folder where the validator accepts one) and returns
``(ok, report)``; the report is the validator's own output, for the assertion message. Every
validator runs in a subprocess under ``offline.py``, which blocks all internet sockets and fails
the run if one was attempted; the schemas they would download come from ``tests/data/schemas``
(copies, see its README) and from the files pystac ships.

fiboa-cli pins pyarrow < 24 and fsspec == 2025.7.0 (through vecorel-cli), so it lives in its own
virtual environment: ``.venv/fiboa`` (made by ``scripts/bootstrap.sh dev``) or
``$RAYSAM_FIBOA_PYTHON``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from functools import cache
from importlib import resources
from pathlib import Path

HERE = Path(__file__).parent
OFFLINE = HERE / "offline.py"
SCHEMA_INDEX = HERE.parent / "data" / "schemas" / "index.json"
STAC_VERSION = "1.1.0"
TIMEOUT_S = 300
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # fiboa-cli colours its output even when piped


def _run(python: str | Path, *args: str | Path) -> tuple[bool, str]:
    proc = subprocess.run([str(python), str(OFFLINE), *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    report = ANSI_ESCAPE.sub("", f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc.returncode == 0, report


def fiboa_python() -> Path:
    """The Python of fiboa-cli's own environment."""
    python = Path(os.environ.get("RAYSAM_FIBOA_PYTHON") or Path(sys.prefix) / "fiboa" / "bin" / "python")
    if not python.exists():
        raise FileNotFoundError(f"fiboa-cli's environment is missing ({python}): run scripts/bootstrap.sh dev, "
                                "or point RAYSAM_FIBOA_PYTHON at a Python with fiboa-cli==0.21.0")
    return python


def fiboa_validate(*paths: Path, schema_index: Path = SCHEMA_INDEX) -> tuple[bool, str]:
    """``fiboa validate -n -1`` (every row) on GeoParquet files."""
    return _run(fiboa_python(), "--schemas", schema_index, "fiboa_cli.cli.setup:run", "validate", "-n", "-1", *paths)


@cache
def stac_schema_map() -> dict[str, str]:
    """Schema URL -> local file for stac-validator: pystac's STAC core and GeoJSON copies, ours for the rest."""
    jsonschemas = resources.files("pystac.validation") / "jsonschemas"
    core = jsonschemas / "stac-spec" / f"v{STAC_VERSION}"
    base = f"https://schemas.stacspec.org/v{STAC_VERSION}"
    mapping = {f"{base}/{kind}-spec/json-schema/{kind}.json": core / f"{kind}.json"
               for kind in ("item", "collection", "catalog")}
    mapping |= {f"{base}/item-spec/json-schema/{p.name}": p for p in core.iterdir()
                if p.name.endswith(".json") and p.name not in ("item.json", "collection.json", "catalog.json")}
    mapping |= {f"https://geojson.org/schema/{name}.json": jsonschemas / "geojson" / f"{name}.json"
                for name in ("Feature", "Geometry")}
    mapping |= {url: SCHEMA_INDEX.parent / rel for url, rel in json.loads(SCHEMA_INDEX.read_text()).items()}
    return {url: str(path) for url, path in mapping.items()}


def stac_validate(path: Path, schema_map: dict[str, str] | None = None) -> tuple[bool, str]:
    """``stac-validator validate`` (core and extensions) on one Item or Collection JSON file."""
    schema_map = stac_schema_map() if schema_map is None else schema_map
    args = [a for url, local in schema_map.items() for a in ("--schema-map", url, local)]
    ok, report = _run(sys.executable, "stac_validator.stac_validator:cli", "validate", *args, path)
    results = json.loads(report[report.index("["):report.rindex("]") + 1]) if "[" in report else []
    return ok and bool(results) and all(r.get("valid_stac") for r in results), report


def cogeo_validate(path: Path) -> tuple[bool, str]:
    """``rio cogeo validate --strict``."""
    return _run(sys.executable, "rasterio.rio.main:main_group", "cogeo", "validate", "--strict", path)


def geoparquet_validate(path: Path) -> tuple[bool, str]:
    """``geoparquet-validator check --class all`` (core, covering, distribution) on a file or folder."""
    return _run(sys.executable, "geoparquet_validator:main", "check", "--class", "all", path)


def spatial_extension_path() -> Path:
    """The DuckDB spatial extension file shipped by the ``duckdb-extension-spatial`` wheel."""
    import duckdb_extension_spatial

    return next(Path(duckdb_extension_spatial.__file__).parent.glob("extensions/*/spatial.duckdb_extension"))


def duckdb_connection():
    """A DuckDB connection with the spatial extension loaded by path; it never downloads extensions."""
    import duckdb

    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    con.execute(f"LOAD '{spatial_extension_path()}'")
    return con
