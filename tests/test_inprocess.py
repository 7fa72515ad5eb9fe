"""A small run on this machine goes without Ray (raysam.inprocess) and writes what Ray writes."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio

from raysam.driver import prepare
from raysam.inprocess import runs_in_process
from tests.helpers import child_env, demo_run_command, short_tmp_dir
from tests.reliability.conftest import demo_config

DEMO_CHIPS = 16  # the demo region's chips, both dates (8 each)


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.glob("demo/**/*")) if p.is_file()}


def _manifests(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("demo/*/*/manifest.json"))]


@pytest.mark.slow
def test_a_small_run_goes_without_ray_and_writes_what_ray_writes(demo_catalog, tmp_path):
    """The demo region (16 chips, every sink) in process and on Ray: the same files, the same label
    and Sentinel-2 pixels, the same polygons. The in-process run starts no Ray session."""
    runs = {}
    for name, extra in (("in-process", []), ("ray", ["ray.in_process_max_chips=0"])):
        out = tmp_path / name
        cmd = demo_run_command(demo_catalog, out, tmp_path / f"hydra-{name}", "region=demo", "model=demo",
                               "sam.points_per_side=8", *extra)
        with short_tmp_dir() as ray_tmp:
            result = subprocess.run(cmd, capture_output=True, text=True, env=child_env(ray_tmp), timeout=600)
            assert result.returncode == 0, result.stderr[-3000:]
            sessions = list(ray_tmp.glob("ray/session_*"))
        assert bool(sessions) == (name == "ray"), f"{name}: Ray sessions {sessions}"
        assert {m["executor"] for m in _manifests(out)} == {name}
        runs[name] = out

    a, b = _files(runs["in-process"]), _files(runs["ray"])
    assert sorted(a) == sorted(b)
    assert sum(m["counts"]["chips_segmented"] for m in _manifests(runs["in-process"])) == DEMO_CHIPS
    for ma, mb in zip(_manifests(runs["in-process"]), _manifests(runs["ray"]), strict=True):
        for key in ("chips_segmented", "chips_skipped", "masks_before_merge", "masks_after_merge", "decoder_prompts"):
            assert ma["counts"][key] == mb["counts"][key], key
    compared = 0
    for rel, path in a.items():
        if rel.endswith(".tif"):
            with rasterio.open(path) as x, rasterio.open(b[rel]) as y:
                assert (x.crs, x.transform, x.shape) == (y.crs, y.transform, y.shape), rel
                assert np.array_equal(x.read(), y.read()), rel
        elif rel.endswith(".parquet"):
            assert pq.read_table(path).equals(pq.read_table(b[rel])), rel
        else:
            continue
        compared += 1
    assert compared >= 10  # labels and S2 band COGs and tiles, polygon parts and single files


def test_runs_in_process_only_on_this_machine_and_up_to_the_chip_limit(demo_catalog, tmp_path, monkeypatch):
    """The demo's 16 chips go in process up to ``ray.in_process_max_chips`` 16, not at 15 or 0;
    checkpointed chips do not count; a cluster's address (config or ``RAY_ADDRESS``) always means Ray."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = demo_config(demo_catalog, tmp_path / "out")
    todo = prepare(cfg).plan.todo
    assert len(todo) == 2

    def with_limit(limit: int, **ray_cfg) -> object:
        return replace(cfg, ray=replace(cfg.ray, in_process_max_chips=limit, **ray_cfg))

    assert runs_in_process(with_limit(DEMO_CHIPS), todo)
    assert not runs_in_process(with_limit(DEMO_CHIPS - 1), todo)
    assert not runs_in_process(with_limit(0), todo)
    resumed = (replace(todo[0], chips_checkpointed=3), todo[1])
    assert runs_in_process(with_limit(DEMO_CHIPS - 3), resumed)
    assert not runs_in_process(with_limit(DEMO_CHIPS - 4), resumed)
    assert runs_in_process(with_limit(DEMO_CHIPS, address="local"), todo)
    assert not runs_in_process(with_limit(10_000, address="auto"), todo)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert not runs_in_process(with_limit(10_000), todo)
