"""Backfill driver: one ``ray job submit`` per (region, month), then a report of which succeeded.

    python jobs/backfill.py --address http://HEAD:8265 --regions iowa --start 2024-04 --end 2024-10 \
        --runtime-env jobs/runtime_env.yaml -- ray=cluster output.root=s3://bucket/raysam

Run it from the repository root (the runtime env's ``working_dir: .`` is this checkout). Each
job runs ``python -m raysam.run region=R region.time_range=[first,last] OVERRIDES...`` for one
month; at most ``--max-parallel`` jobs run at once. A month whose outputs are complete is
skipped by raysam itself, so re-running the same backfill resumes it.

Token authentication (Ray >= 2.52; on by default for local clusters since 2.59): the ``ray``
CLI sends the token only when ``RAY_AUTH_MODE=token`` is set in its environment. This driver
sets it for its ``ray`` calls when a token is available (``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) and the mode is not set explicitly.
"""

from __future__ import annotations

import argparse
import calendar
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not
from raysam.errors import ConfigError  # noqa: E402  (stdlib-only module)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
STATES = ("PENDING", "RUNNING", *TERMINAL)
_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
# What Ray 2.60's `ray job submit` / `ray job status` print (ray/dashboard/modules/job/cli.py),
# with ANSI colours even into a pipe: "Job 'ID' submitted successfully"; for status, "Job 'ID'
# succeeded", "Job 'ID' failed" (then "Status message: ..." with the job's log tail), "Job 'ID' was
# stopped", or "Status for job 'ID': PENDING|RUNNING".
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SUBMITTED = re.compile(r"Job '([\w-]+)' submitted successfully")
_TERMINAL_WORDS = {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}


@dataclass(frozen=True)
class Job:
    """One month of one region, submitted as one Ray job."""

    region: str
    month: str  # YYYY-MM
    submission_id: str


def parse_month(text: str) -> tuple[int, int]:
    """``YYYY-MM`` as (year, month); raises ConfigError naming the expected form."""
    match = _MONTH.match(text.strip())
    if not match or not 1 <= int(match.group(2)) <= 12:
        raise ConfigError(f"month {text!r} is not YYYY-MM (e.g. 2024-04)")
    return int(match.group(1)), int(match.group(2))


def months(start: str, end: str) -> list[tuple[date, date]]:
    """Inclusive (first day, last day) of every month from ``start`` to ``end`` (``YYYY-MM``)."""
    y, m = parse_month(start)
    end_ym = parse_month(end)
    if (y, m) > end_ym:
        raise ConfigError(f"--start {start} is after --end {end}; swap them")
    out = []
    while (y, m) <= end_ym:
        out.append((date(y, m, 1), date(y, m, calendar.monthrange(y, m)[1])))
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return out


def entrypoint(region: str, first: date, last: date, overrides: list[str]) -> list[str]:
    """The raysam command of one job (``ray job submit`` shell-quotes it with ``shlex.join``)."""
    return ["python", "-m", "raysam.run", f"region={region}",
            f"region.time_range=[{first.isoformat()},{last.isoformat()}]", *overrides]


def submission_id(region: str, month: str) -> str:
    """A readable, unique job id: ``raysam-<region>-<YYYY-MM>-<8 hex>``."""
    return f"raysam-{re.sub(r'[^A-Za-z0-9]+', '-', region)}-{month}-{uuid.uuid4().hex[:8]}"


def ray_cli() -> str:
    """The ``ray`` CLI next to this interpreter (an un-activated venv), else the one on PATH."""
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else "ray"


def client_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for ``ray job`` calls: ``RAY_AUTH_MODE=token`` when a token is at hand.

    Ray 2.60's job client attaches the token only in token mode, and the mode is read from
    ``RAY_AUTH_MODE`` alone; an explicit ``RAY_AUTH_MODE`` is left as it is.
    """
    env = dict(os.environ if environ is None else environ)
    token_file = env.get("RAY_AUTH_TOKEN_PATH") or str(Path(env.get("HOME", "~")).expanduser() / ".ray" / "auth_token")
    if "RAY_AUTH_MODE" not in env and (env.get("RAY_AUTH_TOKEN") or Path(token_file).is_file()):
        env["RAY_AUTH_MODE"] = "token"
    return env


def last_line(text: str) -> str:
    """The last non-empty line of a command's output (Ray's error messages end there)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def parse_submitted(output: str) -> str | None:
    """The job id that ``ray job submit`` reports as submitted, or None."""
    match = _SUBMITTED.search(_ANSI.sub("", output))
    return match.group(1) if match else None


def parse_status(output: str, job_id: str) -> str:
    """The state of ``job_id`` in ``ray job status`` output, or UNKNOWN (e.g. a refused request).

    Only the CLI's own status line counts; the status message after it quotes the job's logs.
    """
    text = _ANSI.sub("", output).split("Status message:")[0]
    quoted = re.escape(f"'{job_id}'")
    match = re.search(rf"Status for job {quoted}: ([A-Z]+)", text)
    if match:
        return match.group(1) if match.group(1) in STATES else "UNKNOWN"
    match = re.search(rf"Job {quoted} (succeeded|failed|was stopped)\b", text)
    return _TERMINAL_WORDS[match.group(1)] if match else "UNKNOWN"


def _ray(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ray_cli(), *args], capture_output=True, text=True, check=False, env=client_env())


def submit(address: str, runtime_env: str | None, job_id: str, command: list[str]) -> str:
    """``ray job submit --no-wait``; returns the submission id or raises RuntimeError."""
    args = ["job", "submit", "--address", address, "--submission-id", job_id, "--no-wait"]
    args += ["--runtime-env", runtime_env] if runtime_env else ["--working-dir", "."]
    out = _ray([*args, "--", *command])
    found = parse_submitted(out.stdout + out.stderr)
    if out.returncode != 0 or found != job_id:
        raise RuntimeError(f"ray job submit failed: {last_line(out.stderr or out.stdout)}")
    return found


def status(address: str, job_id: str) -> str:
    """``ray job status``: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED or UNKNOWN."""
    out = _ray(["job", "status", "--address", address, job_id])
    return parse_status(out.stdout + out.stderr, job_id)


def start_job(address: str, runtime_env: str | None, month: tuple[str, date, date], overrides: list[str]) -> tuple[Job, bool]:
    """Submit one (region, first, last) month; (job, submitted?). A refused submit is printed."""
    region, first, last = month
    job = Job(region, f"{first:%Y-%m}", submission_id(region, f"{first:%Y-%m}"))
    try:
        submit(address, runtime_env, job.submission_id, entrypoint(region, first, last, overrides))
    except RuntimeError as err:
        print(f"not submitted {job.region} {job.month}: {err}", file=sys.stderr, flush=True)
        return job, False
    print(f"submitted {job.region} {job.month}: {job.submission_id}", flush=True)
    return job, True


def run_backfill(address: str, todo: list[tuple[str, date, date]], overrides: list[str],
                 runtime_env: str | None, max_parallel: int, poll_s: float, timeout_s: float) -> dict[Job, str]:
    """Submit (region, first, last) months, at most ``max_parallel`` at once; their final states.

    A month whose submit is refused is ``SUBMIT_FAILED``; at the timeout, running months keep
    their last state and months never submitted are ``NOT_SUBMITTED``.
    """
    queue, running, done = list(todo), [], {}
    deadline = time.monotonic() + timeout_s
    while queue or running:
        while queue and len(running) < max_parallel:
            job, ok = start_job(address, runtime_env, queue.pop(0), overrides)
            if ok:
                running.append(job)
            else:
                done[job] = "SUBMIT_FAILED"
        if not running:
            continue
        time.sleep(poll_s)
        states = {job: status(address, job.submission_id) for job in running}
        done |= {job: s for job, s in states.items() if s in TERMINAL}
        running = [job for job in running if job not in done]
        if time.monotonic() > deadline:
            left = {Job(r, f"{f:%Y-%m}", "-"): "NOT_SUBMITTED" for r, f, _ in queue}
            return done | {job: states[job] for job in running} | left
    return done


def report(states: dict[Job, str]) -> int:
    """Print one line per month and a summary; 0 when every month succeeded, else 1."""
    for job, state in sorted(states.items(), key=lambda kv: (kv[0].region, kv[0].month)):
        print(f"{state:9s} {job.region} {job.month} {job.submission_id}")
    failed = [job for job, state in states.items() if state != "SUCCEEDED"]
    listed = ", ".join(f"{j.region} {j.month} ({states[j]})" for j in failed)
    print(f"backfill: {len(states) - len(failed)}/{len(states)} month(s) succeeded" + (f"; not: {listed}" if failed else ""))
    return 1 if failed else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line: options, then ``--`` and raysam Hydra overrides."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="Ray dashboard address, http://HEAD:8265")
    parser.add_argument("--regions", nargs="+", required=True)
    parser.add_argument("--start", required=True, help="first month, YYYY-MM")
    parser.add_argument("--end", required=True, help="last month, YYYY-MM")
    parser.add_argument("--runtime-env", default=None, help="e.g. jobs/runtime_env.yaml (default: --working-dir .)")
    parser.add_argument("--max-parallel", type=int, default=2, help="jobs running at once")
    parser.add_argument("--poll-s", type=float, default=30.0)
    parser.add_argument("--timeout-h", type=float, default=48.0)
    parser.add_argument("overrides", nargs="*", help="raysam overrides after --, e.g. ray=cluster")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Submit, wait, report; exit 0 only when every month succeeded (2 on a usage error)."""
    args = parse_args(argv)
    try:
        if args.max_parallel < 1:
            raise ConfigError(f"--max-parallel must be >= 1, got {args.max_parallel}")
        todo = [(r, first, last) for r in args.regions for first, last in months(args.start, args.end)]
        states = run_backfill(args.address, todo, args.overrides, args.runtime_env,
                              args.max_parallel, args.poll_s, args.timeout_h * 3600)
    except ConfigError as err:
        print(f"backfill: error: {err}", file=sys.stderr)
        return 2
    return report(states)


if __name__ == "__main__":
    sys.exit(main())
