"""The Hydra entrypoint: ``python -m raysam.run region=demo model=demo``.

A thin ``@hydra.main`` that validates the composed config (before Ray starts) and calls the
plain :func:`run`, which returns the run's metrics. User errors end the process with one line
on stderr and exit code 2 (``verbose=true`` shows the stack trace).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from raysam.config import PC_KEY_ENV, RunConfig
from raysam.errors import RaysamError, user_error_in
from raysam.hydra_config import to_run_config

log = logging.getLogger("raysam")

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


class RedactSecrets(Callback):
    """Rewrites Hydra's saved ``.hydra/*.yaml`` and ``multirun.yaml`` without the STAC key.

    Hydra saves the composed config before calling the task; this callback runs right after
    (``on_job_start``) and replaces the key (from ``stac.pc_key`` or the environment) wherever
    it appears, including the saved command-line overrides.
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
            text = path.read_text()
            for secret in secrets:
                text = text.replace(str(secret), "<redacted>")
            path.write_text(text)


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


# Hydra flags whose next argument is their value, not an override.
_FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--info", "-i", "--experimental-rerun")
_RUN_FLAGS = ("-m", "--multirun")  # the only flags with which the overrides are checked first


def override_error(argv: list[str]) -> str | None:
    """Compose the config once with the command line's overrides (sweeps left out).

    Hydra reports a bad override (a wrong type, an unknown key or config group) in several
    lines and exits 1; this finds it first so the run can say it in one line and exit 2.
    Command lines with other Hydra flags (``--cfg``, ``--help``, ...) are left to Hydra.

    Returns:
        The problem in one line, or None when the overrides compose.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = argv[1:]
    if any(a.startswith("-") and a not in _RUN_FLAGS for a in args):
        return None
    overrides = [a for a in args if a not in _RUN_FLAGS]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        plain = [o.input_line for o in parsed if not o.is_sweep_override() and not o.key_or_group.startswith("hydra")]
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            compose(config_name="config", overrides=plain)
    except (HydraException, OmegaConfBaseException) as err:
        message = str(err).split("Config search path")[0]
        if err.__cause__ is not None:  # the why: "Value 'abc' could not be converted to Integer"
            message += f": {str(err.__cause__).strip().splitlines()[0]}"
        return f"bad command-line override: {' '.join(message.split())[:300]}"
    return None


def _setup_logging(verbose: bool) -> None:
    logging.getLogger("raysam").setLevel(logging.DEBUG if verbose else logging.INFO)


def _exit_on_sigterm() -> None:
    """Turn SIGTERM (a preempted node, ``kubectl delete``) into SystemExit, so the run's cleanup
    (staging directories, date-group locks) runs as it does for Ctrl-C. Ray sets the same
    handler once it starts; this covers the planning and claiming before it."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


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
        print(prepared.describe())
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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> dict[str, Any] | None:
    """Hydra task: validate, then :func:`run`. Exits 2 with one line on a user error."""
    verbose = bool(cfg.get("verbose", False))
    _setup_logging(verbose)
    _exit_on_sigterm()
    try:
        return run(to_run_config(cfg))
    except RaysamError as err:
        if verbose:
            raise
        print(f"raysam: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.argv = hide_secret_overrides(sys.argv)
    if problem := override_error(sys.argv):
        print(f"raysam: error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
