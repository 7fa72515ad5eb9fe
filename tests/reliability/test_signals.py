"""Issue 14: SIGTERM and SIGINT stop a run within seconds at any phase, release its locks, remove
its staging, and say in one line what was kept.

Each test starts ``python -m raysam.run`` on the demo region, waits until the run is held in one
phase by something real, signals it and times the exit:

* **planning**: the STAC API, or the object store of the output root, is a server that accepts
  the request and never answers;
* **reads**: every item's B04 COG is on such a server, so each chip read hangs in GDAL;
* **SAM**: the SAM actors take 3 s per chip (``RAYSAM_SAM_CHIP_DELAY_S``); the signal comes once
  the first chip is checkpointed, so some chips are kept;
* **sinks**: every chip is checkpointed, but the Sentinel-2 tiles read B08 from such a server, so
  the date group waits in its sinks;
* **a stuck main thread**: a call into pyarrow's S3 client that never returns holds the main
  thread, where no Python signal handler can run: the watchdog of :mod:`raysam.interrupt` ends
  the process, after running the cleanups.

After each stop: exit code 128 + the signal, the stop line last on stderr and no traceback, no
lock file, no staging directory, no completion marker; the chip checkpoints the line counts are
on disk, and nothing else is.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raysam import interrupt
from raysam.demo.serve import free_port, serve_catalog
from tests.helpers import child_env, demo_run_command, kill_group, short_tmp_dir
from tests.reliability import bad_inputs_data as bad
from tests.reliability.conftest import wait_for

STOP_BOUND_S = 20.0  # "within seconds": Ray's shutdown included
SMALL = f"region.geometry='{bad.SMALL_AOI}'"  # one chip per date
ONE_DATE = f"region.time_range=[{bad.ONE_DATE[0]},{bad.ONE_DATE[1]}]"


@pytest.fixture(scope="module")
def hole():
    with bad.black_hole() as server:
        yield server


@pytest.fixture(scope="module")
def catalogs(demo_catalog, hole, tmp_path_factory):
    """STAC APIs over the demo catalog whose B04 (``reads``) or B08 (``sinks``) hrefs hang."""
    base = tmp_path_factory.mktemp("stalled_catalogs")
    items = bad.read_items(demo_catalog)
    urls, procs = {}, []
    for name, band in (("reads", "B04"), ("sinks", "B08")):
        hrefs = {tile: f"http://127.0.0.1:{hole.port}/{tile}/{band}.tif" for tile in bad.cog_of(items, band)}
        ndjson = bad.write_items(base / name, demo_catalog, bad.with_band_href(items, band, hrefs))
        port = free_port()
        procs.append(serve_catalog(ndjson, port))
        urls[name] = f"http://127.0.0.1:{port}"
    yield urls
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


class Run:
    """A ``python -m raysam.run`` in its own process group, with its output root."""

    def __init__(self, tmp_path: Path, demo_catalog, *args: str, env: dict | None = None):
        self.out = tmp_path / "out"
        self.stop_s: float | None = None  # seconds from the signal to the process's end, once stopped
        cmd = demo_run_command(demo_catalog, self.out, tmp_path / "hydra", "region=demo", "model=demo",
                               "sam.points_per_side=2", "output.sinks=[segmentation_mask]", *args)
        self.proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True, env={**child_env(), **(env or {})})

    def stop(self, sig: signal.Signals) -> tuple[int, str, float]:
        """Send ``sig``; (exit code, stderr, seconds until the process ended)."""
        assert self.proc.poll() is None, self.proc.communicate()[1][-3000:]
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            _, stderr = self.proc.communicate(timeout=60)
        finally:
            kill_group(self.proc)
        self.stop_s = time.monotonic() - t0
        return self.proc.returncode, stderr, self.stop_s

    def files(self, pattern: str) -> list[Path]:
        return sorted(self.out.rglob(pattern)) if self.out.exists() else []


def _stopped(run: Run, sig: signal.Signals) -> str:
    """Stop ``run`` with ``sig`` and check the promise common to every phase; return the stop line."""
    code, stderr, seconds = run.stop(sig)
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert code == 128 + sig, stderr[-3000:]
    assert seconds < STOP_BOUND_S, f"{seconds:.1f} s"
    assert "Traceback" not in stderr, stderr[-3000:]
    assert lines[-1].startswith(f"raysam: stopped by {sig.name}"), stderr[-3000:]
    assert sum("stopped by" in line for line in lines) == 1, stderr[-3000:]
    hidden = [p for p in run.files(".*") if p.name != ".work"]  # locks, staging, temporary files
    assert hidden == [] and run.files("_COMPLETE.json") == [], hidden
    return lines[-1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_while_planning(sig, tmp_path, demo_catalog, hole):
    before = hole.connections()
    run = Run(tmp_path, demo_catalog, SMALL, ONE_DATE, "stac=local", f"stac.url=http://127.0.0.1:{hole.port}",
              "stac.timeout_s=600", "stac.retries=0")
    wait_for(lambda: hole.connections() > before or run.proc.poll() is not None, 60, "the STAC search")
    line = _stopped(run, sig)
    assert line == f"raysam: stopped by {sig.name}; nothing was kept (no output was written)"
    assert not run.out.exists()


def test_a_stop_while_the_output_root_does_not_answer(tmp_path, demo_catalog, hole):
    """The issue's case: a dry run waiting on an object store that never answers ignored SIGTERM."""
    before = hole.connections()
    run = Run(tmp_path, demo_catalog, SMALL, ONE_DATE, "dry_run=true", "output.timeout_s=600",
              f"output.root='s3://bucket/out?endpoint_override=127.0.0.1:{hole.port}&scheme=http'",
              env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"})
    wait_for(lambda: hole.connections() > before or run.proc.poll() is not None, 60, "the object-store request")
    assert _stopped(run, signal.SIGTERM) == "raysam: stopped by SIGTERM; nothing was kept (no output was written)"


WATCHDOG_SCRIPT = """
import sys
from pathlib import Path
import pyarrow.fs as pafs
from raysam import interrupt
cleaned = Path(sys.argv[2])
fs = pafs.S3FileSystem(endpoint_override=sys.argv[1], scheme="http", access_key="x", secret_key="y",
                       connect_timeout=600, request_timeout=600)
with interrupt.guard(grace_s=2):
    with interrupt.on_stop(lambda: cleaned.write_text("released")):
        print("waiting", flush=True)
        fs.get_file_info("bucket/key")  # C++ waits for an answer that never comes
"""


def test_a_stop_while_the_main_thread_is_stuck_in_a_library(tmp_path, hole):
    cleaned = tmp_path / "cleaned"
    before = hole.connections()  # the module's earlier stops connected to it too
    proc = subprocess.Popen([sys.executable, "-c", WATCHDOG_SCRIPT, f"127.0.0.1:{hole.port}", str(cleaned)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        assert proc.stdout.readline().strip() == "waiting"
        wait_for(lambda: hole.connections() > before, 30, "the S3 request")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        seconds = time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines() == ["raysam: stopped by SIGTERM; nothing was kept (no output was written)"]
    assert cleaned.read_text() == "released" and 2 <= seconds < 10, seconds


def _kept(line: str) -> int:
    """The number of chip checkpoints a stop line says it kept."""
    if "kept nothing" in line:
        return 0
    return int(line.split("kept ")[1].split(" chip checkpoint")[0])


@pytest.mark.slow
def test_a_stop_while_reading_chips(tmp_path, demo_catalog, catalogs, hole):
    before = hole.connections()
    with short_tmp_dir() as ray_tmp:
        run = Run(tmp_path, demo_catalog, SMALL, ONE_DATE, "stac=local", f"stac.url={catalogs['reads']}",
                  "sam.scaling=reflectance", "network.timeout_s=600", "network.tries=1",
                  env={"RAY_TMPDIR": str(ray_tmp)})
        wait_for(lambda: hole.connections() > before or run.proc.poll() is not None, 180, "a chip read")
        line = _stopped(run, signal.SIGTERM)
    assert "released 1 date-group lock(s), removed the staging of 1 group(s)" in line, line
    assert _kept(line) == 0 and not run.out.exists()  # no checkpoint: the output root is gone again
    # the main thread unwound on its own: it did not wait for the read that never returns, and the
    # watchdog (which ends the process after interrupt.GRACE_S) never stepped in
    assert run.stop_s < interrupt.GRACE_S, f"{run.stop_s:.1f} s"


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["in-process", "ray"])
def test_a_stop_while_segmenting(tmp_path, demo_catalog, executor):
    """The demo date's 8 chips run in process; ``ray.in_process_max_chips=0`` puts them on Ray."""
    on_ray = ["ray.in_process_max_chips=0"] if executor == "ray" else []
    with short_tmp_dir() as ray_tmp:
        run = Run(tmp_path, demo_catalog, ONE_DATE, "sam.scaling=reflectance", *on_ray,
                  env={"RAY_TMPDIR": str(ray_tmp), "RAYSAM_SAM_CHIP_DELAY_S": "3"})
        wait_for(lambda: run.files("chips/*.parquet") or run.proc.poll() is not None, 240, "a chip checkpoint")
        line = _stopped(run, signal.SIGINT)
    shards = run.files("chips/*.parquet")
    assert 1 <= _kept(line) == len(shards) < 8, (line, shards)  # the demo date has 8 chips
    assert f"in {shards[0].parents[2]} for the next run" in line, line


@pytest.mark.slow
def test_a_stop_while_writing_sinks(tmp_path, demo_catalog, catalogs, hole):
    before = hole.connections()
    with short_tmp_dir() as ray_tmp:
        run = Run(tmp_path, demo_catalog, SMALL, ONE_DATE, "stac=local", f"stac.url={catalogs['sinks']}",
                  "sam.scaling=reflectance", "output.sinks=[segmentation_mask,s2_raster]", "output.s2_bands=[B08]",
                  "network.timeout_s=600", "network.tries=1",
                  # half a CPU each: the stalled tile task must leave room for the chip's read
                  "ray.sink_cpus=0.5", "ray.read_cpus=0.5", env={"RAY_TMPDIR": str(ray_tmp)})
        wait_for(lambda: (run.files("chips/*.parquet") and hole.connections() > before) or run.proc.poll() is not None,
                 240, "the chip checkpoint and the stalled Sentinel-2 tile")
        time.sleep(2)  # the merge and the label tiles finish; the group waits for its B08 tile
        line = _stopped(run, signal.SIGTERM)
    assert _kept(line) == len(run.files("chips/*.parquet")) == 1, line
    assert run.files("*.tif") == [] and run.files("cells/*") == [], "the group's tiles are gone with its staging"
