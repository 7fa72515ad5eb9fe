"""Issues 5, 11 and 14: bad and hostile input, one table, through the command line's one boundary.

Each row provokes one bad input on the real code path: ``raysam.run.cli`` (what ``python -m
raysam.run`` runs) with the row's command line, in this process so that rows stay cheap. Every
row must end with the row's exit code (2: bad input), exactly one ``raysam: error:`` line on
stderr (the last one; any other line is one of raysam's own), no traceback, no entry at all
under the output root (it did not exist before; empty directories count), within a wall-time
bound. Rows whose failure happens inside the Ray pipeline (broken COGs, a model whose graphs do
not match its manifest) share one local Ray instance and run last.

The rows cover the categories of issue 14 (see :data:`CATEGORIES`): inputs that used to hang,
leave partial output, print tracebacks or Hydra's own multi-line errors, point the wrong way,
be silently accepted, or damage the outputs through the key's redaction. A few more go through
a real ``python -m raysam.run`` process: exit codes, the verbose traceback, a full disk, the GCS
client that never gives up, an internal error.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from raysam.console import route_ray_logs
from raysam.demo.serve import free_port, serve_catalog
from raysam.run import cli
from raysam.command_line import command_line_error
from tests.helpers import start_local_ray
from tests.reliability import bad_inputs_data as bad
from tests.reliability.conftest import BUCKET

REPO = Path(__file__).resolve().parents[2]
PC_KEY_ENV = "PC_SDK_SUBSCRIPTION_KEY"
HANG_BOUND_S = 30.0  # issue 14: each former hang ends within 30 s, with one line


@dataclass
class World:
    """Everything the rows point at: AOI files, broken models, STAC APIs over broken catalogs,
    endpoints that refuse or never answer, a real S3-compatible server."""

    base: Path
    catalog_root: Path
    model_ok: Path
    aoi: dict[str, Path] = field(default_factory=dict)
    models: dict[str, Path] = field(default_factory=dict)
    stac_urls: dict[str, str] = field(default_factory=dict)
    a_file: Path | None = None
    hole: bad.BlackHole | None = None
    refused_port: int = 0
    s3_uri: Callable[[str], str] | None = None

    def out(self, case_id: str) -> Path:
        """The output root of one row (it does not exist before the row)."""
        return self.base / "out" / case_id

    def no_bucket_uri(self) -> str:
        """An ``s3://`` root on the real S3 server whose bucket does not exist (no creation)."""
        return self.s3_uri("x").replace(f"s3://{BUCKET}/", "s3://raysam-no-such-bucket/").replace(
            "&allow_bucket_creation=true", "")


def _broken_catalogs(base: Path, info) -> dict[str, Path]:
    """Modified copies of the demo catalog: items missing fields, B04 COGs broken three ways."""
    items = bad.read_items(info)
    b04 = bad.cog_of(items, "B04")
    cogs = base / "cogs"
    truncated = {t: bad.truncated_copy(p, cogs / "truncated" / t / "B04.tif") for t, p in b04.items()}
    wrong_crs = {t: bad.rewritten_copy(p, cogs / "crs" / t / "B04.tif", crs="EPSG:3857") for t, p in b04.items()}
    float_dn = {t: bad.rewritten_copy(p, cogs / "dtype" / t / "B04.tif", dtype="float32") for t, p in b04.items()}
    variants = {
        "no_b04": bad.without_band(items, "B04"),
        "no_proj": bad.without_projection(items),
        "cog_truncated": bad.with_band_href(items, "B04", truncated),
        "cog_wrong_crs": bad.with_band_href(items, "B04", wrong_crs),
        "cog_float": bad.with_band_href(items, "B04", float_dn),
    }
    return {name: bad.write_items(base / "catalogs" / name, info, v) for name, v in variants.items()}


def _broken_models(base: Path, model_ok: Path) -> dict[str, Path]:
    """Copies of the demo model: truncated decoder, another model type, graphs swapped."""
    models = {name: bad.model_copy(model_ok, base / "models" / name)
              for name in ("truncated", "other_type", "swapped", "no_manifest")}
    bad.truncate_file(models["truncated"] / "decoder.onnx")
    bad.edit_manifest(models["other_type"], model_type="vit_b")
    bad.swap_graphs(models["swapped"])
    (models["no_manifest"] / "manifest.json").unlink()
    return models


@pytest.fixture(scope="module")
def world(tmp_path_factory, demo_catalog, s3_server):
    """Build every bad input once; serve the broken catalogs and the black hole for the module."""
    from raysam.demo.model import build_demo_model

    base = tmp_path_factory.mktemp("bad_inputs")
    model_ok = build_demo_model(base / "models" / "ok")
    w = World(base=base, catalog_root=demo_catalog.root, model_ok=model_ok, s3_uri=s3_server)
    w.aoi = bad.write_aoi_files(base / "aoi")
    w.models = _broken_models(base, model_ok)
    w.a_file = base / "a_file"
    w.a_file.write_text("a regular file, not a directory\n")
    w.refused_port = bad.closed_port()
    procs = []
    with bad.garbage_stac_api() as garbage_url, bad.black_hole() as hole:
        w.stac_urls["garbage"], w.hole = garbage_url, hole
        try:
            for name, ndjson in _broken_catalogs(base, demo_catalog).items():
                port = free_port()
                procs.append(serve_catalog(ndjson, port))
                w.stac_urls[name] = f"http://127.0.0.1:{port}"
            yield w
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def local_ray():
    """One small local Ray instance for the rows that fail inside the pipeline."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    start_local_ray(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=150 * 1024**2, configure_logging=False)
    route_ray_logs()  # as raysam.driver.init_ray does: Ray's records to the run's log, not the console
    yield
    ray.shutdown()


@pytest.fixture()
def quiet_logging():
    """Each in-process command line configures logging (Hydra's job logging): put it back."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in saved[0]:
            handler.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


# ---------------------------------------------------------------- the table

Args = Callable[[World], list[str]]


@dataclass(frozen=True)
class Case:
    """One bad input: its command line, what the one line must say, the exit code."""

    id: str
    args: Args
    expect: str
    code: int = 2
    needs_ray: bool = False
    bound_s: float = HANG_BOUND_S
    env: dict[str, str] = field(default_factory=dict)
    blocked_by: str | None = None  # a known gap outside this test's files (strict xfail)


def _ov(*items: str) -> Args:
    return lambda w: list(items)


def _stac(name: str, *more: str) -> Args:
    return lambda w: ["stac=local", f"stac.url={w.stac_urls[name]}", "stac.retries=0", *more]


def _aoi(name: str) -> Args:
    return lambda w: [f"region.geometry={w.aoi[name]}"]


SMALL = bad.SMALL_AOI
CASES = [
    # config values of the wrong type or range
    Case("points_per_side_zero", _ov("sam.points_per_side=0"), "points_per_side must be a positive integer"),
    Case("pred_iou_thresh_above_1", _ov("sam.pred_iou_thresh=1.5"), "pred_iou_thresh must be in [0, 1]"),
    Case("spatial_overlap_1", _ov("sam.spatial_overlap=1.0"), "sam.spatial_overlap=1.0 is out of range"),
    Case("band_names_two", _ov("sam.band_names=[R,G]"), "give exactly 3 bands"),
    Case("scaling_unknown", _ov("sam.scaling=gamma"), "sam.scaling='gamma': use reflectance or stretch"),
    Case("sam_actors_zero", _ov("ray.sam_actors=0"), "ray.sam_actors=0: use a positive integer"),
    Case("device_tpu", _ov("device=tpu"), "device='tpu': use auto, cuda or cpu"),
    Case("sink_unknown", _ov("output.sinks=[segmentation_mask,shapefile]"), "unknown sink(s) ['shapefile']"),
    Case("cloud_cover_200", _ov("region.max_cloud_cover=200"), "max_cloud_cover 200.0 is not a percentage"),
    Case("model_type_unknown", _ov("model.type=vit_x"), "model.type='vit_x' is unknown"),
    # regions: invalid, empty, huge, antimeridian, hostile names
    Case("bbox_three_numbers", _ov("region.geometry='1,2,3'"), "does not exist"),
    Case("bbox_reversed", _ov("region.geometry='-89.86,41.79,-90.14,41.89'"), "is empty or reversed"),
    Case("wkt_self_intersecting", _ov("region.geometry='POLYGON ((0 0, 1 1, 1 0, 0 1, 0 0))'"), "is invalid"),
    Case("wkt_empty", _ov("region.geometry='POLYGON EMPTY'"), "the AOI geometry is empty"),
    Case("bbox_continent", _ov("region.geometry='-125,25,-66,49'"), "degrees of longitude"),
    Case("bbox_huge_area", _ov("region.geometry='-100,20,-75,60'"), "km², more than"),
    Case("bbox_antimeridian", _ov("region.geometry='179.5,51,-179.5,52'"), "crosses the antimeridian"),
    Case("wkt_antimeridian", _ov("region.geometry='POLYGON ((179.5 51, -179.5 51, -179.5 52, 179.5 52, 179.5 51))'"),
         "crosses the antimeridian"),
    Case("name_escapes_root", _ov("region.name=../../etc"), "is not a safe name"),
    # time ranges
    Case("time_reversed", _ov("region.time_range=[2024-07-14,2024-06-28]"), "is before start"),
    Case("time_future", _ov("region.time_range=[2999-01-01,2999-02-01]"), "in the future"),
    Case("time_not_a_date", _ov("region.time_range=[yesterday,today]"), "cannot parse date 'yesterday'"),
    # AOI files
    Case("aoi_missing", lambda w: [f"region.geometry={w.base / 'nowhere.geojson'}"], "does not exist"),
    Case("aoi_empty_file", _aoi("empty"), "is not valid GeoJSON"),
    Case("aoi_not_geojson", _aoi("not_geojson"), "is not valid GeoJSON"),
    Case("aoi_no_features", _aoi("no_features"), "holds no geometry"),
    Case("aoi_point", _aoi("point"), "is a Point, not a polygon: an AOI needs an area"),
    Case("aoi_no_crs", _aoi("no_crs"), "declares no CRS"),
    # STAC responses
    Case("stac_malformed_json", _stac("garbage"), "sent a malformed response"),
    Case("stac_item_without_b04", _stac("no_b04"), "has no asset for band(s) B04"),
    Case("stac_item_without_proj", _stac("no_proj"), "has no proj:epsg or proj:code"),
    # model files
    Case("model_dir_missing", lambda w: [f"model.path={w.base / 'no_model'}", "model.type=vit_b"], "does not exist"),
    Case("model_no_manifest", lambda w: [f"model.path={w.models['no_manifest']}", "model.type=vit_b"],
         "manifest.json is missing"),
    Case("model_truncated", lambda w: [f"model.path={w.models['truncated']}"], "decoder.onnx is truncated or corrupt"),
    Case("model_other_type", lambda w: [f"model.path={w.models['other_type']}"],
         "holds a vit_b model but model.type is demo"),
    # output roots: files, unreachable or refusing object stores (a real S3 server, a closed port,
    # an endpoint that never answers)
    Case("output_under_a_file", lambda w: [f"output.root={w.a_file}/sub"], f"is under {{a_file}}, which is a file"),
    Case("output_is_a_file", lambda w: [f"output.root={w.a_file}"], "is a file, not a directory: choose a directory"),
    Case("output_s3_no_bucket", lambda w: [f"output.root='{w.no_bucket_uri()}'"], "is not writable"),
    Case("output_s3_refused", lambda w: [f"output.root='s3://b/out?endpoint_override=127.0.0.1:{w.refused_port}"
                                         "&scheme=http'", "output.timeout_s=15"], "cannot be reached ("),
    Case("output_s3_never_answers", lambda w: [f"output.root='s3://b/out?endpoint_override=127.0.0.1:{w.hole.port}"
                                               "&scheme=http'", "output.timeout_s=3"],
         "could not be reached within 3 s (output.timeout_s)"),
    # issue 14, hangs: what the run asks of Ray cannot be had; Ray's address does not answer
    Case("ray_two_actors_on_two_cpus", _ov("ray.sam_actors=2", "ray.cpus_per_actor=1", "ray.read_cpus=1"),
         "leave no room beside them for a chip read"),
    Case("ray_gpu_without_gpu", _ov("ray.gpus_per_actor=1"), "ray.gpus_per_actor=1, but the local Ray instance"),
    Case("ray_64_cpus_per_actor", _ov("ray.cpus_per_actor=64"), "a SAM actor needs 64 CPU(s)"),
    Case("ray_device_cuda_without_gpu", _ov("device=cuda"), "device=cuda, but the local Ray instance"),
    Case("ray_address_unknown_host", _ov("ray.address=bogus:1234", "ray.timeout_s=5"), "unknown host 'bogus'"),
    Case("ray_address_refused", lambda w: [f"ray.address=127.0.0.1:{w.refused_port}"], "Connection refused"),
    Case("ray_address_never_answers", lambda w: [f"ray.address=127.0.0.1:{w.hole.port}", "ray.timeout_s=3"],
         "accepts connections but does not answer as a Ray cluster within 3 s"),
    Case("ray_read_concurrency_zero", _ov("ray.read_concurrency=0"), "ray.read_concurrency=0: use a positive integer"),
    Case("ray_object_store_tiny", _ov("ray.object_store_gb=0.01"), "below Ray's minimum object store"),
    Case("ray_object_store_huge", _ov("ray.object_store_gb=1000000"), "is more than this machine's memory"),
    # issue 14, partial output: bands that no item has, found before any work
    Case("band_s2_unknown", _ov("output.sinks=[segmentation_mask,s2_raster]", "output.s2_bands=[B99]"),
         "output.s2_bands has 'B99', which is not a Sentinel-2 band"),
    Case("band_s2_not_in_items", _ov("output.sinks=[segmentation_mask,s2_raster]", "output.s2_bands=[B05]"),
         "output.s2_bands needs B05, but item"),
    Case("band_rgb_not_in_items", _ov("sam.band_names=[B05,B03,B02]"), "sam.band_names needs B05, but item"),
    # issue 14, tracebacks: parameters that crashed the generator, unusual AOI files, files for directories
    Case("amg_points_absurd", _ov("sam.points_per_side=1000000000"), "more prompt points per side than a chip"),
    Case("amg_crop_layer_without_points", _ov("sam.n_crop_layers=1", "sam.crop_n_points_downscale_factor=4"),
         "leaves crop layer 1 with no prompt points"),
    Case("amg_batch_beyond_memory", _ov("sam.points_per_batch=100000"), "one chip's mask generation needs about"),
    Case("aoi_crs_link", _aoi("crs_link"), "has a 'crs' member raysam cannot read"),
    Case("aoi_crs_number", _aoi("crs_number"), "has a 'crs' member raysam cannot read"),
    Case("aoi_crs_unknown", _aoi("crs_unknown"), "has an unrecognised CRS 'EPSG:999999'"),
    Case("aoi_unreadable_wkb", _aoi("bad_wkb"), "cannot read GeoParquet"),
    Case("aoi_is_a_directory", _aoi("a_dir"), "is a directory, not a file"),
    Case("model_path_is_a_file", lambda w: [f"model.path={w.a_file}"], "is a file, not a directory: point it at a"),
    Case("demo_root_is_a_file", lambda w: [f"stac.demo_root={w.a_file}"], "stac.demo_root="),
    Case("hydra_run_dir_under_a_file", lambda w: [f"hydra.run.dir={w.a_file}/run"], "cannot write Hydra's run files"),
    # issue 14, Hydra's own errors; issue 11, a bbox whose quotes the shell removed
    Case("cli_comma_list_without_m", _ov("sam.points_per_side=2,4"), "is a comma list, which Hydra reads as a sweep"),
    Case("cli_bbox_unquoted", _ov("region.geometry=-90.035,41.815,-89.965,41.865"),
         "reached raysam without its quotes (the shell removes them)"),
    Case("cli_polygon_split_by_the_shell", _ov("region.geometry=POLYGON", "((0", "0,", "1", "1))"),
         "the shell split or unquoted a value"),
    Case("cli_value_with_equals_unquoted", _ov("output.root=s3://b/x?region=us-east-1"), "cannot parse the override"),
    Case("cli_cfg_job_bad_type", _ov("sam.points_per_side=abc", "--cfg", "job"), "could not be converted to Integer"),
    Case("cli_override_after_flag", _ov("--cfg", "job", "sam.points_per_side=4"), "unrecognized arguments"),
    Case("cli_unknown_option", _ov("ray=nowhere"), "Could not find 'ray/nowhere'"),
    Case("cli_multirun_second_job_bad", _ov("sam.points_per_side=2,0", "-m"),
         "job #1 (sam.points_per_side=0): sam.points_per_side must be a positive integer"),
    # issue 14, misleading lines
    Case("aoi_utm_bbox", _ov(f"region.geometry='{','.join(map(str, bad.UTM_BOX))}'"), "look like projected coordinates"),
    Case("wkt_utm", _ov(f"region.geometry='{bad.UTM_WKT}'"), "look like projected coordinates"),
    Case("aoi_utm_without_crs", _aoi("utm_unsaid"), "look like projected coordinates"),
    Case("wkt_point", _ov("region.geometry='POINT (-90 41.85)'"), "is a Point, not a polygon: an AOI needs an area"),
    Case("aoi_line", _aoi("line"), "is a LineString, not a polygon: an AOI needs an area"),
    Case("stac_url_not_a_url", _ov("stac=local", "stac.url=not-a-url"), "stac.url='not-a-url' is not an http(s) URL"),
    Case("stac_url_ftp", _ov("stac=local", "stac.url=ftp://example.com/stac"), "is not an http(s) URL"),
    # issue 14, silently accepted
    Case("plus_typo_top_level", _ov("+dryrun=true"), "dryrun (did you mean dry_run?): no such setting"),
    Case("plus_typo_in_group", _ov("+sam.pointz_per_side=3"), "sam.pointz_per_side (did you mean sam.points_per_side?)"),
    Case("sinks_empty", _ov("output.sinks=[]"), "output.sinks is empty, so the run would write nothing"),
    Case("scaling_zero", _ov("sam.band_scaling=[0,0,0]"), "turns every pixel into one value"),
    Case("scaling_saturates", _ov("sam.scaling=reflectance", "sam.band_scaling=[1,1,1]"), "so the image is flat"),
    # issue 14, the key: refused when it cannot be one, so that it is never matched inside other text
    Case("key_one_character", _ov(), "has 1 character(s) or blanks, so it cannot be one", env={PC_KEY_ENV: "o"}),
    Case("key_short_on_the_command_line", _ov("stac.pc_key=abc123"), "32 hexadecimal characters"),
    # COGs and models that fail inside the pipeline (one shared local Ray instance)
    Case("cog_truncated", _stac("cog_truncated", "sam.scaling=reflectance"), "asset B04: cannot read", needs_ray=True),
    # the same file under the demo's stretch: the group's stretch task fails while the chip stream starts
    Case("cog_truncated_stretch", _stac("cog_truncated"), "asset B04: cannot read", needs_ray=True),
    Case("cog_wrong_crs", _stac("cog_wrong_crs", "sam.scaling=reflectance"), "but the item declares EPSG:",
         needs_ray=True),
    Case("cog_float_dtype", _stac("cog_float", "sam.scaling=reflectance"), "holds float32 pixels", needs_ray=True),
    Case("model_graphs_swapped", lambda w: [f"model.path={w.models['swapped']}"], "the contract needs", needs_ray=True),
]

# Issue 14's categories and the row-id prefixes that cover them (broad ones need several rows).
CATEGORIES = {
    "hangs": ("ray_", "output_s3_"),
    "partial output": ("band_",),
    "tracebacks": ("amg_", "aoi_crs_", "aoi_unreadable", "aoi_is_a", "model_path_is", "demo_root_is",
                   "output_is_a", "ray_read_", "ray_object_", "ray_device", "hydra_run_dir"),
    "hydra errors": ("cli_",),
    "misleading lines": ("aoi_utm", "wkt_utm", "wkt_point", "aoi_line", "stac_url"),
    "silently accepted": ("plus_", "sinks_empty", "scaling_zero", "scaling_saturates", "cli_multirun"),
    "secret redaction": ("key_",),
}


def _base(w: World, case_id: str) -> list[str]:
    """A tiny demo run: one chip per date, one date, the smallest points grid."""
    return [
        "region=demo", "model=demo", f"stac.demo_root={w.catalog_root.parent}", f"model.path={w.model_ok}",
        f"output.root={w.out(case_id)}", f"region.geometry='{SMALL}'",
        f"region.time_range=[{bad.ONE_DATE[0]},{bad.ONE_DATE[1]}]", "sam.points_per_side=2",
        "ray.address=local", "output.sinks=[segmentation_mask]",
        f"hydra.run.dir={w.base / 'hydra' / case_id}", f"hydra.sweep.dir={w.base / 'sweep' / case_id}",
    ]


def entries(root: Path) -> list[str]:
    """Everything under an output root, directories included, and the root itself if it exists."""
    if not root.exists():
        return []
    return ["."] + sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# Ray's C++ core worker logs one line straight to the driver's stderr when the SAM actors start
# ("core_worker.cc: Actor ... has constructor arguments in the object store", issue 11): not
# Python logging, so the console cannot route it. It is not about the input; it is skipped here.
RAY_CORE_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [IWE] \d+ \d+\] core_worker\.cc:\d+: Actor with class name")


def check_one_line(code: int, stderr: str, case: Case) -> str:
    """The row's promise about the console; returns its error line."""
    lines = [line for line in stderr.strip().splitlines() if line.strip() and not RAY_CORE_LINE.match(line)]
    errors = [line for line in lines if line.startswith("raysam: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert all(line.startswith("raysam: ") for line in lines), stderr[-3000:]  # only raysam's own lines
    assert code == case.code, (code, stderr[-2000:])
    return errors[0]


def test_the_table_covers_every_category():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)
    prefixes = {c.id.split("_")[0] for c in CASES}
    assert {"time", "aoi", "stac", "cog", "model", "output", "bbox", "wkt"} <= prefixes
    for category, starts in CATEGORIES.items():
        rows = [c.id for c in CASES if c.id.startswith(starts)]
        assert len(rows) >= (1 if category == "secret redaction" else 2), (category, rows)


def _param(case: Case):
    marks = [pytest.mark.xfail(reason=case.blocked_by, strict=True)] if case.blocked_by else []
    return pytest.param(case, id=case.id, marks=marks)


DRY_RUN_ROWS = ("ray_two_actors_on_two_cpus", "ray_address_refused", "output_is_a_file", "output_s3_refused",
                "band_s2_not_in_items", "amg_crop_layer_without_points", "scaling_zero", "sinks_empty")


@pytest.mark.parametrize("case_id", DRY_RUN_ROWS)
def test_a_dry_run_refuses_what_the_run_refuses(case_id, world, capfd, monkeypatch, quiet_logging):
    """The preflight is shared: a dry run that passes means the run will start. (Before the
    table: its last rows leave a local Ray instance connected for the module.)"""
    case = next(c for c in CASES if c.id == case_id)
    monkeypatch.setenv(PC_KEY_ENV, "")
    monkeypatch.delenv(PC_KEY_ENV)
    capfd.readouterr()
    code = cli(["raysam.run", *_base(world, f"dry-{case.id}"), *case.args(world), "dry_run=true"])
    line = check_one_line(code, capfd.readouterr()[1], case)
    assert case.expect.format(a_file=world.a_file) in line, line
    assert entries(world.out(f"dry-{case.id}")) == []


@pytest.mark.parametrize("case", [_param(c) for c in sorted(CASES, key=lambda c: c.needs_ray)])
def test_bad_input_fails_in_one_line_and_leaves_nothing(case, world, request, capfd, monkeypatch, quiet_logging):
    if case.needs_ray:
        request.getfixturevalue("local_ray")
    monkeypatch.setenv(PC_KEY_ENV, "")  # recorded, so that whatever the row sets is undone after it
    monkeypatch.delenv(PC_KEY_ENV)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    capfd.readouterr()
    t0 = time.monotonic()
    code = cli(["raysam.run", *_base(world, case.id), *case.args(world)])
    wall_s = time.monotonic() - t0
    _, stderr = capfd.readouterr()
    line = check_one_line(code, stderr, case)
    assert case.expect.format(a_file=world.a_file) in line, line
    assert len(line) < 700, line
    assert wall_s < case.bound_s, f"{case.id}: {wall_s:.1f} s"
    assert entries(world.out(case.id)) == []


@pytest.mark.parametrize(("override", "expect"), [
    ("sam.points_per_side=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
    ("sam.pred_iou_thresh=[1,2]", "sam.pred_iou_thresh"),
    ("sam.no_such_key=1", "sam.no_such_key: no such setting"),
    ("region=no_such_region", "Could not find 'region/no_such_region'"),
    ("ray.sam_actors=two", "could not be converted to Integer"),
])
def test_bad_overrides_are_named_in_one_line(override, expect):
    """Hydra's own composition errors (types, keys, groups) come out as one line, before any work."""
    problem = command_line_error(["raysam.run", "region=demo", "model=demo", override])
    assert problem is not None and expect in problem and "\n" not in problem, problem
    assert command_line_error(["raysam.run", "region=demo", "model=demo", "sam.points_per_side=8"]) is None


# ---------------------------------------------------------------- a real process


def raysam_cli(w: World, tmp_path: Path, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    """``python -m raysam.run`` with the tiny base overrides, from a scratch cwd."""
    base = [a for a in _base(w, "cli") if not a.startswith(("output.root=", "hydra."))]
    return subprocess.run(
        [sys.executable, "-m", "raysam.run", *base, f"hydra.run.dir={tmp_path / 'hydra'}", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=timeout_s,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


CLI_CASES = [
    ("time_future", lambda w: ["region.time_range=[2999-01-01,2999-02-01]"], "in the future"),
    ("aoi_not_geojson", lambda w: [f"region.geometry={w.aoi['not_geojson']}"], "is not valid GeoJSON"),
    ("model_truncated", lambda w: [f"model.path={w.models['truncated']}"], "decoder.onnx is truncated"),
    ("override_wrong_type", lambda w: ["sam.points_per_side=abc"], "could not be converted to Integer"),
    ("bbox_unquoted", lambda w: ["region.geometry=-90.035,41.815,-89.965,41.865"], "region.geometry=[-90.035,"),
    ("ray_two_actors", lambda w: ["ray.sam_actors=2", "ray.cpus_per_actor=1", "ray.read_cpus=1"],
     "so the run would wait for ever"),
    # pyarrow's GCS client retries a request to an endpoint that never answers for ever: the
    # bounded check gives up, and the process leaves without waiting for the client's threads
    ("gcs_never_answers", lambda w: [f"output.root='gs://b/out?endpoint_override=127.0.0.1:{w.hole.port}&scheme=http'",
                                     "output.timeout_s=3"], "could not be reached within 3 s"),
]


@pytest.mark.parametrize(("case_id", "overrides", "expect"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_prints_one_line_and_exits_2(case_id, overrides, expect, world, tmp_path):
    out = tmp_path / "out"
    t0 = time.monotonic()
    result = raysam_cli(world, tmp_path, f"output.root={out}", *overrides(world), timeout_s=HANG_BOUND_S + 30)
    wall_s = time.monotonic() - t0
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("raysam: error: ") and expect in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert entries(out) == [] and not list(tmp_path.glob("o*"))
    assert wall_s < HANG_BOUND_S, f"{case_id}: {wall_s:.1f} s"


def test_cli_verbose_shows_the_traceback_and_the_run_log_keeps_it(world, tmp_path):
    out = tmp_path / "out"
    result = raysam_cli(world, tmp_path, "region.time_range=[2999-01-01,2999-02-01]", "verbose=true",
                        f"output.root={out}")
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "in the future" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("raysam: error: ")
    log = (tmp_path / "hydra" / "run.log").read_text()
    assert "Traceback" in log and "in the future" in log
    assert entries(out) == []


def test_without_verbose_the_traceback_is_only_in_the_run_log(world, tmp_path):
    result = raysam_cli(world, tmp_path, "region.time_range=[2999-01-01,2999-02-01]", f"output.root={tmp_path / 'o'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    log = (tmp_path / "hydra" / "run.log").read_text()
    assert "Traceback" in log and "raysam.errors.ConfigError" in log


BOOM_HANDLER = "tests.reliability.bad_inputs_data.BoomHandler"


def test_an_internal_error_exits_1_with_one_line_naming_the_log(world, tmp_path):
    """An exception no raysam code expects (a logging handler that fails as Hydra sets up the job)."""
    out = tmp_path / "out"
    result = raysam_cli(world, tmp_path, f"+hydra.job_logging.handlers.boom.class={BOOM_HANDLER}", f"output.root={out}")
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    match = re.fullmatch(r"raysam: internal error \((\w+): .*\), a bug in raysam: the traceback is in (\S+) "
                         r"\(verbose=true prints it here\); please report it with that file", lines[0])
    assert match, lines[0]
    traceback_text = Path(match.group(2)).read_text()
    assert "Traceback" in traceback_text and "boom: a failure no raysam check expects" in traceback_text
    assert entries(out) == []


FULL_DISK_SCRIPT = """
import resource, signal, sys
from hydra import compose, initialize_config_dir
from raysam.hydra_config import to_run_config
from raysam.errors import RaysamError
from raysam.run import CONF_DIR, run
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
    cfg = to_run_config(compose("config", overrides=sys.argv[1:]))
resource.setrlimit(resource.RLIMIT_FSIZE, (1, 1))  # every file this process writes is full at 1 byte
try:
    run(cfg)
except RaysamError as err:
    print(err)
    sys.exit(2)
"""


def test_full_output_root_is_one_line(world, tmp_path):
    """A real EFBIG (RLIMIT_FSIZE of 1 byte) on the output root's first write: named as full."""
    out = tmp_path / "out"
    base = [a for a in _base(world, "full") if not a.startswith("hydra.")]
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK_SCRIPT, *base, f"output.root={out}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "is full or cannot be written (" in lines[0] and "File too large" in lines[0], lines
    assert entries(out) == []
