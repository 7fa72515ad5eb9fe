"""Shared pytest fixtures.

Catalog and STAC API (owned by the STAC part):
    demo_catalog  session: the synthetic Sentinel-2 catalog (raysam.demo.catalog), built once.
    stac_server   session: (url, CatalogInfo) of a live ``rustac serve`` over that catalog.
    demo_selection session: the demo region (conf/region/demo.yaml) searched and selected per date.

Ray:
    ray_local     module: a small local Ray instance (2 CPUs), shut down after the module.

Every Ray node the tests start (here, in subprocesses, in clusters) inherits
``RAY_local_fs_capacity_threshold``: Ray refuses to spill objects once the disk holding its session
is 95 % full, and CI's disk, shared with other work, has sat above that. The tests spill a few
hundred MB at most, so their nodes spill until the disk is really full.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raysam.demo.catalog import CatalogInfo, make_demo_catalog
from raysam.demo.serve import free_port, serve_catalog
from tests.helpers import start_local_ray

os.environ["RAY_local_fs_capacity_threshold"] = "0.999"


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


@pytest.fixture(scope="session")
def demo_selection(stac_server):
    """(region, CatalogInfo, {date: DateSelection}): the demo region searched, deduplicated, selected."""
    import yaml

    from raysam.region import RegionSpec, load_region
    from raysam.selection import select_per_date
    from raysam.stac import StacConfig, dedupe_reprocessed, search_items

    url, info = stac_server
    cfg = yaml.safe_load((Path(__file__).parent.parent / "conf/region/demo.yaml").read_text())["region"]
    region = load_region(RegionSpec(cfg["name"], cfg["geometry"], tuple(cfg["time_range"])))
    items = search_items(StacConfig(kind="local", url=url), region.aoi_wgs84, region.start_utc,
                         region.end_utc)
    selections = select_per_date(dedupe_reprocessed(items), region.aoi_wgs84,
                                 region.min_tile_cover)
    return region, info, {f"{s.date:%Y-%m-%d}": s for s in selections}


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance with 2 CPUs for the module's tests."""
    import ray

    start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
