#!/usr/bin/env python
"""Scale benchmark: one full-size synthetic MGRS tile at two dates against the demo region.

    .venv/bin/python scripts/bench_scale.py [--tile-px 10980] [--points-per-side 4] [--skip-sink-sweep]
                                            [--data demo_data/scale] [--keep] [--out DIR] [--set KEY=VALUE ...]
                                            [--py-spy FILE]

Builds (once, then reuses) a synthetic catalog of one ``--tile-px`` tile at the demo's two dates
(:func:`raysam.demo.catalog.make_demo_catalog`), serves it with ``rustac serve`` and runs
``python -m raysam.run`` on it (the tile minus a 500 m margin) with the demo model and a small
point grid, so SAM stays cheap and the back half shows. Every run is a fresh process on a fresh
output root; this script only watches it (``/proc``, the output root, the manifests) and prints:

* the total wall, and the wall until the first date group is published (first ``_COMPLETE.json``);
* the driver's CPU-seconds (``/proc/<pid>/stat`` utime + stime) as a share of the machine's busy
  CPU-seconds over the run (``/proc/stat``: every process on the machine, ours or not), and, less
  noisy on a shared machine, as a share of the run's own process tree (sampled every poll);
* peak memory per role (manifests: ``counts.resources.peak_private_mb``; the driver's
  ``peak_rss_mb``) against the demo region run with the same settings in this script (both on
  Ray: ``ray.in_process_max_chips=0``, or the demo's 16 chips would run in one process);
* the back half's wall per group (``timings_s.wall_since_start``: chips -> finalize) with the
  default ``ray.sink_tasks`` (here: one task while chips are read, one per CPU after the last)
  and, unless ``--skip-sink-sweep``, two more scale runs with ``ray.sink_tasks=1`` and ``=2``;
* chips and masks per group, and one summary table with each goal of issue 10 and PASS/FAIL.

It is a benchmark, not a test: on a shared machine the numbers are noisy (load averages are
printed around every run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raysam.checkpoint import CHIPS_DIR, WORK_DIR  # noqa: E402
from raysam.demo.catalog import TILES, CatalogInfo, make_demo_catalog  # noqa: E402
from raysam.demo.scene import tile_inner_bbox_wgs84  # noqa: E402
from raysam.demo.serve import free_port, serve_catalog  # noqa: E402
from raysam.storage.root import MARKER  # noqa: E402

# Goals of issue 10 ("Benchmarks").
DRIVER_CPU_SHARE_MAX = 0.05
ROLE_MEMORY_RATIO_MAX = 1.3
FIRST_PUBLISH_SHARE_MAX = 0.60
MARGIN_M = 500.0  # the scale region is the tile minus this on every side
POLL_S = 0.5  # how often a run is sampled (driver CPU, process tree, output root)
RUN_ENTRY = ("-m", "raysam.run")  # how a run is started (an experiment may wrap it)
RAY_INTERNAL_TITLES = ("ray::_", "ray::ActorLocationTracker", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
CLK_TCK = os.sysconf("SC_CLK_TCK")
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # /proc/stat cpu: user nice system [idle iowait] irq softirq steal


@dataclass(frozen=True)
class RunResult:
    """What one ``python -m raysam.run`` process did, as seen from outside and from its manifests.

    Attributes:
        label: what the run was (for the printout).
        wall_s: process start to exit.
        first_publish_s: process start to the first ``_COMPLETE.json`` under the output root.
        driver_cpu_s: the driver process's utime + stime (last reading before it exited).
        machine_busy_s: busy CPU-seconds of the whole machine over the run (/proc/stat).
        tree_cpu_s: CPU-seconds of the driver and every process below it (Ray's GCS, raylet,
            workers), each process's last reading.
        watcher_cpu_s: this script's own CPU-seconds while it watched (part of machine_busy_s).
        peak_by_task_mb: highest private RSS sampled per Ray worker process title (``ray::...``).
        load_before, load_after: 1-minute load averages.
        manifests: the published groups' manifest.json, in group order.
        chip_timeline: (seconds since start, chips checkpointed per group) at every poll.
    """

    label: str
    wall_s: float
    first_publish_s: float | None
    driver_cpu_s: float
    machine_busy_s: float
    tree_cpu_s: float
    watcher_cpu_s: float
    peak_by_task_mb: dict[str, float]
    load_before: float
    load_after: float
    manifests: tuple[dict, ...]
    chip_timeline: tuple[tuple[float, dict[str, int]], ...]

    @property
    def driver_share(self) -> float:
        return self.driver_cpu_s / self.machine_busy_s if self.machine_busy_s else float("nan")

    @property
    def driver_tree_share(self) -> float:
        return self.driver_cpu_s / self.tree_cpu_s if self.tree_cpu_s else float("nan")

    def roles(self, key: str) -> dict[str, float]:
        """Highest ``counts.resources[key]`` per role over the groups' manifests."""
        out: dict[str, float] = {}
        for m in self.manifests:
            for role, mb in m["counts"]["resources"][key].items():
                out[role] = max(out.get(role, 0.0), mb)
        return out

    def area(self) -> tuple[float, float]:
        """(AOI km², grid megapixels) of the first group (every group of a run shares the AOI)."""
        group = self.manifests[0]["date_group"]
        return group["area_km2"], group["grid"]["width"] * group["grid"]["height"] / 1e6

    def chips_in(self) -> list[tuple[str, float, dict[str, int]]]:
        """Per group: when all its chips were checkpointed (seconds since start, first poll that
        saw them) and how many chips every group had checkpointed then."""
        out = []
        for m in self.manifests:
            gid, planned = m["date_group"]["id"], m["counts"]["chips_planned"]
            seen = next(((t, c) for t, c in self.chip_timeline if c.get(gid, 0) >= planned), None)
            if seen is not None:
                out.append((gid, seen[0], seen[1]))
        return out

    def sink_walls(self) -> list[float]:
        """Per group: seconds from its last chip checkpointed to its publication."""
        walls = [m["timings_s"]["wall_since_start"] for m in self.manifests]
        return [w["finalize"] - w.get("chips", 0.0) for w in walls]


# ------------------------------------------------------------------ sampling /proc


def machine_busy_s() -> float:
    """Busy CPU-seconds of the whole machine since boot (all CPUs)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values[i] for i in BUSY_FIELDS if i < len(values)) / CLK_TCK


def proc_stat(pid: int) -> tuple[int, float, int] | None:
    """(parent pid, utime + stime seconds, start time in ticks) of a process, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(rest[1]), (int(rest[11]) + int(rest[12])) / CLK_TCK, int(rest[19])


def private_mb(pid: int) -> float | None:
    """A process's private resident memory (VmRSS - RssShmem) in MB, or None if gone."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssShmem"):
                    fields[key] = int(value.split()[0])
    except (OSError, ValueError):
        return None
    return (fields.get("VmRSS", 0) - fields.get("RssShmem", 0)) / 1024 if "VmRSS" in fields else None


def ray_title(pid: int) -> str | None:
    """What a Ray worker is doing (its process title ``ray::<task or actor method>``), else None."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().split(b"\0")[0].decode(errors="replace").strip()
    except OSError:
        return None
    return title.split(" ")[0] if title.startswith("ray::") else None


class TreeSampler:
    """CPU-seconds of a process and all its descendants, and the private memory of its Ray
    workers by what they are running, from repeated samples of /proc.

    A process that exits between two samples loses at most one poll interval of CPU. Memory is
    attributed to the task a worker runs at the sample (``ray::IDLE``: between tasks), so it
    tells apart roles that the run's own report merges when one worker process plays several.
    """

    def __init__(self, root_pid: int):
        self.root_pid = root_pid
        self.last: dict[tuple[int, int], float] = {}  # (pid, start ticks) -> CPU seconds
        self.peak_by_title: dict[str, float] = {}  # Ray process title -> highest private MB sampled

    def sample(self) -> None:
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (st := proc_stat(int(entry))) is not None:
                stats[int(entry)] = st
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        todo = [self.root_pid] if self.root_pid in stats else []
        while todo:
            pid = todo.pop()
            _, cpu, start = stats[pid]
            self.last[(pid, start)] = cpu
            todo.extend(children.get(pid, ()))
            if (title := ray_title(pid)) and (mb := private_mb(pid)) is not None:
                self.peak_by_title[title] = max(self.peak_by_title.get(title, 0.0), mb)

    @property
    def total_s(self) -> float:
        return sum(self.last.values())


def chips_checkpointed(out_root: Path) -> dict[str, int]:
    """Chip checkpoints per date group in the run's work directories (``<region>/<run>/.work/<group>/chips``)."""
    counts = {}
    for chips in out_root.glob(f"*/*/{WORK_DIR}/*/{CHIPS_DIR}"):
        try:
            counts[chips.parent.name] = sum(1 for e in os.scandir(chips) if not e.name.startswith("."))
        except OSError:  # the group published meanwhile
            pass
    return counts


def first_marker(out_root: Path) -> bool:
    """Whether a date group under ``out_root`` has been published (``<region>/<run>/<group>/_COMPLETE.json``)."""
    return any(out_root.glob(f"*/*/*/{MARKER}"))


# ------------------------------------------------------------------ running


def run_raysam(label: str, overrides: list[str], out_root: Path, py_spy: Path | None = None) -> RunResult:
    """Run ``python -m raysam.run`` with ``overrides`` into ``out_root`` and watch it until it exits.

    Raises:
        SystemExit: the run failed (its log's tail is printed).
    """
    out_root.mkdir(parents=True, exist_ok=True)
    log_path = out_root / "run.log"
    cmd = [sys.executable, *RUN_ENTRY, f"output.root={out_root}", f"hydra.run.dir={out_root}/_hydra",
           *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    print(f"\n== {label}\n   {' '.join(cmd[1:])}", flush=True)
    load_before = os.getloadavg()[0]
    with open(log_path, "w") as log:
        busy0, t0, own0 = machine_busy_s(), time.perf_counter(), _own_cpu_s()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        spy = _start_py_spy(proc.pid, py_spy)
        tree, driver_cpu, first, timeline = TreeSampler(proc.pid), 0.0, None, []
        while proc.poll() is None:
            timeline.append((time.perf_counter() - t0, chips_checkpointed(out_root)))
            st = proc_stat(proc.pid)
            if st is not None and st[1] >= driver_cpu:  # a zombie's reading is still its own
                driver_cpu = st[1]
            tree.sample()
            if first is None and first_marker(out_root):
                first = time.perf_counter() - t0
            time.sleep(POLL_S)
        wall, busy, own = time.perf_counter() - t0, machine_busy_s() - busy0, _own_cpu_s() - own0
    if spy is not None:
        spy.wait(timeout=60)
    if first is None and first_marker(out_root):
        first = wall
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-20:]
        raise SystemExit(f"{label} failed with exit code {proc.returncode}; log {log_path}:\n" + "\n".join(tail))
    manifests = tuple(json.loads(p.read_text()) for p in sorted(out_root.glob("*/*/*/manifest.json")))
    result = RunResult(label, wall, first, driver_cpu, busy, tree.total_s, own, tree.peak_by_title, load_before,
                       os.getloadavg()[0], manifests, tuple(timeline))
    print_run(result)
    return result


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _start_py_spy(pid: int, output: Path | None) -> subprocess.Popen | None:
    """``py-spy record`` on the driver's busy threads (``.svg``: a flame graph; else collapsed
    stacks, one per line with its sample count), if asked for."""
    if output is None:
        return None
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        raise SystemExit("--py-spy needs py-spy: pip install py-spy")
    fmt = "flamegraph" if output.suffix == ".svg" else "raw"
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "50", "--threads", "--nonblocking",
                             "--format", fmt, "--output", str(output)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ------------------------------------------------------------------ printing


def print_run(r: RunResult) -> None:
    """One run's figures and its groups' chips, masks and back-half walls."""
    first = f"{r.first_publish_s:.1f} s ({r.first_publish_s / r.wall_s:.0%} of the wall)" if r.first_publish_s else "never"
    area_km2, mpx = r.area()
    print(f"   wall {r.wall_s:.1f} s; first group published after {first}; load average {r.load_before:.2f} -> "
          f"{r.load_after:.2f}")
    print(f"   CPU-s: driver {r.driver_cpu_s:.1f}, run's process tree {r.tree_cpu_s:.1f}, whole machine "
          f"{r.machine_busy_s:.1f} (this watcher {r.watcher_cpu_s:.1f}) -> driver share {r.driver_share:.1%} of the "
          f"machine, {r.driver_tree_share:.1%} of the run")
    print(f"   area {area_km2:,.0f} km2 per group, grid {mpx:.1f} Mpx")
    planned = {m["date_group"]["id"]: m["counts"]["chips_planned"] for m in r.manifests}
    for gid, t, counts in r.chips_in():
        others = ", ".join(f"{g} {n}/{planned.get(g, '?')}" for g, n in sorted(counts.items()) if g != gid)
        print(f"   all chips of {gid} checkpointed at {t:.0f} s ({t / r.wall_s:.0%} of the wall); then: {others or '-'}")
    for m in r.manifests:
        c, w = m["counts"], m["timings_s"]["wall_since_start"]
        skipped = ", ".join(f"{k} {v}" for k, v in c["chips_skipped_by_reason"].items()) or "none"
        walls = " ".join(f"{k} {v:.1f}" for k, v in w.items())
        print(f"   group {m['date_group']['id']}: {c['chips_planned']} chips ({c['chips_segmented']} segmented, "
              f"skipped: {skipped}), {c['masks_before_merge']} masks -> {c['masks_after_merge']} after merge; "
              f"{m['date_group']['cells']} cells, {m['date_group']['tiles']} tiles; wall since activation [s]: {walls}; "
              f"sink wall {w['finalize'] - w.get('chips', 0.0):.1f} s")


def memory_table(demo: RunResult, scale: RunResult) -> float:
    """Print peak memory per role (driver: peak RSS; others: peak private RSS); returns the worst ratio."""
    demo_roles, scale_roles = demo.roles("peak_private_mb"), scale.roles("peak_private_mb")
    for run, roles in ((demo, demo_roles), (scale, scale_roles)):
        roles["driver"] = run.roles("peak_rss_mb")["driver"]
    (demo_km2, demo_mpx), (scale_km2, scale_mpx) = demo.area(), scale.area()
    print(f"\nArea: demo {demo_km2:,.0f} km2 / {demo_mpx:.1f} Mpx, scale {scale_km2:,.0f} km2 / {scale_mpx:.1f} Mpx "
          f"(x{scale_km2 / demo_km2:.1f} area, x{scale_mpx / demo_mpx:.1f} grid)")
    print(f"{'role':<8} {'demo MB':>9} {'scale MB':>9} {'ratio':>6}   (driver: peak RSS; others: peak private RSS)")
    worst = 0.0
    for role in sorted(set(demo_roles) | set(scale_roles)):
        a, b = demo_roles.get(role), scale_roles.get(role)
        ratio = b / a if a and b else float("nan")
        if role != "stats" and ratio == ratio:
            worst = max(worst, ratio)
        note = "   (the stats actor; not a goal)" if role == "stats" else ""
        print(f"{role:<8} {a or 0:>9.0f} {b or 0:>9.0f} {ratio:>6.2f}{note}")
    shared = sorted({tuple(p["roles"]) for m in scale.manifests for p in m["counts"]["resources"]["processes"]
                     if len(p["roles"]) > 1})
    if shared:
        print("   (one worker process counts its peak under every role it played: "
              + "; ".join("+".join(r) for r in shared) + ")")
    return worst


def memory_by_task(demo: RunResult, scale: RunResult) -> None:
    """Print the sampled private RSS of Ray workers by the task they were running (this script's /proc samples)."""
    print(f"\n{'Ray worker running (sampled every ' + str(POLL_S) + ' s)':<52} {'demo MB':>9} {'scale MB':>9} {'ratio':>6}")
    for title in sorted(set(demo.peak_by_task_mb) | set(scale.peak_by_task_mb)):
        if title.startswith(RAY_INTERNAL_TITLES):
            continue
        a, b = demo.peak_by_task_mb.get(title), scale.peak_by_task_mb.get(title)
        ratio = f"{b / a:>6.2f}" if a and b else f"{'-':>6}"
        print(f"{title[:52]:<52} {a or 0:>9.0f} {b or 0:>9.0f} {ratio}")


def summary(rows: list[tuple[str, str, str, bool | None]]) -> None:
    """The closing table: goal, measured, target, PASS/FAIL (or info)."""
    print("\nSummary")
    print(f"{'goal':<46} {'measured':>16} {'target':>10}  result")
    for goal, measured, target, ok in rows:
        verdict = "info" if ok is None else ("PASS" if ok else "FAIL")
        print(f"{goal:<46} {measured:>16} {target:>10}  {verdict}")


# ------------------------------------------------------------------ catalog


def scale_catalog(data: Path, tile_px: int) -> CatalogInfo:
    """The synthetic catalog of one ``tile_px`` tile (the demo's tile 16TBM, grown), built once under ``data``."""
    tile = dataclasses.replace(TILES[1], size_px=tile_px)
    aoi = tile_inner_bbox_wgs84(tile, MARGIN_M)
    t0 = time.perf_counter()
    info = make_demo_catalog(data / f"tile{tile_px}", tiles=(tile,), aoi_wgs84=aoi)
    print(f"scale catalog {info.root}: tile {tile.tile_id} {tile_px} px, {len(info.item_ids)} items, "
          f"{info.n_fields} fields, {info.size_bytes / 1e6:.0f} MB ({time.perf_counter() - t0:.0f} s to build or check)")
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tile-px", type=int, default=10980, help="tile side in 10 m pixels (real MGRS: 10980)")
    parser.add_argument("--points-per-side", type=int, default=4)
    parser.add_argument("--skip-sink-sweep", action="store_true", help="skip the two scale runs with ray.sink_tasks=1 and =2")
    parser.add_argument("--data", type=Path, default=REPO / "demo_data" / "scale", help="catalog cache (reused)")
    parser.add_argument("--out", type=Path, default=None, help="output roots (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the outputs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra raysam.run override for every run (repeatable), e.g. output.sinks=[s2_raster]")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="FILE",
                        help="record the main scale run's driver with py-spy: FILE.svg a flame graph, else collapsed stacks")
    args = parser.parse_args()

    info = scale_catalog(args.data.resolve(), args.tile_px)
    # Both regions run on Ray, so every role is its own process (the demo's 16 chips would run in process).
    common = ["model=demo", f"sam.points_per_side={args.points_per_side}", "sam.points_per_batch=16",
              "ray.in_process_max_chips=0", *args.set]
    west, south, east, north = info.aoi_wgs84
    server = serve_catalog(info.root, port := free_port())
    scale_region = ["region=demo", f"region.name=scale{args.tile_px}", f"region.geometry='{west},{south},{east},{north}'",
                    "stac=local", f"stac.url=http://127.0.0.1:{port}"]
    out = (args.out or Path(tempfile.mkdtemp(prefix="bench_scale-"))).resolve()
    try:
        demo = run_raysam("demo region", ["region=demo", *common], out / "demo")
        scale = run_raysam(f"scale region ({args.tile_px} px tile)", [*scale_region, *common], out / "scale",
                           args.py_spy)
        sweep = {}
        if not args.skip_sink_sweep:
            for n in (1, 2):
                sweep[n] = run_raysam(f"scale region ({args.tile_px} px tile), ray.sink_tasks={n}",
                                      [*scale_region, *common, f"ray.sink_tasks={n}"], out / f"scale_sink{n}")
    finally:
        server.terminate()
        server.wait(timeout=10)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    worst = memory_table(demo, scale)
    memory_by_task(demo, scale)
    walls = {"default": scale.sink_walls(), **{f"sink_tasks={n}": run.sink_walls() for n, run in sweep.items()}}
    print("\nSink wall (last chip checkpointed -> published) per group: "
          + "; ".join(f"{name} " + ", ".join(f"{s:.1f} s" for s in w) for name, w in walls.items()))
    first_share = scale.first_publish_s / scale.wall_s if scale.first_publish_s else float("inf")
    rows = [
        ("total wall, scale run (s)", f"{scale.wall_s:.1f}", "", None),
        ("driver CPU / machine busy CPU", f"{scale.driver_share:.1%}", f"<= {DRIVER_CPU_SHARE_MAX:.0%}",
         scale.driver_share <= DRIVER_CPU_SHARE_MAX),
        ("driver CPU / run's process tree CPU", f"{scale.driver_tree_share:.1%}", f"<= {DRIVER_CPU_SHARE_MAX:.0%}", None),
        (f"peak memory per role, scale / demo (area x{scale.area()[0] / demo.area()[0]:.0f})", f"max x{worst:.2f}",
         f"<= x{ROLE_MEMORY_RATIO_MAX}", worst <= ROLE_MEMORY_RATIO_MAX),
        ("first group published / total wall", f"{first_share:.0%}", f"<= {FIRST_PUBLISH_SHARE_MAX:.0%}",
         first_share <= FIRST_PUBLISH_SHARE_MAX),
    ]
    rows += [(f"sink wall, {name}, per group (s)", " / ".join(f"{s:.1f}" for s in w), "", None) for name, w in walls.items()]
    if sweep:
        rows.append(("sink wall speed-up, 1 -> 2 sink tasks",
                     f"x{sum(walls['sink_tasks=1']) / sum(walls['sink_tasks=2']):.2f}", "", None))
    summary(rows)
    if args.keep:
        print(f"outputs kept in {out}")


if __name__ == "__main__":
    main()
