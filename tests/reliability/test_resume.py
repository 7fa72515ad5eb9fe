"""Interrupted backfills: per-date-group locks, stale-lock takeover, resume after SIGKILL.

The fast tests drive :mod:`raysam.storage.locks` with real processes holding (or having held)
the locks. The slow ones run ``python -m raysam.run`` on the demo region: two runs on one output
root at once (the loser stops with one line); a run killed with SIGKILL right after its first
date group is published; and one killed once half of a date group's chips are checkpointed,
which the re-run resumes chip by chip. Each re-run is compared file by file with the undisturbed
run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raysam.errors import ConfigError
from raysam.storage import locks
from raysam.storage.locks import claim, keep_alive, lock_path, release
from raysam.storage.publish import LocalPublisher
from raysam.storage.root import MARKER, OutputRoot
from tests.helpers import REPO, child_env, demo_run_command, kill_group, short_tmp_dir

GROUP_DIR = "demo/run/demo_20240701"


def _root(tmp_path: Path) -> OutputRoot:
    return OutputRoot.open(str(tmp_path / "out"))


def _holder(root_dir: Path, group_dir: str, then: str) -> subprocess.Popen:
    """Another process that claims ``group_dir``, prints "held", then runs ``then``."""
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        from raysam.storage.locks import claim
        from raysam.storage.root import OutputRoot
        root = OutputRoot.open({str(root_dir)!r})
        claim(root, "g", root.path(*{group_dir!r}.split("/")))
        print("held", flush=True)
        {then}
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_claim_is_refused_with_one_line_naming_group_and_lock(tmp_path):
    root = _root(tmp_path)
    holder = _holder(tmp_path / "out", GROUP_DIR, "time.sleep(60)")
    try:
        with pytest.raises(ConfigError) as err:
            claim(root, "demo_20240701", root.path(*GROUP_DIR.split("/")))
    finally:
        holder.kill()
        holder.wait()
    lock = lock_path(root.path(*GROUP_DIR.split("/")))
    message = str(err.value)
    assert message.startswith("date group demo_20240701 is being written by another raysam run")
    assert f"pid {holder.pid} on host" in message and f"delete {lock}" in message and "\n" not in message


def test_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    root = _root(tmp_path)
    group_dir = root.path(*GROUP_DIR.split("/"))
    holder = _holder(tmp_path / "out", GROUP_DIR, "os.kill(os.getpid(), signal.SIGKILL)")
    assert holder.wait() == -signal.SIGKILL
    assert json.loads(Path(lock_path(group_dir)).read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="raysam.storage.locks"):
        lock = claim(root, "demo_20240701", group_dir)
    assert "took over the stale lock" in caplog.text and str(holder.pid) in caplog.text
    assert json.loads(Path(lock.path).read_text())["pid"] == os.getpid()
    release(root, lock)
    assert not Path(lock.path).exists()


def test_lock_from_another_host_is_stale_only_after_the_lease(tmp_path):
    root = _root(tmp_path)
    group_dir = root.path(*GROUP_DIR.split("/"))
    path = Path(lock_path(group_dir))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": 1, "host": "preempted-node-7", "token": "t"}))
    with pytest.raises(ConfigError, match="pid 1 on host preempted-node-7"):
        claim(root, "g", group_dir)
    past = time.time() - locks.LOCK_LEASE_S - 60
    os.utime(path, (past, past))  # its driver stopped renewing it ten minutes ago
    lock = claim(root, "g", group_dir)
    assert json.loads(path.read_text())["token"] == lock.token


def test_keep_alive_renews_held_locks(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "LOCK_RENEW_S", 0.05)
    root = _root(tmp_path)
    lock = claim(root, "g", root.path(*GROUP_DIR.split("/")))
    past = time.time() - 3600
    os.utime(lock.path, (past, past))
    with keep_alive(root, {"g": lock}):
        deadline = time.monotonic() + 30
        while os.stat(lock.path).st_mtime < past + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert os.stat(lock.path).st_mtime > time.time() - 60


def test_leftovers_of_the_group_are_removed_and_nothing_else(tmp_path):
    root = _root(tmp_path)
    group_dir = Path(root.path(*GROUP_DIR.split("/")))
    parent = group_dir.parent
    leftovers = [".demo_20240701.staging-abc12", ".demo_20240701.old-1a2b3c4d", ".demo_20240701.tmp-9f"]
    for name in leftovers:
        (parent / name).mkdir(parents=True)
        (parent / name / "masks.parquet").write_bytes(b"half")
    (parent / ".demo_20240701.lock.0123abcd").write_text("{}")  # a claim's temp file
    keep = [".demo_20240711.staging-zz", "demo_20240701", ".demo_20240701.lock"]
    for name in keep[:2]:
        (parent / name).mkdir()
    (parent / keep[2]).write_text("{}")
    assert LocalPublisher().remove_leftovers(root, str(group_dir)) == 4
    assert sorted(p.name for p in parent.iterdir()) == sorted(keep)


def test_claims_are_all_or_none(tmp_path, demo_selection):
    from raysam.grid import make_date_group
    from raysam.plan import GroupPlan, RunPlan, claim_todo

    region, _, selections = demo_selection
    root = _root(tmp_path)
    groups = []
    for sel in selections.values():
        group = make_date_group(region.name, sel.date, sel.items, region.aoi_wgs84)
        groups.append(GroupPlan(group, root.path("demo", "run", group.id), root.path("demo", "run", ".work", group.id),
                                "fp", 1.0, False))
    plan = RunPlan(region, "run", root.path("demo", "run"), tuple(groups))
    second = groups[1].out_dir.split("/")[-3:]
    holder = _holder(tmp_path / "out", "/".join(second), "time.sleep(60)")
    try:
        with pytest.raises(ConfigError, match=f"date group {groups[1].group.id} is being written"):
            claim_todo(plan, root)
    finally:
        holder.kill()
        holder.wait()
    assert not Path(lock_path(groups[0].out_dir)).exists()  # the first claim was given back
    todo, locks = claim_todo(plan, root)  # the holder is dead now: its lock is stale
    assert [g.group.id for g in todo] == [g.group.id for g in groups] and len(locks) == 2


@pytest.mark.parametrize("part", ["..", ".", "", "../etc", "a/b", "/etc", "a\\b", "a\0b"])
def test_output_paths_cannot_leave_the_root(tmp_path, part):
    with pytest.raises(ConfigError, match="could escape output.root"):
        _root(tmp_path).path("demo", part)


# ---------------------------------------------------------------------------------------------
# End to end: python -m raysam.run on the demo region (2 date groups)
# ---------------------------------------------------------------------------------------------
RUN_ARGS = ("region=demo", "model=demo", "sam.points_per_side=4")
# Per-run accounting: timings, memory, how the chips were split between this run and its checkpoints,
# and whether it ran on Ray (with the SAM actors' CPUs it decided) or in process.
VOLATILE_KEYS = ("timings_s", "finished_at", "chips_per_s", "root", "resources", "stage_cpu_s", "chips_segmented",
                 "chips_resumed", "processing:datetime", "executor", "in_process_max_chips", "cpus_per_actor")


def _command(demo_catalog, out: Path, hydra_dir: Path) -> list[str]:
    return demo_run_command(demo_catalog, out, hydra_dir, *RUN_ARGS)


@pytest.fixture(scope="module")
def run_env():
    """The runs' environment: a private, short RAY_TMPDIR, so that each run starts its own local
    Ray instead of joining a ``ray start`` cluster of this machine (Ray looks for one there)."""
    with short_tmp_dir() as ray_tmp:
        yield child_env(ray_tmp)


def _start(demo_catalog, work: Path, out: Path, name: str, env: dict, *extra: str) -> subprocess.Popen:
    work.mkdir(parents=True, exist_ok=True)
    log = (work / f"{name}.log").open("w")
    return subprocess.Popen([*_command(demo_catalog, out, work / f"hydra-{name}"), *extra], cwd=work, stdout=log,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)


def _finish(proc: subprocess.Popen, timeout_s: float = 900) -> int:
    """Wait for a run, then kill whatever it left in its process group (Ray's local cluster)."""
    try:
        return proc.wait(timeout=timeout_s)
    finally:
        kill_group(proc)


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _group_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("demo/*/*") if p.is_dir() and not p.name.startswith("."))


@pytest.fixture(scope="module")
def concurrent_runs(tmp_path_factory, demo_catalog, run_env):
    """Run A on a fresh root; once it holds its locks, run B with the same command and root."""
    work = tmp_path_factory.mktemp("concurrent")
    out = work / "out"
    first = _start(demo_catalog, work, out, "a", run_env)
    try:
        _wait_for(lambda: any(out.glob("demo/*/.*.lock")), first, "run A claimed its date groups")
        second = _start(demo_catalog, work, out, "b", run_env)
        rc_b = _finish(second)
        rc_a = _finish(first)
    finally:
        kill_group(first)
    return out, (rc_a, (work / "a.log").read_text()), (rc_b, (work / "b.log").read_text())


@pytest.mark.slow
def test_a_second_run_on_the_same_root_stops_with_one_line(concurrent_runs):
    out, (rc_a, log_a), (rc_b, log_b) = concurrent_runs
    assert rc_a == 0, log_a[-3000:]
    errors = [ln for ln in log_b.splitlines() if ln.startswith("raysam: error:")]
    assert rc_b == 2 and len(errors) == 1, log_b[-3000:]
    assert "date group demo_20240701 is being written by another raysam run" in errors[0]
    assert "/.demo_20240701.lock" in errors[0] and "delete" in errors[0] and "Traceback" not in log_b
    assert [p.name for p in _group_dirs(out)] == ["demo_20240701", "demo_20240711"]
    assert all((p / MARKER).exists() for p in _group_dirs(out))
    assert not [p for p in out.rglob(".*")], "locks or staging left behind"


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_outputs(concurrent_runs, demo_catalog, tmp_path, run_env):
    reference, (rc_a, _), _ = concurrent_runs
    assert rc_a == 0
    out = tmp_path / "out"
    killed = _start(demo_catalog, tmp_path, out, "killed", run_env)
    try:
        def first_published_second_staging() -> bool:
            done = [p for p in _group_dirs(out) if (p / MARKER).exists()]
            return len(done) == 1 and any(out.glob("demo/*/.demo_20240711.staging-*"))

        _wait_for(first_published_second_staging, killed, "the first date group was published")
        os.kill(killed.pid, signal.SIGKILL)
    finally:
        assert _finish(killed, timeout_s=60) == -signal.SIGKILL
    assert [p.name for p in _group_dirs(out) if (p / MARKER).exists()] == ["demo_20240701"]
    assert any(out.rglob(".demo_20240711.staging-*")) and any(out.rglob(".demo_20240711.lock"))

    resumed = _start(demo_catalog, tmp_path, out, "resumed", run_env)
    rc = _finish(resumed)
    log_text = (tmp_path / "resumed.log").read_text()
    assert rc == 0, log_text[-3000:]
    assert "date group demo_20240701 is complete in" in log_text and ": skipped" in log_text
    assert "took over the stale lock" in log_text and "leftover staging" in log_text
    assert "1 date group(s) written, 1 already complete" in log_text
    _assert_same_outputs(reference, out)


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["in-process", "ray"])
def test_run_killed_mid_group_resumes_chip_by_chip(concurrent_runs, demo_catalog, tmp_path, run_env, executor):
    """SIGKILL once half of the first date group's chips are checkpointed; the re-run segments only
    the chips that have no checkpoint (counted by the run's stats) and writes the same outputs.
    Both runs in process (the demo's 16 chips), or both on Ray (``ray.in_process_max_chips=0``)."""
    from raysam.pipeline import SAM_CHIP_DELAY_ENV

    on_ray = ["ray.in_process_max_chips=0"] if executor == "ray" else []

    reference, (rc_a, _), _ = concurrent_runs
    assert rc_a == 0
    out = tmp_path / "out"
    chips_dir = lambda: next(out.glob("demo/*/.work/demo_20240701/chips"), None)  # noqa: E731
    shards = lambda: sorted(p.name for p in chips_dir().glob("*.parquet")) if chips_dir() else []  # noqa: E731
    killed = _start(demo_catalog, tmp_path, out, "killed", {**run_env, SAM_CHIP_DELAY_ENV: "0.5"}, *on_ray)
    try:
        _wait_for(lambda: len(shards()) >= 4, killed, "half of the first date group's chips were checkpointed")
        at_kill = len(shards())
        os.kill(killed.pid, signal.SIGKILL)
    finally:
        assert _finish(killed, timeout_s=60) == -signal.SIGKILL  # the run's Ray processes die with it
    kept = _settled(shards)  # chips in flight at the kill may still land while Ray winds the job down
    assert 4 <= at_kill <= len(kept) <= 8, (at_kill, kept)
    assert not [p for p in _group_dirs(out) if (p / MARKER).exists()]  # nothing was published

    resumed = _start(demo_catalog, tmp_path, out, "resumed", run_env, *on_ray)
    rc = _finish(resumed)
    log_text = (tmp_path / "resumed.log").read_text()
    assert rc == 0, log_text[-3000:]
    assert f"date group demo_20240701: resuming from {len(kept)} chip checkpoint(s)" in log_text
    manifest = json.loads(next(out.glob("demo/*/demo_20240701/manifest.json")).read_text())
    counts = manifest["counts"]
    assert counts["chips_resumed"] == len(kept)
    assert counts["chips_segmented"] == counts["chips_planned"] - len(kept) <= 8 - at_kill
    assert manifest["executor"] == executor
    _assert_same_outputs(reference, out)


def _settled(listing, quiet_s: float = 3.0, timeout_s: float = 60.0) -> list:
    """``listing()`` once it has not changed for ``quiet_s``."""
    last, since, deadline = listing(), time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.2)
        now = listing()
        if now != last:
            last, since = now, time.monotonic()
    return last


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _assert_same_outputs(expected_root: Path, actual_root: Path) -> None:
    """Same file set (no temp files) and the same contents, timings and timestamps aside."""
    assert _files(actual_root) == _files(expected_root)
    for rel in _files(expected_root):
        a, b = expected_root / rel, actual_root / rel
        if rel.endswith(".parquet"):
            ta, tb = pq.read_table(a), pq.read_table(b)
            assert ta.num_rows > 0 and ta.equals(tb), rel
        elif rel.endswith(".tif"):
            _assert_same_raster(a, b)
        elif rel.endswith(".png"):
            assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), rel
        elif rel.endswith(".json"):
            assert _stable(json.loads(a.read_text())) == _stable(json.loads(b.read_text())), rel
        else:
            assert a.read_bytes() == b.read_bytes(), rel


def _assert_same_raster(a: Path, b: Path) -> None:
    import rasterio

    with rasterio.open(a) as ra, rasterio.open(b) as rb:
        assert (ra.crs, ra.transform, ra.dtypes) == (rb.crs, rb.transform, rb.dtypes), a.name
        pixels = ra.read()
        assert np.array_equal(pixels, rb.read()), a.name
    if a.name == "labels.tif":
        assert pixels.max() > 0


def _stable(value):
    """A manifest or marker without timings, timestamps, memory figures or the output root."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items()
                if not any(word in k for word in (*VOLATILE_KEYS, "rss", "memory", "peak", "_at"))}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value
