"""Secrets and trust: the STAC key leaves no trace, names cannot escape the root, models are verified.

A distinctive fake Planetary Computer key is planted on the command line (``stac.pc_key=``) or in
``PC_SDK_SUBSCRIPTION_KEY``; every file the run writes (output root, Hydra's run directory,
Ray's session directory under a dedicated ``RAY_TMPDIR``) and everything it prints is searched
for it byte for byte.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from raysam.errors import ConfigError
from raysam.region import validate_name
from tests.helpers import child_env, demo_run_command, kill_group, short_tmp_dir

SMALL_AOI = "-90.035,41.815,-89.965,41.865"  # straddles lon -90; one chip per date
ONE_DATE = "region.time_range=[2024-06-28,2024-07-05]"


def _planted_key() -> str:
    return f"PLANTED-pc-key-{uuid.uuid4().hex}"


def _run(tmp_path: Path, demo_catalog, *args: str, env: dict | None = None, model_dir: Path | None = None,
         ) -> subprocess.CompletedProcess:
    """``python -m raysam.run`` in its own process group; whatever it leaves running is killed."""
    cmd = demo_run_command(demo_catalog, tmp_path / "out", tmp_path / "hydra", *args, model_dir=model_dir)
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**child_env(), **(env or {})})
    try:
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _files_holding(needle: str, *roots: Path) -> tuple[list[Path], int]:
    """The regular files under ``roots`` whose bytes contain ``needle``, and how many were read."""
    hits, n = [], 0
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                n += 1
                if needle.encode() in path.read_bytes():
                    hits.append(path)
    return hits, n


@pytest.fixture()
def ray_tmp():
    """A short, private RAY_TMPDIR."""
    with short_tmp_dir() as path:
        yield path


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["ray", "in-process"])
def test_planted_key_is_in_no_file_the_run_writes(tmp_path, demo_catalog, ray_tmp, executor):
    """On Ray (its logs, its workers' task arguments) and in process (a small run: no Ray at all)."""
    key = _planted_key()
    on_ray = ["ray.in_process_max_chips=0"] if executor == "ray" else []
    result = _run(tmp_path, demo_catalog, "region=demo", "model=demo", "sam.points_per_side=4",
                  f"region.geometry='{SMALL_AOI}'", ONE_DATE, f"stac.pc_key={key}", *on_ray, env={"RAY_TMPDIR": str(ray_tmp)})
    assert result.returncode == 0, result.stderr[-3000:]
    manifests = list((tmp_path / "out").rglob("manifest.json"))
    assert len(manifests) == 1 and '"pc_key": "<redacted>"' in manifests[0].read_text()  # the key did reach the run
    assert f'"executor": "{executor}"' in manifests[0].read_text()
    ray_logs = [p for p in ray_tmp.rglob("session_*/logs/*") if p.is_file()]
    if executor == "ray":
        assert any(p.name.startswith("raylet") for p in ray_logs) and any("worker" in p.name for p in ray_logs)
    else:
        assert ray_logs == []
    assert list((tmp_path / "hydra" / ".hydra").glob("*.yaml"))
    hits, n_files = _files_holding(key, tmp_path, ray_tmp)
    assert n_files > (50 if executor == "ray" else 10) and hits == [], hits
    assert key not in result.stdout + result.stderr


def test_key_from_the_environment_stays_out_of_a_failing_runs_traceback(tmp_path, demo_catalog):
    key = _planted_key()
    result = _run(tmp_path, demo_catalog, "region=iowa", "model=demo", "stac.url=http://127.0.0.1:9",
                  "stac.retries=0", "stac.timeout_s=2", "verbose=true", env={"PC_SDK_SUBSCRIPTION_KEY": key})
    assert result.returncode != 0 and "Traceback" in result.stderr  # verbose: the full trace is shown
    assert key not in result.stdout + result.stderr
    hits, n_files = _files_holding(key, tmp_path)
    assert n_files > 0 and hits == [], hits
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../../etc", "/etc"])
def test_region_names_that_could_escape_the_root_are_refused_before_any_work(tmp_path, demo_catalog, name):
    result = _run(tmp_path, demo_catalog, "region=demo", "model=demo", f"region.name='{name}'")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith("raysam: error:") and "region.name=" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["a\0b", "demo\n", "..", ".", "", ".hidden", "-rf", "a/b", "a\\b", "x" * 129,
                                  "déjà", "C:evil"])
def test_unsafe_region_names(name):
    with pytest.raises(ConfigError, match="region name"):
        validate_name(name)


def test_safe_region_names():
    for name in ("iowa", "iowa-2024_v1.0", "x" * 128, "0demo"):
        assert validate_name(name) == name


def test_model_file_changed_at_the_same_size_is_refused_before_any_work(tmp_path, demo_catalog):
    from raysam.demo.model import build_demo_model

    model_dir = build_demo_model(tmp_path / "model")
    decoder = model_dir / "decoder.onnx"
    data = bytearray(decoder.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size: only the checksum can tell
    decoder.write_bytes(bytes(data))
    result = _run(tmp_path, demo_catalog, "region=demo", "model=demo", model_dir=model_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith(
        "raysam: error: decoder.onnx does not match the sha256 in manifest.json (corrupt or replaced): re-run "
    ), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_hydra_files_keep_everything_but_the_key_where_it_is_a_value(tmp_path, demo_catalog):
    """The saved .hydra/ files are rewritten only where the key is a value (not a substring)."""
    key = "0123456789abcdef0123456789abcdef"
    result = _run(tmp_path, demo_catalog, "region=demo", "model=demo", "dry_run=true", f"+hydra.job.env_set.NOTE={key}",
                  env={"PC_SDK_SUBSCRIPTION_KEY": key})
    assert result.returncode == 0, result.stderr[-3000:]
    saved = {p.name: p.read_text() for p in (tmp_path / "hydra" / ".hydra").glob("*.yaml")}
    assert key not in "".join(saved.values())
    assert "NOTE: <redacted>" in saved["hydra.yaml"] and "hydra.job.env_set.NOTE=<redacted>" in saved["hydra.yaml"]
    assert "name: demo" in saved["config.yaml"] and "<redacted>" not in saved["config.yaml"]  # nothing to hide there
