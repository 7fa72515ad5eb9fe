"""A full disk on a worker: one line naming the output root, no published group, nothing half-written.

Ray's ``worker_process_setup_hook`` gives every worker process a real file-size limit (a full
disk for everything but its small log lines): its first write of a label or Sentinel-2 tile
fails with EFBIG, as on a full disk. The driver, whose disk is fine, must stop the run with the
storage error's one line, publish nothing, and leave no staging behind.
"""

from __future__ import annotations

import resource
import signal
import threading

import pytest

from raysam.errors import ConfigError
from raysam.run import run
from tests.helpers import REPO, start_local_ray
from tests.reliability.conftest import demo_config

pytestmark = pytest.mark.slow

WORKER_FILE_LIMIT_BYTES = 64 * 1024  # above a worker's log lines and a chip checkpoint; below a COG tile


def fill_worker_disk() -> None:
    """Ray worker setup hook: writes past 64 KiB fail with EFBIG (no SIGXFSZ), as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (WORKER_FILE_LIMIT_BYTES, WORKER_FILE_LIMIT_BYTES))


def test_a_full_disk_on_a_worker_stops_the_run_in_one_line_and_publishes_nothing(demo_catalog, tmp_path):
    import ray

    out = tmp_path / "out"
    cfg = demo_config(demo_catalog, out, "sam.points_per_side=4", "region.time_range=[2024-06-28,2024-07-05]")
    start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False,  # workers import the hook from this checkout
             runtime_env={"worker_process_setup_hook": f"{__name__}.fill_worker_disk", "env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        with pytest.raises(ConfigError) as err:
            run(cfg)
    finally:
        ray.shutdown()
    message = str(err.value)
    assert "\n" not in message and "is full or cannot be written (" in message and "File too large" in message
    assert str(out) in message and "free space" in message
    assert not list(out.rglob("_COMPLETE.json")), "a group was published"
    assert not [p for p in out.rglob("*") if ".staging-" in p.name or p.suffix == ".lock"], "staging or locks left"
    # the chip stream stopped with the run: left behind, Ray's client in it would end this process
    # a minute after Ray is gone
    assert not [t for t in threading.enumerate() if t.name == "raysam-chips"], "the chip stream outlived the run"
