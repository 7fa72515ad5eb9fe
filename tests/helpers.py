"""Helpers shared by test modules that run ``python -m raysam.run`` in a child process.

Fixtures live in the ``conftest.py`` files; these are plain functions they and tests call.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def demo_run_command(demo_catalog, out: Path, hydra_dir: Path, *args: str,
                     model_dir: Path | None = None) -> list[str]:
    """``python -m raysam.run`` on the session's demo catalog and demo model, writing under ``out``."""
    model = model_dir or demo_catalog.root.parent / "models" / "demo"
    return [sys.executable, "-m", "raysam.run", f"stac.demo_root={demo_catalog.root.parent}", f"model.path={model}",
            f"hydra.run.dir={hydra_dir}", f"output.root={out}", *args]


def child_env(ray_tmp: Path | None = None) -> dict[str, str]:
    """This process's environment for a child run: without a Ray address (it starts its own local
    Ray) or a STAC key, this checkout on PYTHONPATH, and ``RAY_TMPDIR`` if given."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PC_SDK_SUBSCRIPTION_KEY")}
    return {**env, "PYTHONPATH": str(REPO), **({"RAY_TMPDIR": str(ray_tmp)} if ray_tmp else {})}


def stop_process_tree(proc: subprocess.Popen) -> None:
    """Stop ``proc`` (a ``ray start --head --block``) and every process it started, and only those:
    SIGTERM, then SIGKILL for whatever is left after 2 s (a Ray worker may ignore SIGTERM)."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        with suppress(psutil.NoSuchProcess):
            p.terminate()
    _gone, alive = psutil.wait_procs(family, timeout=2)
    for p in alive:
        with suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
    proc.poll()


def kill_group(proc: subprocess.Popen) -> None:
    """Kill whatever a run started with ``start_new_session`` left in its process group (Ray's
    local cluster), then reap the run."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@contextmanager
def short_tmp_dir() -> Iterator[Path]:
    """A private directory with a short path under /tmp, removed afterwards (for ``RAY_TMPDIR``:
    Unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# Ray's own messages when its processes do not come up within its fixed 30 s: the raylet never
# registered (a bare Exception), or the GCS never wrote its port file (a RuntimeError).
RAY_STARTUP_TIMEOUTS = ("The current node timed out during startup", "Timed out waiting for file")


def start_local_ray(**kwargs) -> None:
    """``ray.init(**kwargs)`` for a test's local instance, tried twice: once in a few hundred
    starts on a loaded 2-core machine, Ray's raylet or GCS does not come up within Ray's fixed
    30 s (each seen in a full suite run, the GCS without writing a single log line; the rows
    after it passed, and so did the same rows run again).

    Always a fresh instance (``address="local"`` unless told): with no address, ``ray.init``
    joins the cluster a ``ray start`` left on this machine, which another pytest worker's test may
    be running (and then refuses ``num_cpus``)."""
    import ray

    kwargs.setdefault("address", "local")
    try:
        ray.init(**kwargs)
    except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception for one of these
        if not any(message in str(err) for message in RAY_STARTUP_TIMEOUTS):
            raise
        ray.shutdown()
        ray.init(**kwargs)
