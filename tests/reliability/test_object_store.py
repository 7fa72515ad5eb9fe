"""The object-store path end to end, against a real S3-compatible server on localhost (moto).

Output roots on object stores have no rename and no create-if-absent: writers PUT straight into
the group directory, the completion marker is PUT last, locks are put-then-read-back. These
tests run the same code as a cluster writing to ``s3://``: locks, chip checkpoints (including a
corrupt one), a whole demo run whose outputs must equal a local run's, and a re-run that skips.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.io import MemoryFile

from raysam import checkpoint, records
from raysam.errors import ConfigError
from raysam.storage.backends import ObjectStorage
from raysam.storage.locks import claim, lock_path, release
from raysam.storage.root import MARKER, OutputRoot
from tests.helpers import start_local_ray
from tests.reliability.conftest import demo_config


def _root(uri: str) -> OutputRoot:
    root = OutputRoot.open(uri)
    root.check_writable()
    assert isinstance(root.storage, ObjectStorage)
    return root


def test_locks_on_an_object_store_refuse_a_second_claim(s3_server):
    root = _root(s3_server("locks"))
    group_dir = root.path("demo", "run", "demo_20240701")
    lock = claim(root, "demo_20240701", group_dir)
    assert root.storage.exists(lock_path(group_dir))
    with pytest.raises(ConfigError, match="is being written by another raysam run"):
        claim(root, "demo_20240701", group_dir)  # same host, live pid: held
    release(root, lock)
    assert not root.storage.exists(lock_path(group_dir))
    release(root, claim(root, "demo_20240701", group_dir))


def test_checkpoints_on_an_object_store_round_trip_and_a_corrupt_one_is_redone(s3_server, caplog):
    root = _root(s3_server("checkpoints"))
    work = root.path("demo", "run", ".work", "g")
    assert checkpoint.prepare_work_dir(root, work, "fp", "g") == 0
    table = records.empty_records()
    outcome = checkpoint.ChipOutcome((0, 1), checkpoint.SKIPPED, "cloudy 0.95 > 0.8")
    checkpoint.write_shard(root, work, "fp", outcome, table)
    assert checkpoint.resume_outcome(root, work, (0, 1), "fp", "g") == outcome
    assert checkpoint.prepare_work_dir(root, work, "fp", "g") == 1  # same fingerprint: kept
    path = checkpoint.shard_path(work, (0, 1))
    root.storage.put_bytes(path, root.storage.read_bytes(path)[:40])  # truncated
    assert checkpoint.resume_outcome(root, work, (0, 1), "fp", "g") is None
    assert "is corrupt" in caplog.text and not root.storage.exists(path)
    checkpoint.write_shard(root, work, "fp", outcome, table)
    assert checkpoint.prepare_work_dir(root, work, "other", "g") == 0  # another fingerprint: cleaned
    assert not root.storage.exists(path)


@pytest.fixture(scope="module")
def runs(s3_server, demo_catalog, tmp_path_factory):
    """The demo region written to S3, then again locally (same config), then re-run on S3."""
    import ray

    from raysam.run import run

    overrides = ("sam.points_per_side=4",)
    s3_uri = s3_server("out")
    local = tmp_path_factory.mktemp("local")
    start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        first = run(demo_config(demo_catalog, s3_uri, *overrides))
        reference = run(demo_config(demo_catalog, local, *overrides))
        again = run(demo_config(demo_catalog, s3_uri, *overrides))
    finally:
        ray.shutdown()
    return OutputRoot.open(s3_uri), local, (first, reference, again)


def _walk(root: OutputRoot) -> list[str]:
    from pyarrow import fs as pafs

    infos = root.storage.fs.get_file_info(pafs.FileSelector(root.base, recursive=True))
    return sorted(i.path[len(root.base) + 1:] for i in infos if i.type == pafs.FileType.File)


@pytest.mark.slow
def test_a_run_on_an_object_store_publishes_what_a_local_run_does(runs):
    root, local, (first, reference, _) = runs
    assert first["groups_done"] == 2 and first["masks"] == reference["masks"] > 0
    remote = _walk(root)
    here = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert remote == here  # same files: no locks, staging or work files left on either
    assert sum(name.endswith(MARKER) for name in remote) == 2
    for rel in remote:
        data = root.storage.read_bytes(f"{root.base}/{rel}")
        if rel.endswith(".parquet"):
            assert pq.read_table(pa.BufferReader(data)).equals(pq.read_table(local / rel)), rel
        elif rel.endswith(".tif"):
            with MemoryFile(data) as mem, mem.open() as a, rasterio.open(local / rel) as b:
                assert np.array_equal(a.read(), b.read()), rel
        elif rel.endswith(".npy"):
            assert np.array_equal(np.load(io.BytesIO(data)), np.load(local / rel)), rel


@pytest.mark.slow
def test_a_re_run_on_an_object_store_skips_the_published_groups(runs):
    _, _, (_, _, again) = runs
    assert again["groups_skipped"] == 2 and again["groups_done"] == 0
