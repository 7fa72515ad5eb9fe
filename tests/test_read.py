"""Chip reads on small COGs written here with known values: scaling, resampling, mosaic, AOI,
clouds, errors, HTTP 403 re-signing, and stretch statistics."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pyproj
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.enums import Resampling
from rasterio.features import geometry_mask

from raysam.errors import ConfigError, DataError
from raysam.grid import BandRead, ChipTask, DateGroup, ItemRead, TargetGrid
from raysam.items import BandAsset, ParsedItem
from raysam.read import ChipPixels, SkippedChip, _aligned_index, read_band_dn, read_chip
from raysam.remote_io import (DEFAULT_DATASET_CACHE_SIZE, GDAL_CACHEMAX_BYTES, gdal_env_options,
                              set_dataset_cache_size)
from raysam.scaling import ScalingSpec, compute_stretch, dn_to_uint8

EPSG = 32615
X0, Y1 = 500_000.0, 4_600_000.0  # target grid origin (multiples of 10 m)
CHIP = 256  # chip side used here (read_chip is size agnostic; the pipeline uses 1024)
GRID_TRANSFORM = (10.0, 0.0, X0, 0.0, -10.0, Y1)
OFFSET, SCALE = -1000.0, 1e-4  # Sentinel-2 baseline >= 04.00
RGB = ("B04", "B03", "B02")


def write_cog(path: Path, data: np.ndarray, epsg: int = EPSG, x0: float = X0, y1: float = Y1,
              res: float = 10.0, nodata: float | None = 0) -> Path:
    """A tiled GeoTIFF with overviews (what a COG is, minus the layout check)."""
    profile = dict(driver="GTiff", width=data.shape[1], height=data.shape[0], count=1,
                   dtype=data.dtype.name, crs=f"EPSG:{epsg}",
                   transform=Affine(res, 0, x0, 0, -res, y1), nodata=nodata, tiled=True,
                   blockxsize=128, blockysize=128)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
        dst.build_overviews([2, 4], rasterio.enums.Resampling.nearest)
    return path


def band(name: str, href: str | Path, offset=OFFSET, scale=SCALE) -> BandRead:
    is_scl = name == "SCL"
    return BandRead(name, name.lower(), str(href), 0.0 if is_scl else offset,
                    1.0 if is_scl else scale, 0)


def item_of(tmp: Path, item_id: str, dn_rgb: tuple[np.ndarray, ...], scl: np.ndarray | None = None,
            **geo) -> ItemRead:
    """Write an item's R, G, B (and SCL at 20 m) COGs and return its ItemRead."""
    folder = tmp / item_id
    folder.mkdir()
    bands = [band(b, write_cog(folder / f"{b}.tif", dn, **geo)) for b, dn in zip(RGB, dn_rgb)]
    if scl is not None:
        bands.append(band("SCL", write_cog(folder / "SCL.tif", scl, res=20.0, **geo)))
    return ItemRead(item_id, tuple(bands))


def task_of(*items: ItemRead, clip=None, size: int = CHIP, window=(0, 0)) -> ChipTask:
    return ChipTask("g_20240701", (0, 0), (*window, size, size), EPSG, GRID_TRANSFORM,
                    tuple(items), None if clip is None else shapely.to_wkb(clip))


def const(value: int, shape=(CHIP, CHIP)) -> np.ndarray:
    return np.full(shape, value, dtype=np.uint16)


# --- scaling ----------------------------------------------------------------------------------------
def test_known_dn_give_known_uint8_with_offset_applied_once(tmp_path):
    # (DN - 1000) * 1e-4 * 255, rounded: 3000 -> 0.2 -> 51; 2020 -> 0.102 -> 26; 1400 -> 10.
    # Offset applied twice would give 26 / 0 / 0; not at all 76 / 52 / 36.
    it = item_of(tmp_path, "a", (const(3000), const(2020), const(1400)))
    out = read_chip(task_of(it))
    assert isinstance(out, ChipPixels)
    assert out.rgb.shape == (CHIP, CHIP, 3) and out.rgb.dtype == np.uint8
    assert (out.rgb == np.array([51, 26, 10], np.uint8)).all()
    assert out.valid.all() and not out.cloud.any()


def test_reflectance_clips_to_0_and_255(tmp_path):
    # 12000 -> 1.1 -> 255; 500 -> -0.05 -> 0 (still a valid pixel: DN 500 is data, not nodata).
    it = item_of(tmp_path, "a", (const(12000), const(500), const(1000)))
    out = read_chip(task_of(it))
    assert (out.rgb == np.array([255, 0, 0], np.uint8)).all() and out.valid.all()


def test_seed_band_scaling_and_offset_override_the_item(tmp_path):
    it = item_of(tmp_path, "a", (const(100), const(200), const(300)))
    spec = ScalingSpec(band_scaling=(1 / 255, 1 / 255, 1 / 510), band_offset=(0, 10, 0))
    out = read_chip(task_of(it), scaling=spec)
    assert (out.rgb == np.array([100, 210, 150], np.uint8)).all()


def test_stretch_maps_low_high_to_0_255(tmp_path):
    it = item_of(tmp_path, "a", (const(1600), const(2500), const(1000)))
    spec = ScalingSpec(mode="stretch", low=(0.0, 0.05, 0.0), high=(0.1, 0.25, 0.1))
    out = read_chip(task_of(it), scaling=spec)
    # R 0.06/0.1 -> 153; G (0.15-0.05)/0.2 -> 127.5 -> 128 (half up in float32); B 0 -> 0.
    assert (out.rgb[..., 0] == 153).all() and (out.rgb[..., 2] == 0).all()
    assert set(np.unique(out.rgb[..., 1])) <= {127, 128}


@pytest.mark.parametrize("spec", [ScalingSpec(), ScalingSpec(mode="stretch", low=(0.0, 0.05, 0.01), high=(0.1, 0.25, 0.3))],
                         ids=["reflectance", "stretch"])
def test_dn_tables_agree_with_the_per_pixel_arithmetic_on_every_dn(spec):
    """Unsigned DNs go through a 65,536-entry table per band, signed ones through float32 per pixel:
    both give the same uint8 for every DN they share (0..32767), and the table covers 65535."""
    dn = np.arange(2**15, dtype=np.uint16)
    for i in range(3):
        table = dn_to_uint8(dn, OFFSET, SCALE, spec, i)
        assert np.array_equal(table, dn_to_uint8(dn.astype(np.int16), OFFSET, SCALE, spec, i))
        assert not dn_to_uint8(dn[:256].astype(np.uint8), OFFSET, SCALE, spec, i).any()  # DN < 1000: reflectance < 0
    assert dn_to_uint8(np.array([65535], np.uint16), OFFSET, SCALE, ScalingSpec(), 0)[0] == 255
    assert dn_to_uint8(np.array([3550], np.uint16), OFFSET, SCALE, ScalingSpec(), 0)[0] == 65  # 0.255 * 255


# --- resampling ---------------------------------------------------------------------------------------
def test_20m_scl_is_nearest_and_gives_the_cloud_mask(tmp_path):
    rng = np.random.default_rng(0)
    scl20 = rng.choice(np.array([4, 9], np.uint8), size=(CHIP // 2, CHIP // 2), p=[0.7, 0.3])
    it = item_of(tmp_path, "a", (const(2000), const(2000), const(2000)), scl=scl20)
    out = read_chip(task_of(it), max_cloud_fraction=1.0)
    expected_cloud = np.kron(scl20 == 9, np.ones((2, 2), bool))
    np.testing.assert_array_equal(out.cloud, expected_cloud)
    assert out.stats["cloud_fraction"] == pytest.approx(expected_cloud.mean())


def test_20m_reflectance_band_is_upsampled_smoothly(tmp_path):
    # A 20 m ramp read onto 10 m pixels: bilinear interpolates between 20 m centres.
    ramp20 = np.tile(np.arange(1000, 1000 + 20 * (CHIP // 2), 20, dtype=np.uint16), (CHIP // 2, 1))
    folder = tmp_path / "r"
    folder.mkdir()
    r = band("B04", write_cog(folder / "B04.tif", ramp20, res=20.0))
    g = band("B03", write_cog(folder / "B03.tif", const(2000)))
    b = band("B02", write_cog(folder / "B02.tif", const(2000)))
    # Scale so that uint8 = 4 * (20 m column index j) for j < 64.
    out = read_chip(task_of(ItemRead("r", (r, g, b))), scaling=ScalingSpec(
        band_scaling=(4 / (20 * 255), 1e-4, 1e-4), band_offset=(-1000, -1000, -1000)))
    # 10 m column i has its centre at 20 m column coordinate (i + 0.5) / 2 - 0.5 = i/2 - 0.25,
    # so bilinear gives 4 * (i/2 - 0.25) = 2i - 1; nearest would give multiples of 4 only.
    i = np.arange(2, 120)
    row = out.rgb[CHIP // 2, i, 0].astype(int)
    np.testing.assert_allclose(row, 2 * i - 1, atol=1)
    assert (row % 4 != 0).mean() > 0.5


def test_reprojected_source_lands_where_the_geometry_says(tmp_path):
    # A square in a zone-16 source; the chip grid is zone 15. The read field must match the
    # square projected into zone 15, within one pixel at its edge.
    to16 = pyproj.Transformer.from_crs(EPSG, 32616, always_xy=True)
    cx, cy = X0 + 1280, Y1 - 1280  # chip centre in zone 15
    sx, sy = to16.transform(cx, cy)
    x0_16, y1_16 = np.floor(sx / 10) * 10 - 2560, np.ceil(sy / 10) * 10 + 2560
    dn = const(1500, (512, 512))
    dn[156:356, 156:356] = 3500  # a 2 km square
    geo = dict(epsg=32616, x0=x0_16, y1=y1_16)
    it = item_of(tmp_path, "z16", (dn, dn, dn), **geo)
    square16 = shapely.box(x0_16 + 1560, y1_16 - 3560, x0_16 + 3560, y1_16 - 1560)
    to15 = pyproj.Transformer.from_crs(32616, EPSG, always_xy=True)
    square15 = shapely.transform(shapely.segmentize(square16, 50),
                                 lambda xy: np.column_stack(to15.transform(xy[:, 0], xy[:, 1])))
    out = read_chip(task_of(it))
    field = out.rgb[..., 0] > (13 + 64) // 2  # inside 3500 -> 0.25 -> 64; outside 1500 -> 13
    truth = geometry_mask([square15], (CHIP, CHIP), Affine(*GRID_TRANSFORM), invert=True)
    inner = geometry_mask([square15.buffer(-10)], (CHIP, CHIP), Affine(*GRID_TRANSFORM), invert=True)
    outer = geometry_mask([square15.buffer(10)], (CHIP, CHIP), Affine(*GRID_TRANSFORM), invert=True)
    assert (field >= inner).all() and (field <= outer).all()
    assert abs(int(field.sum()) - int(truth.sum())) < 0.02 * truth.sum()


# --- mosaic, AOI, clouds ------------------------------------------------------------------------------
def test_first_valid_item_wins(tmp_path):
    left = const(3000)
    left[:, CHIP // 2:] = 0  # nodata on the right half
    a = item_of(tmp_path, "a", (left, left, left))
    b = item_of(tmp_path, "b", (const(2200),) * 3)
    out = read_chip(task_of(a, b))
    assert (out.rgb[:, : CHIP // 2 - 1, 0] == 51).all()  # from a
    assert (out.rgb[:, CHIP // 2 + 1:, 0] == 31).all()  # b fills a's nodata (0.12 -> 30.6 -> 31)
    assert out.valid.all() and out.stats["items_read"] == 2
    reversed_order = read_chip(task_of(b, a))
    assert (reversed_order.rgb[..., 0] == 31).all() and reversed_order.stats["items_read"] == 1


def test_pixels_outside_the_aoi_are_nodata(tmp_path):
    it = item_of(tmp_path, "a", (const(3000),) * 3)
    clip = shapely.box(X0, Y1 - 1280, X0 + 1280, Y1)  # top-left quarter of the chip
    out = read_chip(task_of(it, clip=clip))
    assert out.valid[:128, :128].all() and out.valid.sum() == 128 * 128
    assert (out.rgb[~out.valid] == 0).all() and (out.rgb[out.valid] == 51).all()


def test_cloudy_chip_is_skipped(tmp_path):
    scl20 = np.full((CHIP // 2, CHIP // 2), 9, np.uint8)
    scl20[:, :16] = 4  # 16 of 128 columns clear: 12.5 %
    it = item_of(tmp_path, "a", (const(2000),) * 3, scl=scl20)
    skipped = read_chip(task_of(it), max_cloud_fraction=0.8)
    assert isinstance(skipped, SkippedChip) and skipped.reason == "cloudy: 0.88 > 0.80"
    kept = read_chip(task_of(it), max_cloud_fraction=0.9)
    assert isinstance(kept, ChipPixels) and kept.stats["cloud_fraction"] == 0.875


def test_all_nodata_chip_is_skipped(tmp_path):
    it = item_of(tmp_path, "a", (const(0),) * 3)
    out = read_chip(task_of(it))
    assert isinstance(out, SkippedChip) and out.reason == "no valid pixels"


def test_padded_chip_beyond_the_source_is_nodata(tmp_path):
    it = item_of(tmp_path, "a", (const(3000, (100, 60)),) * 3)
    out = read_chip(task_of(it))
    assert out.valid[:100, :60].all() and out.valid.sum() == 100 * 60


# --- errors and signing -------------------------------------------------------------------------------
def test_missing_asset_names_item_and_asset(tmp_path):
    it = ItemRead("S2A_MSIL2A_TEST", (band("B04", tmp_path / "nope.tif"),
                                       band("B03", tmp_path / "nope.tif"),
                                       band("B02", tmp_path / "nope.tif")))
    with pytest.raises(DataError, match=r"item S2A_MSIL2A_TEST asset b04: cannot read .*nope\.tif"
                                        r": .* \(after 1 tries\)"):
        read_chip(task_of(it))


def test_corrupt_asset_is_a_data_error(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00" + b"\x07" * 300)
    it = ItemRead("S2A_X", (band("B04", bad), band("B03", bad), band("B02", bad)))
    with pytest.raises(DataError, match="item S2A_X asset b04: cannot read"):
        read_chip(task_of(it))


# The server runs in its own process: rasterio holds the GIL through part of a dataset's first
# windowed read, so a server thread in this process could never answer it (a deadlock no real
# object store has).
_RANGE_SERVER = r"""
import functools, http.server, sys
from pathlib import Path

class RangeHandler(http.server.SimpleHTTPRequestHandler):
    # Static files with byte ranges; 403 unless the query carries token=<root/.token or good>.

    def log_message(self, *args):  # quiet
        pass

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head):
        path, _, query = self.path.partition("?")
        token_file = Path(self.directory) / ".token"
        token = token_file.read_text() if token_file.exists() else "good"
        if f"token={token}" not in query:
            self.send_error(403, "Forbidden")
            return
        file = Path(self.directory) / path.lstrip("/")
        if not file.is_file():
            self.send_error(404, "Not Found")
            return
        data = file.read_bytes()
        start, end = 0, len(data) - 1
        rng = self.headers.get("Range")
        if rng:
            lo, hi = rng.removeprefix("bytes=").split(",")[0].split("-")
            start, end = int(lo), min(int(hi) if hi else end, end)
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if not head:
            self.wfile.write(data[start:end + 1])

server = http.server.ThreadingHTTPServer(
    ("127.0.0.1", 0), functools.partial(RangeHandler, directory=sys.argv[1]))
print(server.server_address[1], flush=True)
server.serve_forever()
"""


@pytest.fixture
def http_root(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _RANGE_SERVER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        yield tmp_path, f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=10)


class ExpiringSigner:
    """Signs with an expired token; ``resign`` gives a fresh one (as Planetary Computer)."""

    def __init__(self):
        self.resigned: list[str] = []

    def __call__(self, href: str) -> str:
        return f"{href}?token=expired"

    def resign(self, href: str) -> str:
        self.resigned.append(href)
        return f"{href}?token=good"


def test_http_403_is_resigned_once_then_read(http_root):
    root, url = http_root
    it = item_of(root, "a", (const(3000),) * 3)
    remote = ItemRead("a", tuple(BandRead(b.band, b.key, f"{url}/a/{Path(b.href).name}",
                                          b.offset_dn, b.scale, b.nodata) for b in it.bands))
    signer = ExpiringSigner()
    out = read_chip(task_of(remote), signer=signer)
    assert (out.rgb == np.array([51, 51, 51], np.uint8)).all()
    assert signer.resigned == [b.href for b in remote.bands]  # once per band, unsigned href


def test_http_404_names_the_asset(http_root):
    _, url = http_root
    href = f"{url}/missing/B04.tif"
    it = ItemRead("S2B_Y", tuple(BandRead(b, b.lower(), href, OFFSET, SCALE, 0) for b in RGB))
    signer = ExpiringSigner()
    with pytest.raises(DataError, match=r"item S2B_Y asset b04: cannot read http://.*/missing/"
                                        r"B04\.tif: .*\(after 2 tries\)") as err:
        read_chip(task_of(it), signer=signer)
    assert "token" not in str(err.value)  # the message names the unsigned href, never a token


# --- stretch statistics ----------------------------------------------------------------------------------
def test_compute_stretch_from_coarse_reads(tmp_path):
    # Reflectance uniform on 0..0.4 over the AOI (DN 1000..5000); outside the AOI a bright
    # border (DN 20000) that must not count. Percentiles 2/98 -> 0.008 / 0.392.
    n = 1024
    dn = (1000 + np.linspace(0, 4000, n * n)).reshape(n, n)
    rng = np.random.default_rng(1)
    dn = rng.permutation(dn.ravel()).reshape(n, n).astype(np.uint16)
    dn[:, :100] = 20000
    folder = tmp_path / "s"
    folder.mkdir()
    assets = {b: BandAsset(b.lower(), str(write_cog(folder / f"{b}.tif", dn)), 10, OFFSET, SCALE)
              for b in RGB}
    aoi = shapely.box(X0 + 1000, Y1 - n * 10, X0 + n * 10, Y1)
    footprint = shapely.box(-93, 41, -92, 42)
    item = ParsedItem("s", "sentinel-2-l2a", None, "15TXX", EPSG, footprint.bounds,
                      shapely.to_wkb(footprint), bands=assets)
    grid = TargetGrid(EPSG, 10.0, GRID_TRANSFORM, n, n)
    group = DateGroup("g_20240701", date(2024, 7, 1), (item,), grid, shapely.to_wkb(aoi))
    spec = compute_stretch(group, ("R", "G", "B"), max_side_px=256)
    assert spec.mode == "stretch"
    np.testing.assert_allclose(spec.low, [0.008] * 3, atol=0.004)
    np.testing.assert_allclose(spec.high, [0.392] * 3, atol=0.004)


# --- integration: local STAC API -> select -> plan -> read (needs tests/conftest.py) --------------------
STRETCH_0_02 = ScalingSpec(mode="stretch", low=(0.0,) * 3, high=(0.2,) * 3)  # 0.00078 per level



def _fields_wgs84(info) -> dict[int, shapely.Geometry]:
    import pyarrow.parquet as pq

    table = pq.read_table(info.fields_path).to_pydict()
    return {i: shapely.from_wkb(g) for i, g in zip(table["id"], table["geometry"])}


def _to(epsg: int, geom):
    t = pyproj.Transformer.from_crs(4326, epsg, always_xy=True)
    return shapely.transform(shapely.segmentize(geom, 0.0005),
                             lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1])))


def _task_containing(group, geom_utm, bands=("R", "G", "B", "SCL")):
    """The planned chip task whose window holds ``geom_utm`` most centrally."""
    from raysam.grid import plan_chip_tasks

    c = geom_utm.centroid
    best = None
    for task in plan_chip_tasks(group, bands):
        box = shapely.box(*group.grid.window_bounds(task.window_px))
        if box.contains(geom_utm):
            margin = min(c.x - box.bounds[0], box.bounds[2] - c.x, c.y - box.bounds[1],
                         box.bounds[3] - c.y)
            best = max(best or (margin, task), (margin, task), key=lambda mt: mt[0])
    return best[1] if best else None


def _pixel_mask(geom, task):
    return geometry_mask([geom], (task.window_px[3], task.window_px[2]),
                         Affine(*task.chip_transform), invert=True)


def test_demo_selection_finds_both_tiles_per_date(demo_selection):
    _, info, selections = demo_selection
    assert sorted(selections) == list(info.dates)
    for sel in selections.values():
        assert {i.tile_id for i in sel.items} == set(info.tiles)
        assert info.duplicate_item_id not in {i.id for i in sel.items}


def test_boundary_field_lands_in_both_zone_grids(demo_selection):
    from raysam.demo import scene
    from raysam.grid import make_date_group

    region, info, selections = demo_selection
    sel = selections[info.dates[0]]  # the clear date
    fields = _fields_wgs84(info)
    aoi = region.aoi_wgs84
    candidates = [fid for fid in info.boundary_field_ids
                  if aoi.buffer(-0.002).contains(fields[fid])]
    grass = np.rint(np.array(scene.GRASS_REFLECTANCE[:3][::-1]) / 0.2 * 255)
    medians = {}
    for epsg in (32615, 32616):
        group = make_date_group("demo", sel.date, sel.items, aoi, epsg=epsg)
        for fid in candidates:
            field = _to(epsg, fields[fid])
            task = _task_containing(group, field.buffer(40))
            if task is None:
                continue
            out = read_chip(task, scaling=STRETCH_0_02, max_cloud_fraction=1.0)
            inner, outer = _pixel_mask(field.buffer(-10), task), _pixel_mask(field.buffer(10), task)
            near = _pixel_mask(field.buffer(25), task)
            colour = np.median(out.rgb[inner], axis=0)
            if np.abs(colour - grass).max() < 8:
                continue  # a field the colour of its grass margin says nothing about edges
            is_field = (np.abs(out.rgb.astype(int) - colour).max(axis=-1) <= 4) & near
            assert is_field[inner].mean() > 0.99, f"field {fid} EPSG:{epsg}: interior off"
            assert not (is_field & ~outer).any(), f"field {fid} EPSG:{epsg}: spills > 1 px"
            medians[(fid, epsg)] = colour
            break
    fids = {fid for fid, _ in medians}
    assert {e for _, e in medians} == {32615, 32616}, "no boundary field fits a chip in both zones"
    for fid in fids & {f for f, e in medians if e == 32615} & {f for f, e in medians if e == 32616}:
        np.testing.assert_allclose(medians[(fid, 32615)], medians[(fid, 32616)], atol=1)


def test_offset_is_applied_exactly_once(demo_selection):
    from raysam.demo import scene
    from raysam.grid import make_date_group

    region, info, selections = demo_selection
    sel = selections[info.dates[0]]
    group = make_date_group("demo", sel.date, sel.items, region.aoi_wgs84)
    fields = _fields_wgs84(info)
    inside = [f for f in fields.values() if region.aoi_wgs84.buffer(-0.003).contains(f)]
    field = max(inside, key=lambda f: f.area)
    field_utm = _to(group.grid.epsg, field)
    task = _task_containing(group, field_utm)
    out = read_chip(task, scaling=STRETCH_0_02, max_cloud_fraction=1.0)
    refl = np.median(out.rgb[_pixel_mask(field_utm.buffer(-20), task)], axis=0) / 255 * 0.2
    # Truth 1: the raw DNs of the first item's own file, minus the generator's BOA offset.
    first = next(i for i in sel.items
                 if shapely.from_wkb(i.footprint_wkb).contains(field))
    raw = []
    for b in RGB:
        with rasterio.open(first.bands[b].href) as src:
            t = pyproj.Transformer.from_crs(4326, src.crs, always_xy=True)
            geom = shapely.transform(field, lambda xy: np.column_stack(
                t.transform(xy[:, 0], xy[:, 1]))).buffer(-20)
            win = rasterio.windows.from_bounds(*geom.bounds, transform=src.transform)
            dn = src.read(1, window=win)
            m = geometry_mask([geom], dn.shape, src.window_transform(win), invert=True)
            raw.append(np.median(dn[m]))
    truth = (np.array(raw) - scene.BOA_ADD_OFFSET_DN) * 1e-4
    np.testing.assert_allclose(refl, truth, atol=0.0012)  # 1.5 uint8 levels of this stretch
    # Truth 2: inside the generator's envelope for some land cover (per-field jitter x drift).
    covers = np.array(list(scene.COVER_REFLECTANCE.values()))[:, [2, 1, 0]]
    ok = (refl >= covers * 0.85 * 0.95 - 0.002) & (refl <= covers * 1.15 * 1.05 + 0.002)
    assert ok.all(axis=1).any(), f"field reflectance {refl} fits no land cover"


def test_clouds_masked_on_the_cloudy_date_only(demo_selection):
    from raysam.demo import scene
    from raysam.grid import make_date_group

    region, info, selections = demo_selection
    centre = shapely.Point(scene.CLOUD_CENTER_WGS84)
    for day in info.dates:
        sel = selections[day]
        group = make_date_group("demo", sel.date, sel.items, region.aoi_wgs84)
        centre_utm = _to(group.grid.epsg, centre)
        task = _task_containing(group, centre_utm.buffer(1000))
        out = read_chip(task, max_cloud_fraction=1.0)
        near = _pixel_mask(centre_utm.buffer(1000), task) & out.valid
        far = ~_pixel_mask(centre_utm.buffer(1.4 * scene.CLOUD_RADIUS_M + 40), task) & out.valid
        if day == info.cloudy_date:
            assert out.cloud[near].all() and not out.cloud[far].any()
            assert out.stats["cloud_fraction"] > 0.05
        else:
            assert not out.cloud.any()


# --- aligned fast path, dataset cache, read_band_dn ------------------------------------------------------
def _assert_same_chip(task, **kw):
    fast, warped = read_chip(task, fast_path=True, **kw), read_chip(task, fast_path=False, **kw)
    assert type(fast) is type(warped)
    if isinstance(fast, ChipPixels):
        np.testing.assert_array_equal(fast.rgb, warped.rgb)
        np.testing.assert_array_equal(fast.valid, warped.valid)
        np.testing.assert_array_equal(fast.cloud, warped.cloud)
    assert fast.stats == warped.stats
    return fast


@pytest.mark.parametrize("window", [(0, 0), (37, 11), (-5, 20), (200, 150)])
def test_aligned_fast_path_gives_the_warped_pixels(tmp_path, window):
    # Noisy 10 m bands with a nodata hole and a nodata right strip, a 20 m SCL of random
    # classes; the chip starts on odd 10 m offsets (half a 20 m pixel), before the source
    # origin, or hangs past the source's far edge: every case must equal the warp exactly.
    rng = np.random.default_rng(3)
    dn = [rng.integers(1000, 6000, (300, 320)).astype(np.uint16) for _ in range(3)]
    for d in dn:
        d[50:90, 100:180] = 0
        d[:, 300:] = 0
    scl = rng.choice(np.array([4, 5, 8, 9, 10], np.uint8), size=(150, 160))
    it = item_of(tmp_path, "a", tuple(dn), scl=scl)
    out = _assert_same_chip(task_of(it, window=window), max_cloud_fraction=1.0)
    assert isinstance(out, ChipPixels) and out.cloud.any() and not out.valid.all()
    for band_id, resampling in (("B04", Resampling.bilinear), ("SCL", Resampling.nearest)):
        fast, _ = read_band_dn(task_of(it, window=window), band_id, resampling=resampling)
        warped, _ = read_band_dn(task_of(it, window=window), band_id, resampling=resampling,
                                 fast_path=False)
        np.testing.assert_array_equal(fast, warped)


def test_fast_path_applies_only_to_aligned_sources(tmp_path):
    ones = const(2000, (64, 64))
    aligned = write_cog(tmp_path / "aligned.tif", ones)
    scl20 = write_cog(tmp_path / "scl20.tif", ones, res=20.0)
    shifted = write_cog(tmp_path / "shifted.tif", ones, x0=X0 + 5)  # half a pixel off
    zone16 = write_cog(tmp_path / "z16.tif", ones, epsg=32616)
    task = task_of(window=(3, 1))
    cases = [(aligned, Resampling.bilinear, True), (aligned, Resampling.nearest, True),
             (scl20, Resampling.nearest, True), (scl20, Resampling.bilinear, False),
             (shifted, Resampling.nearest, False), (zone16, Resampling.nearest, False)]
    for path, resampling, expected in cases:
        with rasterio.open(path) as src:
            index = _aligned_index(src, band("B04", path), task, resampling)
        assert (index is not None) == expected, (path.name, resampling)
    with rasterio.open(scl20) as src:  # chip pixel (row 0, col 0) sits at 10 m offset (1, 3)
        rows, cols = _aligned_index(src, band("SCL", scl20), task, Resampling.nearest)
    assert (rows[:4] == [0, 1, 1, 2]).all() and (cols[:4] == [1, 2, 2, 3]).all()


def test_demo_chip_is_identical_with_and_without_the_fast_path(demo_selection):
    from raysam.grid import make_date_group

    region, info, selections = demo_selection
    sel = selections[info.cloudy_date]
    group = make_date_group("demo", sel.date, sel.items, region.aoi_wgs84)  # zone 16 grid
    centre = _to(group.grid.epsg, shapely.Point(-90.0, 41.84))  # on the zone boundary
    task = _task_containing(group, centre.buffer(500))
    assert len(task.items) == 2  # one item aligned (zone 16), one warped (zone 15)
    out = _assert_same_chip(task, max_cloud_fraction=1.0)
    assert out.valid.mean() > 0.5


def test_read_band_dn_mosaics_first_valid_and_names_the_first_band(tmp_path):
    left = const(3000)
    left[:, CHIP // 2:] = 0
    a = item_of(tmp_path, "a", (left, left, left))
    b_bands = tuple(replace(x, offset_dn=0.0) for x in item_of(tmp_path, "b", (const(2200),) * 3).bands)
    b = ItemRead("b", b_bands)
    dn, first = read_band_dn(task_of(a, b), "R")
    assert (dn[:, : CHIP // 2] == 3000).all() and (dn[:, CHIP // 2:] == 2200).all()
    assert first.href == a.band("B04").href and first.offset_dn == OFFSET
    _, first_b = read_band_dn(task_of(b, a), "B04")
    assert first_b.offset_dn == 0.0
    with pytest.raises(DataError, match="has no item with band B08; plan chip tasks with"):
        read_band_dn(task_of(a, b), "N")


def test_cached_dataset_sees_a_rewritten_file(tmp_path):
    it = item_of(tmp_path, "a", (const(3000),) * 3)
    assert (read_chip(task_of(it)).rgb == 51).all()
    for b in it.bands:  # same paths, new content (as a re-run regenerating its inputs)
        write_cog(Path(b.href), const(2200))
    assert (read_chip(task_of(it)).rgb == 31).all()


def test_cache_size_zero_closes_after_each_read_and_negative_is_refused(tmp_path):
    it = item_of(tmp_path, "a", (const(3000),) * 3)
    try:
        set_dataset_cache_size(0)
        assert (read_chip(task_of(it)).rgb == 51).all()
        with pytest.raises(ConfigError, match="dataset cache size -1 must be >= 0"):
            set_dataset_cache_size(-1)
    finally:
        set_dataset_cache_size(DEFAULT_DATASET_CACHE_SIZE)


def _libgdal():
    """The libgdal this process's rasterio loaded, through ctypes: GDAL's block-cache counters.
    rasterio's wheel carries its own (``rasterio.libs/``), and a process that has imported
    geopandas has mapped pyogrio's too, whose cache is another."""
    import ctypes

    with open("/proc/self/maps") as maps:
        paths = [line.split()[-1] for line in maps if "libgdal" in line]
    path = next((p for p in paths if "/rasterio.libs/" in p), paths[0])
    lib = ctypes.CDLL(path)
    for name in ("GDALGetCacheMax64", "GDALGetCacheUsed64"):
        getattr(lib, name).restype = ctypes.c_int64
    return lib


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="finds libgdal through /proc")
def test_decoded_blocks_stay_cached_for_the_next_chip(tmp_path):
    """Neighbouring chips share COG blocks: a chip read leaves its decoded blocks in GDAL's block
    cache, bounded by GDAL_CACHEMAX (bytes: rasterio gave an int 64 to GDALSetCacheMax64 and
    cached nothing)."""
    it = item_of(tmp_path, "a", tuple(np.full((512, 512), v, np.uint16) for v in (3000, 2000, 1000)))
    gdal = _libgdal()
    with rasterio.Env(**gdal_env_options()):
        assert gdal.GDALGetCacheMax64() == GDAL_CACHEMAX_BYTES
        read_chip(task_of(it, size=512))
        # 3 bands x 16 blocks of 128 x 128 uint16 = 1.5 MiB decoded, all of them still cached
        assert gdal.GDALGetCacheUsed64() >= 3 * 512 * 512 * 2


class CachingSigner:
    """Signs with a cached token; ``resign`` fetches the one the token service issues now."""

    def __init__(self, service: Path):
        self.service = service
        self.token = service.read_text()
        self.resigned: list[str] = []

    def __call__(self, href: str) -> str:
        return f"{href}?token={self.token}"

    def resign(self, href: str) -> str:
        self.token = self.service.read_text()
        self.resigned.append(href)
        return self(href)


def test_expired_token_on_a_cached_dataset_reopens_once(http_root):
    # The server accepts only the token named in its root's .token file. A dataset opened and
    # cached with t0 keeps working while t0 is valid; once the server moves to t1, the next
    # read of new blocks gets 403, the cached dataset is dropped, re-signed and reopened.
    root, url = http_root
    (root / ".token").write_text("t0")
    big = const(3000, (1024, 1024))
    it = item_of(root, "a", (big,) * 3)
    remote = ItemRead("a", tuple(replace(b, href=f"{url}/a/{Path(b.href).name}")
                                 for b in it.bands))
    signer = CachingSigner(root / ".token")
    assert (read_chip(task_of(remote), signer=signer).rgb == 51).all()
    assert signer.resigned == []
    (root / ".token").write_text("t1")
    far = read_chip(task_of(remote, window=(768, 768)), signer=signer)
    assert (far.rgb == 51).all()
    # The first band re-signs after its 403; the others fail from their cached datasets, are
    # re-signed with the fresh token and read.
    assert signer.resigned == [b.href for b in remote.bands]


def test_overlapping_warped_chips_see_the_same_pixels(tmp_path):
    # A noisy zone 16 source read onto zone 15 chips: the pixels two overlapping chips share
    # must not depend on the chip window beyond float rounding. GDAL's default warp (0.125 px
    # approximation, kernel scaled per chunk) differs by > 1 DN on 3.8 % of them here, and by
    # up to ~100 DN between the demo's 1024 and 2048 px windows.
    rng = np.random.default_rng(5)
    to16 = pyproj.Transformer.from_crs(EPSG, 32616, always_xy=True)
    sx, sy = to16.transform(X0 + 1280, Y1 - 1280)
    geo = dict(epsg=32616, x0=np.floor(sx / 10) * 10 - 3000, y1=np.ceil(sy / 10) * 10 + 3000)
    noisy = rng.integers(1000, 6000, (600, 600)).astype(np.uint16)
    it = item_of(tmp_path, "z16", (noisy,) * 3, **geo)
    a, _ = read_band_dn(task_of(it, window=(0, 0)), "R")
    b, _ = read_band_dn(task_of(it, window=(64, 32)), "R")
    shared_a, shared_b = a[32:, 64:].astype(int), b[:-32, :-64].astype(int)
    both = (shared_a > 0) & (shared_b > 0)
    assert both.mean() > 0.95
    gap = np.abs(shared_a - shared_b)[both]
    assert gap.max() <= 2 and (gap > 1).mean() < 1e-3
