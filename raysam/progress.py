"""What a run shows while it goes: one live view in a terminal, a line every so often in a log.

In a terminal, one tqdm bar for the run: chips checkpointed over the chips planned so far, with
the date group being segmented, chips/s, km²/h and tqdm's ETA. Outside a terminal (a CI log, a
Ray job's log), one line every :data:`LOG_EVERY_S`, never a line per chip. Each published date
group gets one summary line either way. Lines are log records (``raysam.progress``), so they
also reach the run's log file; while the bar is drawn, log lines go around it
(``tqdm.contrib.logging``). Numbers come from the driver's polls of
:class:`~raysam.runstats.RunStats`, so showing them costs the workers nothing.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

log = logging.getLogger(__name__)

LOG_EVERY_S = 30.0


@dataclass
class GroupProgress:
    """One date group's chips: planned so far, checkpointed so far, and its area."""

    group_id: str
    area_km2: float
    planned: int = 0
    done: int = 0
    all_planned: bool = False


class RunProgress:
    """The run's progress view.

    Args:
        groups: (group id, AOI km²) of the groups this run does, in order.
        stream: where the live bar goes (stdout by default; log lines go where logging sends them).
        tty: draw a live bar; default: whether ``stream`` is a terminal.
    """

    def __init__(self, groups: list[tuple[str, float]], stream: TextIO | None = None, tty: bool | None = None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.groups = {gid: GroupProgress(gid, km2) for gid, km2 in groups}
        self.t0 = time.monotonic()
        self.last_line = self.t0
        self.bar: Any = None
        self._redirect: Any = None
        if self.tty:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
            self.bar = tqdm(total=0, unit="chip", file=self.stream, dynamic_ncols=True, desc="raysam",
                            bar_format="{desc}: {n}/{total} chips {bar} {percentage:3.0f}% [{elapsed}<{remaining}"
                                       "{postfix}]")  # tqdm puts ", " before the postfix

    def update(self, progress: Mapping[str, tuple[int, int, int]], n_rows: Mapping[str, int]) -> None:
        """Take a :meth:`raysam.runstats.RunStats.progress` reading (and each group's chip rows)."""
        for gid, (rows, planned, done) in progress.items():
            g = self.groups.get(gid)
            if g is not None:
                g.planned, g.done, g.all_planned = planned, done, rows == n_rows.get(gid, -1)
        done, planned = self.done, self.planned
        if self.bar is not None:
            self.bar.total = planned
            self.bar.n = done
            self.bar.set_postfix_str(self._rates(), refresh=False)
            self.bar.refresh()
        elif time.monotonic() - self.last_line >= LOG_EVERY_S and planned:
            self.last_line = time.monotonic()
            log.info("%d/%d chips checkpointed (%.0f %%), %s", done, planned, 100 * done / planned, self._rates())

    @property
    def done(self) -> int:
        return sum(g.done for g in self.groups.values())

    @property
    def planned(self) -> int:
        return sum(g.planned for g in self.groups.values())

    def _rates(self) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-6)
        km2 = sum(g.area_km2 * g.done / g.planned for g in self.groups.values() if g.planned)
        current = next((g.group_id for g in self.groups.values() if not (g.all_planned and g.done >= g.planned)), None)
        rate = self.done / elapsed
        left = max(self.planned - self.done, 0)
        eta = f", ETA {_duration(left / rate)}" if rate > 0 and left and not self.tty else ""
        return (f"{current or 'merging and writing'}, {rate:.2f} chips/s, {km2 / elapsed * 3600:,.0f} km²/h{eta}")

    def published(self, manifest: dict[str, Any]) -> None:
        """One summary line for a published date group."""
        counts = manifest["counts"]
        gid = manifest["date_group"]["id"]
        resumed = f", {counts['chips_resumed']} from checkpoints" if counts["chips_resumed"] else ""
        log.info("published %s: %d masks from %d chips (%d skipped%s), %s km² at %s", gid,
                 counts["masks_after_merge"], counts["chips_planned"], counts["chips_skipped"], resumed,
                 f"{manifest['date_group']['area_km2']:,.0f}", _duration(time.monotonic() - self.t0))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self._redirect.__exit__(None, None, None)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
