"""Ray workers run the core only: a chip-read task never imports Hydra or OmegaConf.

This module imports neither (Ray imports it on the worker to find the remote function).
"""

from __future__ import annotations

import json
import pickle

import pytest
import ray
import shapely

from raysam.grid import make_date_group, plan_chip_tasks
from raysam.pipeline import read_stage
from raysam.plan import SCL_BAND
from raysam.selection import select_per_date
from raysam.stac import parse_item

pytestmark = pytest.mark.slow
CONFIG_PACKAGES = ("hydra", "omegaconf")


@ray.remote(num_cpus=1)
def read_in_worker(stage_module: str, task_blob: bytes) -> tuple[str, list[str]]:
    """Import the read stage's module as Ray Data does, read one chip; the config modules loaded."""
    import importlib
    import sys

    from raysam.read import read_chip

    importlib.import_module(stage_module)
    chip = read_chip(pickle.loads(task_blob), max_cloud_fraction=1.0)
    return type(chip).__name__, sorted(m for m in sys.modules if m.split(".")[0] in CONFIG_PACKAGES)


def test_a_chip_read_task_never_imports_hydra(ray_local, demo_catalog):
    items = [parse_item(json.loads(p.read_text())) for p in sorted(demo_catalog.items_dir.glob("*.json"))]
    aoi = shapely.box(*demo_catalog.aoi_wgs84)
    selection = select_per_date(items, aoi)[0]
    group = make_date_group("demo", selection.date, selection.items, aoi)
    task = next(iter(plan_chip_tasks(group, ("R", "G", "B", SCL_BAND))))
    chip, loaded = ray.get(read_in_worker.remote(read_stage.__module__, pickle.dumps(task)))
    assert chip == "ChipPixels"
    assert loaded == []
