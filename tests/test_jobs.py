"""Submitting raysam to a Ray cluster: ``jobs/`` and ``ray job submit`` with token authentication.

The pure parts of ``jobs/backfill.py`` (months, entrypoints, parsing the ``ray`` CLI's output,
the client's auth environment) and the two YAML files are checked without a cluster. The
``slow`` tests start a real local head node (``ray start --head --block`` on free ports, its own
``--temp-dir`` and ``HOME``) with token authentication on the way Ray 2.60 turns it on for a user:
``ray get-auth-token --generate`` writes ``~/.ray/auth_token``, and ``ray start --head`` then
enables token mode by itself. Jobs are submitted with the ``ray`` CLI as a user would, with
``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` in the client's environment. Only the processes
this module started are stopped (never ``ray stop``, which would stop other local clusters).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pytest
import yaml

from raysam.demo.serve import free_port
from raysam.errors import ConfigError
from tests.helpers import stop_process_tree

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray") if (VENV_BIN / "ray").exists() else "ray"
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
# A one-chip slice of the demo region (a dry run of July plans 2 date groups of 1 chip each, the
# whole region 16 chips), so a job on 2 shared CPUs takes about a minute, not four. The geometry
# is quoted for Hydra (it has commas).
SMALL_DEMO = ["region.geometry='-89.99,41.80,-89.95,41.84'", "output.sinks=[segmentation_mask]",
              "ray.sam_actors=1"]
JOB_TIMEOUT_S = 420


def _load_backfill():
    spec = importlib.util.spec_from_file_location("raysam_jobs_backfill", REPO / "jobs" / "backfill.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


backfill = _load_backfill()


# ---------------------------------------------------------------------------------------------
# backfill.py, pure parts
# ---------------------------------------------------------------------------------------------
def test_months_cover_each_month_once_with_its_real_length():
    got = backfill.months("2023-11", "2024-03")
    assert got == [
        (date(2023, 11, 1), date(2023, 11, 30)),
        (date(2023, 12, 1), date(2023, 12, 31)),   # year boundary
        (date(2024, 1, 1), date(2024, 1, 31)),
        (date(2024, 2, 1), date(2024, 2, 29)),     # 2024 is a leap year
        (date(2024, 3, 1), date(2024, 3, 31)),
    ]
    assert backfill.months("2023-02", "2023-02") == [(date(2023, 2, 1), date(2023, 2, 28))]


@pytest.mark.parametrize("start,end,message", [
    ("2024-13", "2024-12", "month '2024-13' is not YYYY-MM"),
    ("2024/04", "2024-05", "month '2024/04' is not YYYY-MM"),
    ("2024-4", "2024-05", "month '2024-4' is not YYYY-MM"),
    ("2024-06", "2024-05", "--start 2024-06 is after --end 2024-05; swap them"),
])
def test_months_rejects_bad_ranges_with_config_error(start, end, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        backfill.months(start, end)


def test_entrypoint_composes_to_the_month_in_raysam_config():
    """The override strings a job gets parse, through Hydra, into the month's time range."""
    from hydra import compose, initialize_config_dir

    from raysam.run import CONF_DIR

    cmd = backfill.entrypoint("demo", date(2024, 2, 1), date(2024, 2, 29), ["model=demo", SMALL_DEMO[0]])
    assert cmd[:3] == ["python", "-m", "raysam.run"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=cmd[3:])
    assert list(cfg.region.time_range) == ["2024-02-01", "2024-02-29"]
    assert cfg.region.name == "demo" and cfg.model.type == "demo"
    assert cfg.region.geometry == "-89.99,41.80,-89.95,41.84"


def test_submission_ids_are_readable_and_unique():
    ids = {backfill.submission_id("my region", "2024-05") for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"raysam-my-region-2024-05-[0-9a-f]{8}", i) for i in ids)


# Output of Ray 2.60's `ray job submit --no-wait` / `ray job status`, captured from the head node
# of the slow tests below (ANSI colours included: the CLI prints them into pipes too).
SUBMIT_OUT = (
    "2026-11-24 23:10:34,519\tINFO cli.py:42 -- \x1b[37mJob submission server address\x1b[39m: \x1b[1mhttp://127.0.0.1:60755\x1b[22m\n"
    "2026-11-24 23:10:34,565\tSUCC cli.py:66 -- \x1b[32m---------------------------------\x1b[39m\n"
    "2026-11-24 23:10:34,565\tSUCC cli.py:67 -- \x1b[32mJob 'jrun' submitted successfully\x1b[39m\n"
    "2026-11-24 23:10:34,569\tINFO cli.py:341 -- \x1b[1mray job stop jrun\x1b[22m\n")
STATUS_RUNNING = (
    "2026-11-24 23:10:57,530\tINFO cli.py:42 -- \x1b[37mJob submission server address\x1b[39m: \x1b[1mhttp://127.0.0.1:60755\x1b[22m\n"
    "2026-11-24 23:10:57,543\tINFO cli.py:92 -- Status for job 'jrun': RUNNING\n"
    "2026-11-24 23:10:57,543\tINFO cli.py:94 -- Status message: Job is currently running.\n")
STATUS_STOPPED = "2026-11-24 23:11:10,642\tWARN cli.py:85 -- \x1b[33mJob 'jrun' was stopped\x1b[39m\n"
STATUS_SUCCEEDED = (
    "2026-11-24 23:09:35,825\tSUCC cli.py:66 -- \x1b[32m------------------\x1b[39m\n"
    "2026-11-24 23:09:35,825\tSUCC cli.py:67 -- \x1b[32mJob 'j1' succeeded\x1b[39m\n")
STATUS_FAILED = (  # the job printed "RUNNING SUCCEEDED" and "Job 'j1' succeeded" before exiting 3
    "2026-11-24 23:10:52,930\tERR cli.py:75 -- \x1b[31mJob 'jfail' failed\x1b[39m\n"
    "2026-11-24 23:10:52,931\tINFO cli.py:89 -- Status message: Job entrypoint command failed with exit code 3, "
    "last available logs (truncated to 20,000 chars):\nRUNNING SUCCEEDED\nJob 'jfail' succeeded\n\n")
STATUS_404 = "RuntimeError: Request failed with status code 404: Job nonexist does not exist.\n"


def test_parse_submitted_and_status_read_the_cli_lines_not_the_logs():
    assert backfill.parse_submitted(SUBMIT_OUT) == "jrun"
    assert backfill.parse_submitted("Authentication failed: Forbidden") is None
    assert backfill.parse_status(STATUS_RUNNING, "jrun") == "RUNNING"
    assert backfill.parse_status(STATUS_STOPPED, "jrun") == "STOPPED"
    assert backfill.parse_status(STATUS_SUCCEEDED, "j1") == "SUCCEEDED"
    assert backfill.parse_status(STATUS_FAILED, "jfail") == "FAILED"   # not the words in the log tail
    assert backfill.parse_status(STATUS_SUCCEEDED, "j") == "UNKNOWN"   # another job's line
    assert backfill.parse_status(STATUS_404, "nonexist") == "UNKNOWN"
    assert backfill.last_line("a\n\nfatal: b  \n\n") == "fatal: b"


def test_client_env_turns_token_mode_on_only_when_a_token_is_at_hand(tmp_path):
    home = tmp_path / "home"
    assert "RAY_AUTH_MODE" not in backfill.client_env({"HOME": str(home)})
    assert backfill.client_env({"HOME": str(home), "RAY_AUTH_TOKEN": "t"})["RAY_AUTH_MODE"] == "token"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("t")
    assert backfill.client_env({"HOME": str(home)})["RAY_AUTH_MODE"] == "token"
    explicit = {"HOME": str(home), "RAY_AUTH_MODE": "disabled"}
    assert backfill.client_env(explicit)["RAY_AUTH_MODE"] == "disabled"
    token_file = tmp_path / "tok"
    token_file.write_text("t")
    assert backfill.client_env({"HOME": str(tmp_path / "x"), "RAY_AUTH_TOKEN_PATH": str(token_file)})["RAY_AUTH_MODE"] == "token"


def test_backfill_cli_reports_usage_errors_in_one_line(capsys):
    rc = backfill.main(["--address", "http://127.0.0.1:1", "--regions", "demo",
                        "--start", "2024-09", "--end", "2024-07"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err == "backfill: error: --start 2024-09 is after --end 2024-07; swap them"
    args = backfill.parse_args(["--address", "a", "--regions", "r1", "r2", "--start", "2024-01",
                                "--end", "2024-01", "--", "ray=cluster", "output.root=s3://b/x"])
    assert args.regions == ["r1", "r2"] and args.overrides == ["ray=cluster", "output.root=s3://b/x"]


def test_backfill_marks_months_it_could_not_submit(capfd):
    """Nothing listens at the address: the month is SUBMIT_FAILED with Ray's reason, exit 1."""
    address = f"http://127.0.0.1:{free_port()}"
    rc = backfill.main(["--address", address, "--regions", "demo", "--start", "2024-07", "--end", "2024-07",
                        "--poll-s", "0", "--", "model=demo"])
    out, err = capfd.readouterr()
    assert rc == 1
    assert f"not submitted demo 2024-07: ray job submit failed: ConnectionError: Failed to connect to Ray at address: {address}" in err
    assert re.search(r"^SUBMIT_FAILED demo 2024-07 raysam-demo-2024-07-[0-9a-f]{8}$", out, re.M)
    assert "backfill: 0/1 month(s) succeeded; not: demo 2024-07 (SUBMIT_FAILED)" in out


# ---------------------------------------------------------------------------------------------
# jobs/*.yaml
# ---------------------------------------------------------------------------------------------
def _runtime_env_yaml() -> dict:
    return yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())


def test_runtime_env_is_valid_ships_the_checkout_and_installs_from_the_working_dir():
    from ray.runtime_env import RuntimeEnv

    spec = _runtime_env_yaml()
    RuntimeEnv(**spec)  # Ray's own validation of every field
    assert spec["working_dir"] == "."
    assert {".git", ".venv", "demo_data", "models", "outputs"} <= set(spec["excludes"])
    packages = spec["pip"]["packages"]
    # pip runs outside the working dir: a relative path ("-e .", ".") would not find raysam.
    assert all(not p.lstrip("-e ").startswith(".") for p in packages)
    assert any("${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}" in p for p in packages)
    assert "PC_SDK_SUBSCRIPTION_KEY" not in json.dumps(spec)


def test_rayjob_manifest_uses_token_auth_and_this_ray_version():
    doc = yaml.safe_load((REPO / "jobs" / "rayjob.yaml").read_text())
    import ray

    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec, cluster = doc["spec"], doc["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["rayVersion"] == ray.__version__
    images = [c["image"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]]
    assert all(img.startswith(f"rayproject/ray:{ray.__version__}-") for img in images)
    # worker pods keep idle workers as long as the local instance a run starts (raysam.driver)
    from raysam.driver import IDLE_WORKER_KEEP_MS

    for group in cluster["workerGroupSpecs"]:
        env = {e["name"]: e.get("value") for c in group["template"]["spec"]["containers"] for e in c["env"]}
        assert env["RAY_idle_worker_killing_time_threshold_ms"] == str(IDLE_WORKER_KEEP_MS)
    assert spec["entrypoint"].startswith("python -m raysam.run ")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert "PC_SDK_SUBSCRIPTION_KEY" not in spec["runtimeEnvYAML"]
    # raysam.run reads conf/ beside the package: the job needs the checkout, not just a wheel.
    assert runtime_env["working_dir"].endswith(".zip")
    assert runtime_env["pip"]["packages"] == ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"]
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**runtime_env)


# ---------------------------------------------------------------------------------------------
# A local head node with token authentication
# ---------------------------------------------------------------------------------------------
@dataclass
class Head:
    """A running head node started by this module."""

    address: str      # the dashboard (job API) URL
    token: str
    base: Path        # its temp dir root (short: Unix socket paths are limited to 107 bytes)
    proc: subprocess.Popen
    log: Path


def _clean_env(home: Path) -> dict[str, str]:
    """This environment without Ray auth/address settings, with its own HOME and the venv on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    env.update(HOME=str(home), PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0")
    return env


def client_env(head: Head, token: str | None = None, mode: str | None = "token") -> dict[str, str]:
    """A submitter's environment: no token file in its HOME; the token and mode as given."""
    home = head.base / "client_home"
    home.mkdir(exist_ok=True)
    env = _clean_env(home)
    env.update({k: v for k, v in (("RAY_AUTH_TOKEN", token), ("RAY_AUTH_MODE", mode)) if v is not None})
    return env


def ray_cli(args: list[str], env: dict[str, str], cwd: Path = REPO, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False)


def _start_args(base: Path) -> tuple[list[str], int]:
    dash = free_port()
    args = ["start", "--head", "--block", f"--port={free_port()}", f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2", "--num-gpus=0",
            f"--temp-dir={base / 'ray'}", f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            "--object-store-memory=500000000", "--disable-usage-stats"]
    return args, dash


def _wait_ready(head: Head, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.proc.poll() is not None:
            break
        if ray_cli(["job", "list", "--address", head.address], client_env(head, head.token), timeout_s=60).returncode == 0:
            return
        time.sleep(2)
    raise RuntimeError(f"head node did not come up: {head.log.read_text()[-3000:]}")


@contextlib.contextmanager
def running_head():
    """A head node with token auth on (generated token in its HOME, mode not set), stopped after."""
    base = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
    home = base / "home"
    home.mkdir()
    env = _clean_env(home)
    gen = subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, text=True, check=True)
    token = gen.stdout.strip()
    assert (home / ".ray" / "auth_token").read_text().strip() == token and len(token) >= 32
    args, dash = _start_args(base)
    log = base / "ray_start.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([RAY, *args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(f"http://127.0.0.1:{dash}", token, base, proc, log)
    try:
        _wait_ready(head)
        yield head
    finally:
        stop_process_tree(proc)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    """The module's head node (see :func:`running_head`)."""
    with running_head() as head:
        yield head


@pytest.fixture(scope="module")
def demo_dir(demo_catalog) -> Path:
    """RAYSAM_DEMO_DIR for the jobs: the session's demo catalog (the seed a run builds with) and
    the demo model, built here once, before any job, so concurrent jobs never race to build them."""
    from raysam.demo.model import build_demo_model

    root = demo_catalog.root.parent
    if not (root / "models" / "demo" / "manifest.json").exists():
        build_demo_model(root / "models" / "demo")
    return root


def wait_terminal(head: Head, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> str:
    """Poll ``ray job status`` until the job is terminal; its state (parsed by backfill)."""
    deadline = time.monotonic() + timeout_s
    state = "UNKNOWN"
    while time.monotonic() < deadline:
        out = ray_cli(["job", "status", "--address", head.address, job_id], client_env(head, head.token))
        state = backfill.parse_status(out.stdout + out.stderr, job_id)
        if state in backfill.TERMINAL:
            return state
        time.sleep(3)
    ray_cli(["job", "stop", "--address", head.address, job_id], client_env(head, head.token))
    return state


def job_logs(head: Head, job_id: str) -> str:
    return ray_cli(["job", "logs", "--address", head.address, job_id], client_env(head, head.token)).stdout


def job_runtime_env(head: Head, **env_vars: str) -> Path:
    """jobs/runtime_env.yaml for this machine: no pip (the venv has the deps), plus env_vars."""
    spec = _runtime_env_yaml()
    spec.pop("pip")
    spec["env_vars"] = {**spec.get("env_vars", {}), **env_vars}
    path = head.base / f"runtime_env_{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_submit_is_refused_without_the_right_token(ray_head):
    """Token auth is on: a wrong token, or a token without RAY_AUTH_MODE=token, is refused."""
    tiny = ray_head.base / "tiny"
    tiny.mkdir(exist_ok=True)
    submit = ["job", "submit", "--address", ray_head.address, "--working-dir", str(tiny), "--no-wait"]
    wrong = ray_cli([*submit, "--submission-id", "wrong-token", "--", "python", "-c", "print(1)"],
                    client_env(ray_head, "not-the-token"))
    assert wrong.returncode != 0
    assert "Authentication failed: Forbidden: Invalid authentication token" in wrong.stderr
    # Ray 2.60's job client sends the token only when RAY_AUTH_MODE=token is set.
    no_mode = ray_cli([*submit, "--submission-id", "no-mode", "--", "python", "-c", "print(1)"],
                      client_env(ray_head, ray_head.token, mode=None))
    assert no_mode.returncode != 0
    assert "Authentication required: Unauthorized: Missing authentication token" in no_mode.stderr
    listed = ray_cli(["job", "list", "--address", ray_head.address], client_env(ray_head, ray_head.token))
    assert listed.returncode == 0
    assert "wrong-token" not in listed.stdout and "no-mode" not in listed.stdout


def _group_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("demo/*/*/_COMPLETE.json"))


def _check_group_outputs(group: Path) -> None:
    import geopandas as gpd
    import numpy as np
    import rasterio

    masks = gpd.read_parquet(group / "masks.parquet")
    assert len(masks) > 0 and masks.crs.to_epsg() == 4326
    assert {"id", "predicted_iou", "stability_score"} <= set(masks.columns)
    with rasterio.open(group / "labels.tif") as src:
        labels = src.read(1)
        assert src.dtypes[0] == "uint32" and src.crs is not None
    ids = set(np.unique(labels)) - {0}
    assert ids and ids <= set(masks["label_id"])
    assert isinstance(json.loads((group / "manifest.json").read_text()), dict)


@dataclass(frozen=True)
class FinishedJob:
    job_id: str
    output_root: Path
    submit_out: str
    state: str
    logs: str


DEMO_OVERRIDES = ["model=demo", *SMALL_DEMO]


@pytest.fixture(scope="module")
def demo_job(ray_head, demo_dir) -> FinishedJob:
    """`ray job submit --runtime-env jobs/runtime_env.yaml --no-wait -- python -m raysam.run
    region=demo region.time_range=[2024-07-01,2024-07-31] ...`, polled until it ends.

    The command is the backfill's July job (same builder, same overrides, same output root), so
    the backfill test below finds July complete: re-running a backfill resumes it.
    """
    root = ray_head.base / "out"
    cmd = backfill.entrypoint("demo", date(2024, 7, 1), date(2024, 7, 31), [*DEMO_OVERRIDES, f"output.root={root}"])
    runtime_env = job_runtime_env(ray_head, RAYSAM_DEMO_DIR=str(demo_dir))
    job_id = f"raysam-demo-{uuid.uuid4().hex[:6]}"
    out = ray_cli(["job", "submit", "--address", ray_head.address, "--runtime-env", str(runtime_env),
                   "--submission-id", job_id, "--no-wait", "--", *cmd], client_env(ray_head, ray_head.token))
    assert out.returncode == 0, out.stderr[-2000:]
    state = wait_terminal(ray_head, job_id)
    return FinishedJob(job_id, root, out.stdout + out.stderr, state, job_logs(ray_head, job_id))


@pytest.mark.slow
def test_raysam_demo_job_succeeds_and_writes_complete_outputs(demo_job):
    """The submitted raysam job ends SUCCEEDED with both July date groups complete."""
    assert backfill.parse_submitted(demo_job.submit_out) == demo_job.job_id
    assert demo_job.state == "SUCCEEDED", demo_job.logs[-4000:]
    assert "raysam: 2 date group(s) written, 0 already complete" in demo_job.logs
    groups = _group_dirs(demo_job.output_root)
    assert [g.name for g in groups] == ["demo_20240701", "demo_20240711"]
    for group in groups:
        _check_group_outputs(group)


@pytest.mark.slow
def test_backfill_resumes_july_and_reports_the_month_that_failed(ray_head, demo_dir, demo_job):
    """Backfill July-August: July is already complete (skipped, SUCCEEDED); August has no imagery (FAILED)."""
    runtime_env = job_runtime_env(ray_head, RAYSAM_DEMO_DIR=str(demo_dir))
    env = client_env(ray_head, ray_head.token, mode=None)   # backfill turns token mode on itself
    cmd = [sys.executable, str(REPO / "jobs" / "backfill.py"), "--address", ray_head.address,
           "--regions", "demo", "--start", "2024-07", "--end", "2024-08", "--runtime-env", str(runtime_env),
           "--poll-s", "2", "--timeout-h", str(JOB_TIMEOUT_S / 3600),
           "--", *DEMO_OVERRIDES, f"output.root={demo_job.output_root}"]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=JOB_TIMEOUT_S + 60)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    ok = [ln for ln in lines if re.fullmatch(r"SUCCEEDED +demo 2024-07 raysam-demo-2024-07-[0-9a-f]{8}", ln)]
    failed = [ln for ln in lines if re.fullmatch(r"FAILED +demo 2024-08 raysam-demo-2024-08-[0-9a-f]{8}", ln)]
    assert len(ok) == 1 and len(failed) == 1, out.stdout
    assert "backfill: 1/2 month(s) succeeded; not: demo 2024-08 (FAILED)" in out.stdout
    assert "raysam: 0 date group(s) written, 2 already complete" in job_logs(ray_head, ok[0].split()[-1])
    assert "raysam: error: no Sentinel-2 items" in job_logs(ray_head, failed[0].split()[-1])
