"""The Hydra entrypoint: ``python -m raysam.run region=demo model=demo``, and its one error boundary.

:func:`cli` is the only way out of a command line, and every way out is one line on stderr:

* a bad input (a :class:`~raysam.errors.RaysamError`, Hydra's parse, override, sweep and
  ``--cfg`` errors, a Ray address that does not answer) exits 2 with the line naming the
  problem and the fix; every job's config of a multirun is checked before the first starts
  (:mod:`raysam.command_line`);
* an unexpected internal error exits 1 with a line giving the log file that holds its traceback
  (``run.log`` in the Hydra run directory);
* SIGTERM or SIGINT stop the run within seconds (:mod:`raysam.interrupt`) and exit 128 + the
  signal, with a line saying what was kept.

The full traceback always goes to the run's log, and to the console only with ``verbose=true``.
The thin ``@hydra.main`` task validates the composed config (before Ray starts) and calls the
plain :func:`run`, which returns the run's metrics.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
import yaml
from hydra.experimental.callback import Callback
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from raysam import interrupt
from raysam.command_line import CONF_DIR, command_line_error, hydra_error_line
from raysam.config import PC_KEY_ENV, RunConfig, redacted
from raysam.console import FILE_ONLY
from raysam.errors import USAGE_EXIT_CODE, RaysamError, user_error_in
from raysam.hydra_config import to_run_config

log = logging.getLogger("raysam")

INTERNAL_EXIT_CODE = 1
__all__ = ["CONF_DIR", "cli", "hide_secret_overrides", "main", "run"]


class RedactSecrets(Callback):
    """Rewrites Hydra's saved ``.hydra/*.yaml`` and ``multirun.yaml`` without the STAC key.

    Hydra saves the composed config before calling the task; this callback runs right after
    (``on_job_start``) and replaces the key (from ``stac.pc_key`` or the environment) where it
    is a value: a config field, a URL's query parameter, a saved ``key=value`` override
    (:func:`raysam.config.redacted`). Text that merely contains the key is left alone.
    """

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        secrets = [s for s in (config.get("stac", {}).get("pc_key"), os.environ.get(PC_KEY_ENV)) if s]
        if not secrets:
            return
        hc = HydraConfig.get()
        out = Path(hc.runtime.output_dir)
        paths = list((out / hc.output_subdir).glob("*.yaml")) if hc.output_subdir else []
        sweep_yaml = Path(hc.sweep.dir) / "multirun.yaml"
        paths += [sweep_yaml] if sweep_yaml.exists() else []
        for path in paths:
            saved = yaml.safe_load(path.read_text())
            clean = redacted(saved, secrets)
            if clean != saved:
                path.write_text(yaml.safe_dump(clean, sort_keys=False, allow_unicode=True))


SECRET_OVERRIDES = ("stac.pc_key=", "pc_key=", "+stac.pc_key=", "++stac.pc_key=")


def hide_secret_overrides(argv: list[str]) -> list[str]:
    """Move a key given on the command line into the environment before Hydra sees it.

    ``stac.pc_key=KEY`` (or the seed's ``pc_key=KEY``) becomes ``PC_SDK_SUBSCRIPTION_KEY`` in
    this process's environment, and the override is dropped: the run reads the variable
    (:func:`raysam.config.from_tree`), so neither ``--cfg job``, Hydra's saved ``.hydra/``
    files nor ``multirun.yaml`` ever hold the key.
    """
    kept = []
    for arg in argv:
        prefix = next((p for p in SECRET_OVERRIDES if arg.startswith(p)), None)
        if prefix is None:
            kept.append(arg)
        elif arg[len(prefix):] not in ("", "null"):
            os.environ[PC_KEY_ENV] = arg[len(prefix):]
    return kept


def run(cfg: RunConfig) -> dict[str, Any]:
    """Plan, then (unless ``dry_run``) segment every incomplete date group and write its sinks.

    Returns:
        Metrics: date groups done/skipped, chips, masks, km², wall time, chips/s.
    """
    from raysam.driver import execute, prepare

    if cfg.stac.pc_key:  # Ray workers sign hrefs with the key of their environment, inherited from here
        os.environ[PC_KEY_ENV] = cfg.stac.pc_key
    t0 = time.perf_counter()
    prepared = prepare(cfg)
    if cfg.dry_run:
        from raysam.inprocess import runs_in_process

        where = ("in this process, without Ray" if runs_in_process(cfg, prepared.plan.todo) else "on Ray")
        print(f"{prepared.describe(cfg.ray)}\nthe run would go {where} (ray.in_process_max_chips="
              f"{cfg.ray.in_process_max_chips})")
        return {"dry_run": True, "groups": len(prepared.plan.groups)}
    try:
        metrics = execute(cfg, prepared)
    except Exception as err:  # Ray wraps errors from tasks and actors: show ours, not its report
        if (user := user_error_in(err)) is None:
            raise
        if user is err:
            raise
        raise user from err
    metrics["wall_s"] = time.perf_counter() - t0
    chips = metrics["chips_segmented"] + metrics["chips_resumed"]
    metrics["chips_per_s"] = metrics["chips_segmented"] / metrics["wall_s"] if metrics["wall_s"] else 0.0
    resumed = f", {metrics['chips_resumed']} from checkpoints" if metrics["chips_resumed"] else ""
    print(
        f"raysam: {metrics['groups_done']} date group(s) written, {metrics['groups_skipped']} already complete; "
        f"{chips} chips ({metrics['chips_skipped']} skipped{resumed}), {metrics['masks']} masks, "
        f"{metrics['area_km2']:,.1f} km² in {metrics['wall_s']:.1f} s ({metrics['chips_per_s']:.2f} chips/s)"
    )
    return metrics


# ---------------------------------------------------------------------------------------------
# The error boundary
# ---------------------------------------------------------------------------------------------
class _Exit(BaseException):
    """Leave the Hydra task with an exit code and the line to print. A BaseException, as
    ``sys.exit`` is: Hydra lets it through, so a multirun stops at the failed job."""

    def __init__(self, code: int, line: str):
        super().__init__(code)
        self.code, self.line = code, line


def _say(line: str) -> None:
    print(f"raysam: {line}" if not line.startswith("raysam: ") else line, file=sys.stderr, flush=True)


def _run_log() -> str | None:
    """The run's log file (the Hydra job logging's file handler), if logging is set up."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return None


def _crash_log(err: BaseException) -> str:
    """Write a traceback that has no run log yet (before Hydra set one up) to a file of its own."""
    fd, path = tempfile.mkstemp(prefix="raysam-error-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        traceback.print_exception(err, file=f)
    return path


def _internal_line(err: BaseException, log_path: str) -> str:
    first = (str(err).strip().splitlines() or [""])[0][:200]
    return (f"internal error ({type(err).__name__}: {first}), a bug in raysam: the traceback is in {log_path} "
            "(verbose=true prints it here); please report it with that file")


def _stop_ray() -> None:
    """Stop the Ray instance the run started (or disconnect), so that what Ray prints while it
    stops comes before the run's last line, not after it (after a run, workers' output has
    reached the driver: each group's tasks have returned)."""
    driver = sys.modules.get("raysam.driver")
    if driver is not None:
        driver.shutdown_ray()


def _verbose(argv: list[str]) -> bool:
    return any(a.lstrip("+") in ("verbose=true", "verbose=True") for a in argv)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> dict[str, Any] | None:
    """Hydra task: validate, then :func:`run`; every error becomes one line (see the module)."""
    verbose = bool(cfg.get("verbose", False))
    logging.getLogger("raysam").setLevel(logging.DEBUG if verbose else logging.INFO)
    try:
        return run(to_run_config(cfg))
    except Exception as err:  # noqa: BLE001 - the boundary: one line for everything (a stop is a BaseException)
        user = err if isinstance(err, RaysamError) else user_error_in(err)
        log.error("the run failed", exc_info=err, extra=FILE_ONLY)
        if verbose:
            traceback.print_exception(err, file=sys.stderr)
        if user is not None:
            raise _Exit(USAGE_EXIT_CODE, f"error: {user}") from None
        raise _Exit(INTERNAL_EXIT_CODE, _internal_line(err, _run_log() or _crash_log(err))) from None


def cli(argv: list[str]) -> int:
    """``python -m raysam.run ARGS``: check the command line, run Hydra, return the exit code.

    Args:
        argv: ``sys.argv``, the program name first.
    """
    argv = hide_secret_overrides(argv)
    verbose = _verbose(argv)
    saved_argv, saved_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's errors reach this boundary instead of being printed
    try:
        with interrupt.guard():
            if problem := command_line_error(argv):
                _say(f"error: {problem}")
                return USAGE_EXIT_CODE
            sys.argv = argv
            main()
            _stop_ray()  # now, not in Ray's exit hook, which first sleeps 0.5 s for workers' last lines
            return 0
    except _Exit as done:
        _stop_ray()
        _say(done.line)
        return done.code
    except KeyboardInterrupt:  # RunInterrupted, or what Ray's waits made of it
        signum = interrupt.received() or signal.SIGINT
        _stop_ray()
        interrupt.REPORT.print_once(signum)
        return 128 + signum
    except SystemExit as done:  # argparse (--help, a bad flag) and Hydra's own exits
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except (HydraException, OmegaConfBaseException) as err:
        if verbose:
            traceback.print_exception(err, file=sys.stderr)
        _say(f"error: {hydra_error_line(err)}")
        return USAGE_EXIT_CODE
    except RaysamError as err:
        _say(f"error: {err}")
        return USAGE_EXIT_CODE
    except OSError as err:  # outside the task: Hydra creating its run directory or saving .hydra/
        _say(f"error: cannot write Hydra's run files ({err}): point hydra.run.dir (hydra.sweep.dir with -m) "
             "at a directory this user can create and write")
        return USAGE_EXIT_CODE
    except Exception as err:  # noqa: BLE001 - the boundary, before Hydra set up the run's log
        if verbose:
            traceback.print_exception(err, file=sys.stderr)
        log_path = _run_log()
        if log_path:
            log.error("the command failed", exc_info=err, extra=FILE_ONLY)
        _say(_internal_line(err, log_path or _crash_log(err)))
        return INTERNAL_EXIT_CODE
    finally:
        sys.argv = saved_argv
        if saved_env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_env


def _exit(code: int) -> None:
    """Leave the process once its output is flushed, without Python's teardown of the modules:
    the run's files are closed and published (or removed) by now, Ray is stopped, and the
    teardown took 0.6 s (GDAL, ONNX Runtime, Arrow), or hung on pyarrow's object-store
    finaliser while a call given up on (:mod:`raysam.deadline`) still ran."""
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.suppress(Exception):
        logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    _exit(cli(sys.argv))
