"""Flaky network: COGs over a faulty HTTP server, the STAC API behind a faulty proxy.

At a 20 % failure rate (5xx answers, connection resets, stalls past the timeout) reads and
searches succeed through GDAL's and raysam's retries and give exactly the fault-free result;
at 100 % they fail with one line naming the item and asset (or the STAC endpoint) after a
bounded number of tries, leaving no outputs; an expired signature (HTTP 403) is re-signed once,
never retried blindly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely

from raysam.demo.serve import free_port, rebase_catalog, serve_catalog
from raysam.errors import DataError
from raysam.grid import make_date_group, plan_chip_tasks
from raysam.read import read_chip
from raysam.remote_io import NetworkPolicy, clear_dataset_cache
from raysam.signing import make_href_signer
from raysam.stac import StacConfig, search_items
from tests.reliability.flaky import Faults, FlakyFileServer, FlakyProxy

REPO = Path(__file__).resolve().parents[2]
# Fast, deliberate policies for a local server: stalls (STALL_S) outlast every timeout.
TIMEOUT_S = 2.0
STALL_S = 3.0
NETWORK = NetworkPolicy(timeout_s=TIMEOUT_S, connect_timeout_s=TIMEOUT_S, gdal_retries=4,
                        gdal_retry_delay_s=0.05, tries=3, backoff_s=0.05)
# Most requests one byte range may cost: (raysam tries + a re-sign) x (GDAL's try + retries).
MAX_ATTEMPTS_PER_RANGE = (NETWORK.tries + 1) * (NETWORK.gdal_retries + 1)
STAC_RETRIES = 4
SMALL_AOI = "-90.035,41.815,-89.965,41.865"  # straddles lon -90; one chip per date
ONE_DATE = ("2024-06-28", "2024-07-05")
FLAKY = 0.2


def stac_cfg(url: str, **kw) -> StacConfig:
    return StacConfig(kind="local", url=url, timeout_s=TIMEOUT_S, retries=STAC_RETRIES, backoff_s=0.05, **kw)


@pytest.fixture(scope="module")
def network(demo_catalog, tmp_path_factory):
    """The demo catalog's COGs on a FlakyFileServer, its items (hrefs rebased onto that server)
    in ``rustac serve``, and a FlakyProxy in front: yields (files, proxy, info). No faults until
    a test sets them."""
    with FlakyFileServer(demo_catalog.root) as files:
        ndjson = rebase_catalog(demo_catalog, files.url, tmp_path_factory.mktemp("http_catalog"))
        port = free_port()
        rustac = serve_catalog(ndjson, port)
        try:
            with FlakyProxy(f"http://127.0.0.1:{port}") as proxy:
                yield files, proxy, demo_catalog
        finally:
            rustac.terminate()
            rustac.wait(timeout=10)


@pytest.fixture
def servers(network):
    """The module's servers, fault-free with zeroed counters before and after each test."""
    files, proxy, info = network
    for server in (files, proxy):
        server.faults = Faults()
        server.counts.reset()
    clear_dataset_cache()
    yield files, proxy, info
    clear_dataset_cache()
    for server in (files, proxy):
        server.faults = Faults()


def chip_tasks(items, info) -> list:
    """Every chip task of the demo region's first date, for the given (parsed) items."""
    aoi = shapely.box(*info.aoi_wgs84)
    first_day = min(i.datetime_utc.date() for i in items)
    group = make_date_group("demo", first_day, [i for i in items if i.datetime_utc.date() == first_day], aoi)
    return list(plan_chip_tasks(group, ("R", "G", "B", "SCL")))


def moved(task, old_url: str, new_url: str):
    """The task with its hrefs on another server (GDAL caches what it read per URL, for good)."""
    return replace(task, items=tuple(replace(i, bands=tuple(replace(b, href=b.href.replace(old_url, new_url))
                                                          for b in i.bands)) for i in task.items))


def read_all(tasks, **kw) -> list:
    clear_dataset_cache()
    return [read_chip(t, max_cloud_fraction=1.0, network=NETWORK, **kw) for t in tasks]


def assert_same_chips(got, want) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.chip_id == b.chip_id and type(a) is type(b)
        if b.rgb is not None:
            np.testing.assert_array_equal(a.rgb, b.rgb)
            np.testing.assert_array_equal(a.valid, b.valid)


# ---------------------------------------------------------------- the fault injector itself


def test_faults_are_seeded_shares_of_attempts():
    faults = Faults(rate=FLAKY, seed=7)
    draws = [faults.draw(f"GET /x bytes={i}-", 1) for i in range(20_000)]
    assert abs(sum(d is not None for d in draws) / len(draws) - FLAKY) < 0.01
    assert {d for d in draws if d} == {"status", "reset", "stall"}
    assert draws == [Faults(rate=FLAKY, seed=7).draw(f"GET /x bytes={i}-", 1) for i in range(20_000)]
    assert all(Faults(rate=1.0).draw("k", n) for n in range(1, 50))
    assert not any(Faults(rate=0.0).draw("k", n) for n in range(1, 50))


# ---------------------------------------------------------------- 20 %: retries, same result


def test_search_and_chip_reads_survive_20_percent_faults(servers, demo_catalog):
    files, proxy, info = servers
    clean_items = search_items(stac_cfg(proxy.url), shapely.box(*info.aoi_wgs84), *info.time_range)
    tasks = chip_tasks(clean_items, info)
    clean = read_all(tasks)
    assert sum(c.rgb is not None for c in clean) >= 2
    files.counts.reset()
    proxy.counts.reset()
    files.faults = Faults(rate=FLAKY, seed=1, stall_s=STALL_S)
    proxy.faults = Faults(rate=FLAKY, seed=3, stall_s=STALL_S)
    items = search_items(stac_cfg(proxy.url), shapely.box(*info.aoi_wgs84), *info.time_range)
    assert items == clean_items
    assert_same_chips(read_all(chip_tasks(items, info)), clean)
    report(f"20 % faults, {len(tasks)} chips + search", files, proxy)
    assert set(files.counts.faults) == {"status", "reset", "stall"}, files.counts.faults
    assert sum(proxy.counts.faults.values()) >= 1, proxy.counts.attempts
    # ... and the HTTP pixels are the local files' pixels.
    local = [replace(t, items=tuple(replace(i, bands=tuple(replace(b, href=str(info.root / b.href.split("/", 3)[3]))
                                                            for b in i.bands)) for i in t.items)) for t in tasks]
    assert_same_chips(read_all(local), clean)


# ---------------------------------------------------------------- 100 %: bounded, one line


def test_every_cog_request_failing_names_item_and_asset_after_bounded_tries(servers):
    files, proxy, info = servers
    items = search_items(stac_cfg(proxy.url), shapely.box(*info.aoi_wgs84), *info.time_range)
    with FlakyFileServer(info.root, Faults(rate=1.0, kinds=("status", "reset"))) as down:
        task = moved(chip_tasks(items, info)[0], files.url, down.url)
        with pytest.raises(DataError) as err:
            read_chip(task, network=NETWORK)
    report("100 % COG faults, read path", down)
    message = str(err.value)
    first = task.items[0]
    assert message.startswith(f"item {first.item_id} asset B04: cannot read {down.url}/cogs/"), message
    assert message.endswith(f"(after {NETWORK.tries} tries)") and "\n" not in message
    assert 1 <= max(down.counts.attempts.values()) <= MAX_ATTEMPTS_PER_RANGE, down.counts.attempts
    assert set(down.counts.paths) == {f"/{first.bands[0].href.split('/', 3)[3]}"}


def test_every_stac_request_failing_names_the_endpoint_after_bounded_tries(servers):
    _, proxy, info = servers
    proxy.faults = Faults(rate=1.0, kinds=("status", "reset"))
    with pytest.raises(DataError) as err:
        search_items(stac_cfg(proxy.url), shapely.box(*info.aoi_wgs84), *info.time_range)
    assert str(err.value).startswith(f"STAC API at {proxy.url} is unreachable: {STAC_RETRIES + 1} tries of / failed")
    assert sum(proxy.counts.attempts.values()) == STAC_RETRIES + 1


# ---------------------------------------------------------------- 403: re-sign, never blind retries


class TokenService:
    """What a SAS token service does: hands out the server's current token; counts calls."""

    def __init__(self, files: FlakyFileServer, stale: bool = False):
        self.files, self.stale, self.calls = files, stale, []

    def __call__(self, account: str, container: str, fresh: bool) -> tuple[str, datetime]:
        self.calls.append(fresh)
        token = "gen0-stale" if self.stale else self.files.token
        return f"token={token}", datetime.now(timezone.utc) + timedelta(hours=1)


def local_signer(files: FlakyFileServer, service: TokenService):
    """raysam's Planetary Computer signer, signing this server's URLs instead of Azure's."""
    cfg = StacConfig(kind="planetary_computer", sign=True)
    return make_href_signer(cfg, fetch=service,
                            container_of=lambda href: ("local", "cogs") if href.startswith(files.url) else None)


def test_expired_signature_is_resigned_once_not_retried(demo_catalog, servers):
    _, proxy, info = servers
    items = search_items(stac_cfg(proxy.url), shapely.box(*info.aoi_wgs84), *info.time_range)
    tasks = chip_tasks(items, info)
    want = read_all([tasks[0], tasks[-1]])
    with FlakyFileServer(info.root, require_token=True) as files:
        signed = [moved(t, servers[0].url, files.url) for t in (tasks[0], tasks[-1])]
        service = TokenService(files)
        signer = local_signer(files, service)
        clear_dataset_cache()
        first = read_chip(signed[0], signer=signer, max_cloud_fraction=1.0, network=NETWORK)
        assert service.calls == [False] and not files.counts.forbidden
        files.expire_token()  # the cached datasets' token is stale now
        last = read_chip(signed[1], signer=signer, max_cloud_fraction=1.0, network=NETWORK)
        assert_same_chips([first, last], want)
        assert service.calls == [False, True]  # one fresh token, fetched once and reused
        refused, opens = files.counts.forbidden, files.counts.forbidden_opens
        # Each file fails once, then reads with the fresh token: a dataset opened before the
        # token expired fails on its block requests (GDAL may fetch a window's blocks in several
        # requests, refused together) and is never reopened with the stale token; one opened
        # after fails on its first request. A retry on the stale token would show as a refused
        # reopening after refused blocks, or as a second refused opening.
        assert refused, "the stale token was never refused"
        for path, n in refused.items():
            assert opens[path] == 0 or (opens[path] == 1 and n == 1), (path, n, opens[path])


def test_a_signature_refused_after_resigning_fails_without_retries(servers):
    _, proxy, info = servers
    items = search_items(stac_cfg(proxy.url), shapely.box(*info.aoi_wgs84), *info.time_range)
    task = chip_tasks(items, info)[0]
    with FlakyFileServer(info.root, require_token=True) as files:
        task = moved(task, servers[0].url, files.url)
        service = TokenService(files, stale=True)
        with pytest.raises(DataError) as err:
            read_chip(task, signer=local_signer(files, service), network=NETWORK)
        message = str(err.value)
        assert "403" in message and message.endswith("(after 2 tries)"), message
        assert "token" not in message and "gen0" not in message and "?" not in message
        assert service.calls == [False, True]
        assert sum(files.counts.forbidden.values()) == 2  # the stale one, the re-signed one: no more


# ---------------------------------------------------------------- the whole run, as users start it


def raysam_run(tmp_path: Path, demo_catalog, proxy_url: str, out: Path) -> subprocess.CompletedProcess:
    """``python -m raysam.run region=demo model=demo`` (small AOI, one date) against the proxy."""
    args = [
        "region=demo", "model=demo", "stac=local", f"stac.url={proxy_url}", f"stac.timeout_s={TIMEOUT_S}",
        f"stac.retries={STAC_RETRIES}", "stac.backoff_s=0.05", f"region.geometry='{SMALL_AOI}'",
        f"region.time_range=[{ONE_DATE[0]},{ONE_DATE[1]}]", "sam.points_per_side=8",
        "output.sinks=[segmentation_mask]", f"output.root={out}", "ray.address=local",
        f"model.path={demo_catalog.root.parent / 'models' / 'demo'}", f"hydra.run.dir={out.parent / (out.name + '_hydra')}",
    ]
    # GDAL's first line of retries, through the environment (NetworkPolicy defaults yield to it).
    env = {**os.environ, "PYTHONPATH": str(REPO), "GDAL_HTTP_TIMEOUT": f"{TIMEOUT_S:g}",
           "GDAL_HTTP_CONNECTTIMEOUT": f"{TIMEOUT_S:g}", "GDAL_HTTP_RETRY_DELAY": "0.05"}
    return subprocess.run([sys.executable, "-m", "raysam.run", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=env)


def report(what: str, *servers) -> None:
    """One line of figures for the test log (pytest -s): requests seen and faults injected."""
    print(f"\n{what}: " + "; ".join(f"{type(s).__name__} {sum(s.counts.attempts.values())} requests, "
                                     f"faults {dict(s.counts.faults)}, most per range "
                                     f"{max(s.counts.attempts.values(), default=0)}" for s in servers))


def output_files(out: Path) -> dict[str, Path]:
    return {str(p.relative_to(out)): p for p in sorted(out.rglob("*")) if p.is_file()}


def assert_same_masks(got: Path, want: Path) -> None:
    a, b = pq.read_table(got), pq.read_table(want)
    assert a.num_rows == b.num_rows > 0
    print(f"{a.num_rows} masks identical")
    for column in ("id", "geometry", "predicted_iou", "stability_score", "chip_id", "metrics:area"):
        assert a.column(column).equals(b.column(column)), column


@pytest.mark.slow
def test_demo_run_at_20_percent_faults_matches_the_fault_free_run(tmp_path, demo_catalog, servers):
    files, proxy, _ = servers
    clean = raysam_run(tmp_path, demo_catalog, proxy.url, tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-3000:]
    files.faults = Faults(rate=FLAKY, seed=5, stall_s=STALL_S)
    proxy.faults = Faults(rate=FLAKY, seed=3, stall_s=STALL_S)
    flaky = raysam_run(tmp_path, demo_catalog, proxy.url, tmp_path / "flaky")
    assert flaky.returncode == 0, flaky.stderr[-3000:]
    report("20 % faults, demo run", files, proxy)
    assert sum(files.counts.faults.values()) >= 3 and sum(proxy.counts.faults.values()) >= 1
    want, got = output_files(tmp_path / "clean"), output_files(tmp_path / "flaky")
    assert set(got) == set(want)
    masks = [k for k in want if k.endswith("masks.parquet")]
    assert masks
    for key in masks:
        assert_same_masks(got[key], want[key])
        labels = key.replace("masks.parquet", "labels.tif")
        with rasterio.open(got[labels]) as a, rasterio.open(want[labels]) as b:
            np.testing.assert_array_equal(a.read(), b.read())


@pytest.mark.slow
def test_demo_run_with_every_cog_request_failing_stops_with_one_line_and_no_outputs(tmp_path, demo_catalog, servers):
    files, proxy, _ = servers
    files.faults = Faults(rate=1.0, kinds=("status",))
    out = tmp_path / "out"
    result = raysam_run(tmp_path, demo_catalog, proxy.url, out)
    report("100 % COG faults, demo run", files)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("raysam: error: item S2") and f"cannot read {files.url}/cogs/" in error, error
    assert "Traceback" not in result.stderr
    assert max(files.counts.attempts.values()) <= (3 + 1) * (4 + 1)  # NetworkPolicy() defaults
    assert output_files(out) == {}


def test_demo_run_with_every_stac_request_failing_stops_with_one_line(tmp_path, demo_catalog, servers):
    _, proxy, _ = servers
    proxy.faults = Faults(rate=1.0, kinds=("status", "reset"))
    out = tmp_path / "out"
    result = raysam_run(tmp_path, demo_catalog, proxy.url, out)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"raysam: error: STAC API at {proxy.url} is unreachable: {STAC_RETRIES + 1} tries of / failed (last: "), lines
    assert sum(proxy.counts.attempts.values()) == STAC_RETRIES + 1
    assert output_files(out) == {}
