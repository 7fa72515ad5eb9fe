"""Lost workers: a worker node removed mid-run, a SAM actor SIGKILLed mid-run, Ray Data's retries.

The cluster (tests/reliability/conftest.py ``gpu_cluster``) is a CPU-less head plus one worker
node with 2 CPUs and 1 logical GPU, so every read task and the SAM actor (``ray.gpus_per_actor=1``)
run on a node that can be lost. The whole demo region (2 date groups, 16 chips) runs once
undisturbed; the disturbed runs must publish the same files with the same contents (mask
polygons and attributes, label pixels), not merely finish. Faults are injected after a few
chips have gone through SAM (polled from the run's ``RunStats`` actor); each SAM call sleeps
0.4 s (``RAYSAM_SAM_CHIP_DELAY_S``) so that most of the region is still to do at that point.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import ray

from raysam.config import RayConfig
from raysam.errors import DataError
from raysam.pipeline import configure_retries
from raysam.runstats import STATS_ACTOR
from raysam.run import run
from tests.reliability.conftest import demo_config, wait_for

pytestmark = pytest.mark.slow

DEMO_CHIPS = 16  # the demo region: 2 date groups x 8 chips (dry run)
FAULT_AFTER_CHIPS = 3
RUN_TIMEOUT_S = 420
OVERRIDES = ("sam.points_per_side=4", "sam.points_per_batch=16", "output.sinks=[segmentation_mask]",
             "ray.gpus_per_actor=1", "ray.cpus_per_actor=1", "ray.sam_actors=1", "device=cpu")


def _published(root: Path) -> dict[str, Path]:
    """Every published file under an output root, by path relative to it."""
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_outputs(expected_root: Path, actual_root: Path) -> None:
    """Same set of files; same polygon rows (geometry WKB and attributes); same label pixels."""
    expected, actual = _published(expected_root), _published(actual_root)
    assert sorted(actual) == sorted(expected)
    parquets = [k for k in expected if k.endswith("masks.parquet")]
    assert len(parquets) == 2
    for key in parquets:
        want, got = pq.read_table(expected[key]), pq.read_table(actual[key])
        assert got.num_rows == want.num_rows > 0
        assert got.equals(want), f"{key}: rows differ"
    for key in (k for k in expected if k.endswith(".parquet") and "/masks/" in k):
        assert pq.read_table(actual[key]).equals(pq.read_table(expected[key])), f"{key}: rows differ"
    for key in (k for k in expected if k.endswith(".tif") and "labels" in k):
        with rasterio.open(expected[key]) as a, rasterio.open(actual[key]) as b:
            assert (a.crs, a.transform, a.shape) == (b.crs, b.transform, b.shape)
            np.testing.assert_array_equal(a.read(1), b.read(1))


def _stats_actor():
    try:
        return ray.get_actor(STATS_ACTOR)
    except ValueError:
        return None


def _chips_done() -> int:
    stats = _stats_actor()
    return ray.get(stats.chips_done.remote()) if stats is not None else 0


def _manifest_resources(root: Path) -> dict:
    import json

    manifests = sorted(root.rglob("manifest.json"))
    assert len(manifests) == 2
    return json.loads(manifests[-1].read_text())["counts"]["resources"]


class RunInThread:
    """``raysam.run.run(cfg)`` on a thread of this (driver) process, so the test can act mid-run."""

    def __init__(self, cfg):
        wait_for(lambda: _stats_actor() is None, 30, "the previous run's RunStats to go")
        self.metrics: dict | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._target, args=(cfg,), daemon=True)
        self.thread.start()

    def _target(self, cfg) -> None:
        try:
            self.metrics = run(cfg)
        except BaseException as err:  # noqa: BLE001 - re-raised on the test's thread
            self.error = err

    def wait_for_chips(self, n: int) -> int:
        """Block until ``n`` chips went through SAM (and the run is still going); return the count."""
        done = wait_for(lambda: self.thread.is_alive() and _chips_done() >= n, RUN_TIMEOUT_S, f"{n} chips")
        return _chips_done() if done else 0

    def result(self) -> dict:
        self.thread.join(RUN_TIMEOUT_S)
        assert not self.thread.is_alive(), "run did not finish"
        if self.error is not None:
            raise self.error
        return self.metrics


@pytest.fixture(scope="module")
def undisturbed(gpu_cluster, tmp_path_factory, demo_catalog):
    """The reference outputs: the demo region on the same cluster, nothing lost."""
    root = tmp_path_factory.mktemp("undisturbed")
    runner = RunInThread(_config(demo_catalog, root))
    metrics = runner.result()
    assert metrics["groups_done"] == 2
    assert _manifest_resources(root)["sam_model_loads"] == 1
    return root


def _config(demo_catalog, root: Path, *extra: str):
    return demo_config(demo_catalog, root, *OVERRIDES, *extra)


def test_worker_node_lost_mid_run_gives_the_same_masks(gpu_cluster, undisturbed, demo_catalog, tmp_path):
    root = tmp_path / "out"
    runner = RunInThread(_config(demo_catalog, root))
    done_at_loss = runner.wait_for_chips(FAULT_AFTER_CHIPS)
    (lost,) = gpu_cluster.workers
    lost_id = lost.node_id
    gpu_cluster.remove_worker(lost)
    fresh = gpu_cluster.add_worker()
    metrics = runner.result()

    assert FAULT_AFTER_CHIPS <= done_at_loss < DEMO_CHIPS, "the node was not lost mid-run"
    assert metrics["groups_done"] == 2 and metrics["chips_segmented"] == DEMO_CHIPS
    resources = _manifest_resources(root)
    load_nodes = {p["node_id"] for p in resources["processes"] if "sam" in p["roles"]}
    assert fresh.node_id in load_nodes and resources["sam_model_loads"] == 2  # restarted on the fresh node
    assert lost_id != fresh.node_id
    assert_same_outputs(undisturbed, root)
    print(f"node lost after {done_at_loss}/{DEMO_CHIPS} chips; SAM actor reloaded on the fresh node; same outputs")


def test_killed_sam_actor_restarts_reloads_once_and_changes_nothing(gpu_cluster, undisturbed, demo_catalog, tmp_path):
    root = tmp_path / "out"
    runner = RunInThread(_config(demo_catalog, root))
    done_at_kill = runner.wait_for_chips(FAULT_AFTER_CHIPS)
    (victim,) = ray.get(_stats_actor().sam_pids.remote())
    os.kill(victim, signal.SIGKILL)
    metrics = runner.result()

    assert FAULT_AFTER_CHIPS <= done_at_kill < DEMO_CHIPS, "the actor was not killed mid-run"
    assert metrics["groups_done"] == 2 and metrics["chips_segmented"] == DEMO_CHIPS
    resources = _manifest_resources(root)
    assert resources["sam_model_loads"] == 2  # the original load and exactly one reload
    sam_pids = [p["pid"] for p in resources["processes"] if "sam" in p["roles"]]
    assert victim in sam_pids and len(sam_pids) == 2
    assert_same_outputs(undisturbed, root)
    print(f"SAM actor pid {victim} killed after {done_at_kill}/{DEMO_CHIPS} chips; 2 model loads; same outputs")


# ---------------------------------------------------------------------------------------------
# Retries of exceptions raised in our code (Ray Data's retried_map_errors / max_map_retries)
# ---------------------------------------------------------------------------------------------
def _flaky_udf(batch: dict, counter: str, failures: int, error: str) -> dict:
    """Raise ``error`` on the first ``failures`` calls (counted in a file), then pass through."""
    path = Path(counter)
    calls = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(calls))
    if calls <= failures:
        raise {"reset": ConnectionResetError("[Errno 104] Connection reset by peer"),
               "data": DataError("item X asset B04: cannot read /x.tif: OSError: truncated (after 3 tries)"),
               "missing": FileNotFoundError("/nonexistent/B04.tif")}[error]
    return batch


def _map_with(tmp_path: Path, failures: int, error: str, max_task_retries: int = 2) -> tuple[list, int]:
    configure_retries(ray.data.DataContext.get_current(), RayConfig(max_task_retries=max_task_retries))
    counter = tmp_path / f"{error}-{failures}.calls"
    ds = ray.data.from_items([{"x": 1}]).map_batches(
        _flaky_udf, fn_kwargs={"counter": str(counter), "failures": failures, "error": error})
    try:
        return ds.take_all(), int(counter.read_text())
    except Exception as err:  # noqa: BLE001
        return [err], int(counter.read_text())


def test_transient_io_errors_are_retried_up_to_max_task_retries(gpu_cluster, tmp_path):
    rows, calls = _map_with(tmp_path, failures=2, error="reset")
    assert rows == [{"x": 1}] and calls == 3  # two retries cured it
    (err,), calls = _map_with(tmp_path, failures=5, error="reset")
    assert calls == 3 and "ConnectionResetError" in str(err)  # 1 try + max_task_retries, then fail


@pytest.mark.parametrize("error", ["data", "missing"])
def test_user_errors_and_permanent_io_errors_fail_on_the_first_attempt(gpu_cluster, tmp_path, error):
    (err,), calls = _map_with(tmp_path, failures=5, error=error)
    assert calls == 1
    assert ("item X asset B04" if error == "data" else "/nonexistent/B04.tif") in str(err)


def test_pipeline_passes_no_deprecated_ray_remote_args(gpu_cluster, demo_catalog, tmp_path):
    """map_batches gets named parameters only (Ray 2.60 deprecates max_retries & co. there)."""
    import warnings

    from raysam.driver import prepare
    from raysam.layout import GroupSpec
    from raysam.pipeline import chip_dataset, model_source_for
    from raysam.plan import chip_bands

    cfg = _config(demo_catalog, tmp_path / "out", "ray.read_concurrency=2")
    prepared = prepare(cfg)
    specs = {g.group.id: GroupSpec(g.group, prepared.root, g.fingerprint, g.out_dir, g.out_dir, g.work_dir,
                                   chip_bands(cfg), cfg.chip.spatial_overlap) for g in prepared.plan.groups}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chip_dataset(specs, cfg, {}, model_source_for(cfg, prepared.model_dir), dict.fromkeys(specs, False))  # lazy
    deprecations = [str(w.message) for w in caught if "Deprecat" in w.category.__name__]
    assert not deprecations
