"""Shared pytest fixtures.

Catalog and STAC API (owned by the STAC part):
    demo_catalog  session: the synthetic Sentinel-2 catalog (raysam.demo.catalog), built once.
    stac_server   session: (url, CatalogInfo) of a live ``rustac serve`` over that catalog.
"""

from __future__ import annotations

import pytest

from raysam.demo.catalog import CatalogInfo, free_port, make_demo_catalog, serve_catalog


@pytest.fixture(scope="session")
def demo_catalog(tmp_path_factory: pytest.TempPathFactory) -> CatalogInfo:
    """The demo catalog, generated once per test session into a temporary directory."""
    return make_demo_catalog(tmp_path_factory.mktemp("demo") / "catalog", seed=0)


@pytest.fixture(scope="session")
def stac_server(demo_catalog: CatalogInfo):
    """A live STAC API (rustac, memory backend) serving the demo catalog: yields (url, info)."""
    port = free_port()
    proc = serve_catalog(demo_catalog.root, port)
    try:
        yield f"http://127.0.0.1:{port}", demo_catalog
    finally:
        proc.terminate()
        proc.wait(timeout=10)
