"""The command line before Hydra runs it: one line for every mistake Hydra would report in many.

:func:`command_line_error` parses the overrides the way Hydra will and checks, before any job
starts:

* every override parses; an unquoted value that the shell split, or whose quotes it removed,
  gets the quoting that works (``'region.geometry="minx,miny,maxx,maxy"'`` or the list form
  ``region.geometry=[minx,miny,maxx,maxy]``);
* every key is a raysam setting or a config group, including keys added with ``+``
  (``+dryrun=true`` is refused, naming ``dry_run``);
* a comma list without ``-m`` (Hydra's "Ambiguous value") is named as a sweep, with the fixes;
* each job's config composes; with ``-m``, every job's config is also validated (its
  :class:`~raysam.config.RunConfig` and its region) before the first job starts.

Command lines with other Hydra flags (``--cfg``, ``--help``, ...) get the parse and key checks;
what Hydra then raises reaches the command line's error boundary (:func:`hydra_error_line`).
"""

from __future__ import annotations

import functools
import itertools
import re
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from raysam.config import setting_paths, unknown_settings_message
from raysam.errors import RaysamError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
RUN_FLAGS = ("-m", "--multirun")  # the only flags with which every job is composed here first
# Hydra flags whose next argument is their value, not an override.
FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                    "--config-dir", "-cd", "--info", "-i", "--experimental-rerun")
HELP_FLAGS = ("-h", "--help", "--hydra-help", "--version", "--info", "-i", "--shell-completion", "-sc")
QUOTING = "quote a value holding spaces, commas, '=', '~' or brackets as 'key=\"value\"' (single quotes around it all)"


def split_argv(args: list[str]) -> tuple[list[str], list[str]]:
    """(flags with their values, overrides) of the arguments after the program name."""
    flags, overrides, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            takes_value = arg in FLAGS_WITH_VALUE and "=" not in arg
            flags.extend(args[i:i + 2] if takes_value else [arg])
            i += 2 if takes_value else 1
        else:
            overrides.append(arg)
            i += 1
    return flags, overrides


def command_line_error(argv: list[str]) -> str | None:
    """The first problem of a ``python -m raysam.run`` command line, in one line; None if none.

    Args:
        argv: ``sys.argv`` (the program name first), with the key already hidden
            (:func:`raysam.run.hide_secret_overrides`).
    """
    if problem := argparse_error(argv[1:]):
        return problem
    flags, args = split_argv(argv[1:])
    multirun = any(f in RUN_FLAGS for f in flags)
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except HydraException as err:
        return parse_error_line(err, args)
    if problem := unknown_keys(overrides) or sweep_problem(overrides, multirun):
        return problem
    if any(f not in RUN_FLAGS for f in flags):
        return None  # --cfg, --help, --info, ...: Hydra's own path, through the error boundary
    jobs = sweep_jobs(overrides) if multirun else [[o.input_line for o in overrides if not _is_hydra(o)]]
    for number, job in enumerate(jobs):
        prefix = f"job #{number} ({' '.join(_swept(job, overrides))}): " if multirun and len(jobs) > 1 else ""
        try:
            cfg = compose(job)
        except (HydraException, OmegaConfBaseException) as err:
            return prefix + hydra_error_line(err)
        if multirun:
            try:
                validate(cfg)
            except RaysamError as err:
                return prefix + str(err)
    return None


class _ArgvError(Exception):
    pass


def argparse_error(args: list[str]) -> str | None:
    """Hydra's own argument parser's complaint (a misplaced override, a bad ``--cfg`` value), in
    one line instead of its usage text; None when it parses or asks for help."""
    if any(a.split("=")[0] in HELP_FLAGS for a in args):
        return None
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def fail(message: str) -> None:
        raise _ArgvError(message)

    parser.error = fail  # type: ignore[method-assign] - argparse would print its usage and exit
    try:
        parser.parse_args(args)
    except _ArgvError as err:
        hint = "give the overrides together, before or after the flags" if "unrecognized" in str(err) else "fix it"
        return f"bad command line: {err}: {hint} (python -m raysam.run --help lists the flags)"
    return None


def compose(overrides: list[str]) -> Any:
    """The job config Hydra composes from ``conf/`` and ``overrides`` (no hydra.* ones)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    import raysam.hydra_config  # noqa: F401 - registers the schema

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def validate(cfg: Any) -> None:
    """Everything a job checks about its own config before it starts: the typed config and the region."""
    from raysam.hydra_config import to_run_config
    from raysam.region import load_region

    load_region(to_run_config(cfg).region)


def hydra_error_line(err: BaseException) -> str:
    """One line for a Hydra/OmegaConf error: its message without the search path, plus its cause."""
    message = str(err).split("Config search path")[0]
    cause = err.__cause__
    if cause is not None and str(cause).strip():  # the why: "Value 'abc' could not be converted to Integer"
        message += f": {str(cause).strip().splitlines()[0]}"
    return f"bad command-line override: {' '.join(message.split())[:300]}"


def parse_error_line(err: BaseException, args: list[str]) -> str:
    """One line for an override Hydra cannot parse, naming it, with the quoting that works."""
    parser = OverridesParser.create()
    bad = next((a for a in args if not _parses(parser, a)), None)
    why = " ".join(str(err).split("See https://hydra.cc")[0].split())[:120]
    if bad is None or bad.startswith(("region.geometry=", "+region.geometry=")) or not re.match(r"^[+~\w.@/-]+=", bad):
        return (f"cannot parse the command line at {bad!r} ({why}): the shell split or unquoted a value; write "
                "a region as 'region.geometry=\"minx,miny,maxx,maxy\"' or 'region.geometry=\"POLYGON ((...))\"' "
                "(single quotes around it all), or region.geometry=[minx,miny,maxx,maxy]")
    key = bad.split("=", 1)[0]
    return f"cannot parse the override {bad!r} ({why}): write it as '{key}=\"{bad.split('=', 1)[1]}\"'; {QUOTING}"


def _parses(parser: OverridesParser, arg: str) -> bool:
    try:
        parser.parse_overrides([arg])
    except HydraException:
        return False
    return True


def _is_hydra(o: Override) -> bool:
    return o.key_or_group.startswith("hydra")


@functools.cache
def config_groups() -> frozenset[str]:
    """The config groups: directories of ``conf/`` and the groups its defaults list names
    (``experiment``, ``local`` have no option files yet)."""
    import yaml

    defaults = yaml.safe_load((Path(CONF_DIR) / "config.yaml").read_text()).get("defaults", [])
    named = {k.split(" ")[-1] for entry in defaults if isinstance(entry, dict) for k in entry}
    return frozenset(named | {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()})


def _is_group(key: str) -> bool:
    return key.split("@")[0] in config_groups()


def unknown_keys(overrides: list[Override]) -> str | None:
    """Keys that are neither a raysam setting nor a config group (``+dryrun=true``), in one line."""
    known = set(setting_paths())
    unknown = [o.key_or_group for o in overrides
               if not _is_hydra(o) and not _is_group(o.key_or_group) and o.key_or_group not in known]
    return unknown_settings_message(unknown) if unknown else None


def sweep_problem(overrides: list[Override], multirun: bool) -> str | None:
    """A comma list (a sweep) where it cannot be meant: without ``-m``, or a bbox split by the shell."""
    for o in overrides:
        if not o.is_sweep_override():
            continue
        values = list(o.sweep_string_iterator()) if o.is_discrete_sweep() else []
        if o.key_or_group == "region.geometry" and _looks_like_bbox(values):
            text = ",".join(values)
            return (f"region.geometry={text} reached raysam without its quotes (the shell removes them), so Hydra "
                    f"read the commas as a sweep: write 'region.geometry=\"{text}\"' (single quotes around it all) "
                    f"or the list region.geometry=[{text}]")
        if not multirun:
            return (f"{o.input_line} is a comma list, which Hydra reads as a sweep: add -m to run one job per value, "
                    f"write a list as {o.key_or_group}=[{','.join(values) or '...'}], or {QUOTING}")
    return None


def _looks_like_bbox(values: list[str]) -> bool:
    try:
        return len(values) == 4 and all(float(v) == float(v) for v in values)
    except ValueError:
        return False


def sweep_jobs(overrides: list[Override]) -> list[list[str]]:
    """The override list of each job of a multirun, as Hydra's basic sweeper makes them (a key
    given twice keeps its last value; the jobs are the product of the sweeps, in order)."""
    lists: dict[str, list[str]] = {}
    for o in overrides:
        if _is_hydra(o):
            continue
        key = o.get_key_element()
        if o.is_sweep_override() and o.is_discrete_sweep():
            lists[key] = [f"{key}={value}" for value in o.sweep_string_iterator()]
        else:
            lists[key] = [o.input_line]
    return [list(job) for job in itertools.product(*lists.values())]


def _swept(job: list[str], overrides: list[Override]) -> list[str]:
    """The overrides of ``job`` that a sweep chose (to name the job)."""
    swept = {o.get_key_element() for o in overrides if o.is_sweep_override()}
    return [o for o in job if o.split("=", 1)[0] in swept]
