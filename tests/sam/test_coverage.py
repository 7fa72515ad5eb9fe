"""Coverage-driven prompts: placement on known free maps, and the generator on synthetic fields.

The generator tests run the colour-similarity demo model on :func:`raysam.demo.synthetic.draw_fields`
scenes, whose ``field_id`` raster is the ground truth. A 4x4 grid (points 256 px apart) leaves
most of the 59 fields of ``draw_fields(seed=0)`` without a grid point.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from raysam.demo.model import build_demo_model
from raysam.demo.synthetic import FieldScene, draw_fields
from raysam.errors import DataError
from raysam.sam import AutomaticMaskGenerator, CompactMasks, load_model
from raysam.sam.coverage import BLOCK_PX, chessboard_depth, free_blocks, min_depth_for_area, place_prompts

GRID = dict(points_per_side=4, points_per_batch=64)  # one decoder call per round
COVERAGE = dict(GRID, prompts="coverage")


# ---- placement on known free maps ------------------------------------------------------


def test_chessboard_depth_is_the_largest_free_centred_square() -> None:
    rng = np.random.default_rng(0)
    free = rng.uniform(size=(23, 31)) > 0.15
    depth = chessboard_depth(free)
    padded = np.pad(free, 40)
    for y, x in np.ndindex(free.shape):
        py, px = y + 40, x + 40
        d = 0
        while padded[py - d : py + d + 1, px - d : px + d + 1].all() and (d + 1) <= min(y + 1, x + 1, 23 - y, 31 - x):
            d += 1
        assert depth[y, x] == d, (y, x)


def test_free_blocks_need_every_pixel_free() -> None:
    free = np.ones((10, 9), bool)
    free[5, 0] = False
    blocks = free_blocks(free, 4)
    # 3 x 3 blocks; the last row/column blocks are cut by the edge, so never free.
    assert blocks.tolist() == [[True, True, False], [False, True, False], [False, False, False]]


def test_a_square_hole_gets_one_prompt_at_its_centre() -> None:
    free = np.zeros((256, 256), bool)
    free[64:112, 128:176] = True  # 48 x 48 px, aligned to the blocks
    prompts = place_prompts(free, min_area_px=100, max_points=10)
    assert len(prompts) == 1
    np.testing.assert_allclose(prompts.points_xy[0], [150.0, 86.0], atol=BLOCK_PX / 2)
    assert prompts.half_side_px[0] == 22  # a 44-px free square: 11 blocks around the centre one


def test_a_concave_hole_is_prompted_inside_not_at_its_centroid() -> None:
    free = np.zeros((256, 256), bool)
    free[40:200, 40:80] = True  # an L: the vertical bar ...
    free[160:200, 40:200] = True  # ... and the foot
    ys, xs = np.nonzero(free)
    cx, cy = xs.mean(), ys.mean()
    assert not free[int(cy), int(cx)]  # the centroid falls outside
    prompts = place_prompts(free, min_area_px=400, max_points=10)
    assert len(prompts) >= 1
    for x, y in prompts.points_xy:
        assert free[int(y), int(x)]
        assert free[int(y) - 16 : int(y) + 16, int(x) - 16 : int(x) + 16].all()  # well inside


def test_min_area_decides_which_holes_are_prompted() -> None:
    free = np.zeros((512, 512), bool)
    free[64:112, 64:112] = True  # 48 px: holds a 44-px block square (1936 px)
    free[256:276, 256:276] = True  # 20 px: holds a 20-px block square (400 px)
    free[400:404, :] = True  # a 4-px road: never
    small = place_prompts(free, min_area_px=400, max_points=10)
    assert sorted(map(tuple, small.points_xy.astype(int).tolist())) == [(86, 86), (266, 266)]
    large = place_prompts(free, min_area_px=1936, max_points=10)
    assert large.points_xy.astype(int).tolist() == [[86, 86]]
    assert len(place_prompts(free, min_area_px=1937, max_points=10)) == 0
    for min_area in (1, 16, 17, 400, 401, 1936):
        side_px = (2 * min_depth_for_area(min_area) - 1) * BLOCK_PX  # the smallest centred square that holds it
        assert side_px**2 >= min_area > max(0, side_px - 2 * BLOCK_PX) ** 2


def test_max_points_keeps_the_deepest_and_squares_never_overlap() -> None:
    free = np.zeros((512, 512), bool)
    sides = (24, 32, 40, 48, 56)
    for k, side in enumerate(sides):
        free[64 + 80 * k : 64 + 80 * k + side, 64 : 64 + side] = True
    free[:, 300:500] = True  # a wide strip: several disjoint squares
    everything = place_prompts(free, min_area_px=100, max_points=100)
    assert len(everything) > len(sides) + 1
    half = everything.half_side_px
    assert np.all(np.diff(half) <= 0)  # deepest first
    pts = everything.points_xy
    for i in range(len(pts)):
        for j in range(i):
            gap = np.abs(pts[i] - pts[j]).max()
            assert gap >= half[i] + half[j]  # the free squares are disjoint
    three = place_prompts(free, min_area_px=100, max_points=3)
    np.testing.assert_array_equal(three.points_xy, everything.points_xy[:3])


def test_prompts_stay_in_free_pixels_of_random_maps() -> None:
    rng = np.random.default_rng(1)
    for _ in range(5):
        low = rng.uniform(size=(17, 17)) > 0.5
        free = np.kron(low, np.ones((32, 32), bool))[:500, :530]
        free &= rng.uniform(size=free.shape) > 0.002  # scattered holes (cloud specks)
        prompts = place_prompts(free, min_area_px=64, max_points=50)
        for (x, y), h in zip(prompts.points_xy, prompts.half_side_px):
            x0, y0 = int(x) - BLOCK_PX // 2, int(y) - BLOCK_PX // 2  # the prompt's block
            assert free[y0 : y0 + BLOCK_PX, x0 : x0 + BLOCK_PX].all()
            assert free[int(y - h) : int(y + h), int(x - h) : int(x + h)].all()


# ---- the generator on synthetic fields (demo model) --------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return load_model(build_demo_model(tmp_path_factory.mktemp("demo_model") / "demo"), device="cpu",
                      intra_op_threads=2)


@pytest.fixture(scope="module")
def scene() -> FieldScene:
    return draw_fields(seed=0)


class RecordingDecoder:
    """The real decoder session, remembering the prompts of each call (1024 frame = chip pixels)."""

    def __init__(self, session) -> None:
        self.session, self.calls = session, []

    def run(self, names, feeds):
        self.calls.append(np.asarray(feeds["point_coords"])[:, 0, :].copy())
        return self.session.run(names, feeds)


def _recording(model):
    decoder = RecordingDecoder(model.decoder)
    return dataclasses.replace(model, decoder=decoder), decoder


def _matches(scene: FieldScene, masks: CompactMasks) -> list[tuple[int, float]]:
    """(field id covering most of each mask, IoU with it)."""
    areas = np.bincount(scene.field_id.ravel())
    out = []
    for i in range(len(masks)):
        m = masks.dense_mask(i)
        ids, counts = np.unique(scene.field_id[m], return_counts=True)
        f, inter = int(ids[np.argmax(counts)]), int(counts.max())
        out.append((f, inter / (int(m.sum()) + int(areas[f]) - inter)))
    return out


def _covered(masks: CompactMasks, keep: np.ndarray) -> np.ndarray:
    out = np.zeros(masks.image_hw, bool)
    for i in np.flatnonzero(keep):
        out |= masks.dense_mask(i)
    return out


def test_fields_no_grid_point_hits_are_found_in_later_rounds(model, scene: FieldScene) -> None:
    grid = AutomaticMaskGenerator(model, **GRID).generate_compact(scene.image_rgb)
    cover = AutomaticMaskGenerator(model, **COVERAGE).generate_compact(scene.image_rgb)
    grid_fields = {f for f, iou in _matches(scene, grid) if iou >= 0.5}
    found = _matches(scene, cover)
    fields = [f for f, iou in found if iou >= 0.5]
    assert len(grid_fields) < scene.n_fields / 2  # the 4x4 grid misses most fields
    assert sorted(fields) == list(range(1, scene.n_fields + 1))  # coverage finds every field once
    assert min(iou for _, iou in found) >= 0.9
    for (f, _), prompt_round in zip(found, cover.prompt_round):
        assert (prompt_round == 0) == (f in grid_fields)  # missed fields come from later rounds
    # A missed field's prompt lies inside it.
    for i in np.flatnonzero(cover.prompt_round > 0):
        x, y = cover.point_coords[i]
        assert scene.field_id[int(y), int(x)] == found[i][0]
    assert cover.n_prompts > grid.n_prompts == 16
    assert cover.prompt_round.max() >= 2


def test_records_say_which_round_produced_them(model, scene: FieldScene) -> None:
    gen = AutomaticMaskGenerator(model, **COVERAGE)
    records = gen.generate(scene.image_rgb)
    compact = gen.generate_compact(scene.image_rgb)
    assert [r["prompt_round"] for r in records] == compact.prompt_round.tolist()
    assert {r["prompt_round"] for r in records} >= {0, 1, 2}
    grid_records = AutomaticMaskGenerator(model, **GRID).generate(scene.image_rgb)
    assert "prompt_round" not in grid_records[0]  # grid mode keeps SAM's record format


def test_prompts_avoid_cloud_nodata_and_covered_pixels(model, scene: FieldScene) -> None:
    valid = np.ones(scene.field_id.shape, bool)
    yy, xx = np.mgrid[0:1024, 0:1024]
    valid[np.hypot(yy - 600, xx - 300) < 200] = False  # a cloud
    valid[:, 900:] = False  # nodata beyond the swath
    recording, decoder = _recording(model)
    grid = AutomaticMaskGenerator(model, **GRID).generate_compact(scene.image_rgb)
    cover = AutomaticMaskGenerator(recording, **COVERAGE).generate_compact(scene.image_rgb, valid)
    assert len(decoder.calls) >= 3 and len(decoder.calls[0]) == 16  # the grid, then >= 2 rounds
    for k, prompts in enumerate(decoder.calls[1:], start=1):
        # Covered: by the grid's kept masks, and by every earlier round's kept masks.
        covered = _covered(grid, np.ones(len(grid), bool)) | _covered(cover, cover.prompt_round < k)
        px = prompts.astype(int)
        assert valid[px[:, 1], px[:, 0]].all(), f"round {k} prompted cloud or nodata"
        assert not covered[px[:, 1], px[:, 0]].any(), f"round {k} prompted a covered pixel"
    assert sum(map(len, decoder.calls)) == cover.n_prompts
    # Fields under the cloud are only found by grid points, never by coverage prompts.
    for i in np.flatnonzero(cover.prompt_round > 0):
        x, y = cover.point_coords[i].astype(int)
        assert valid[y, x]


def test_max_rounds_max_points_and_min_area_are_respected(model, scene: FieldScene) -> None:
    def run(**kw) -> tuple[CompactMasks, RecordingDecoder]:
        recording, decoder = _recording(model)
        return AutomaticMaskGenerator(recording, **COVERAGE, **kw).generate_compact(scene.image_rgb), decoder

    one_round, calls = run(coverage_max_rounds=1)
    assert len(calls.calls) == 2 and set(one_round.prompt_round.tolist()) == {0, 1}
    two_points, calls = run(coverage_max_points=2)
    assert [len(c) for c in calls.calls] == [16, 1, 1] and two_points.n_prompts == 18  # ceil(2/3), ceil(1/2)
    budget, calls = run(coverage_max_points=30)
    assert [len(c) for c in calls.calls] == [16, 10, 10, 10] and budget.n_prompts == 46  # spread over 3 rounds
    # min_area: every coverage prompt sits in a free square that holds it ...
    min_area = 60 * 60
    big, calls = run(coverage_min_area_px=min_area, coverage_max_rounds=1)
    grid = AutomaticMaskGenerator(model, **GRID).generate_compact(scene.image_rgb)
    free = ~_covered(grid, np.ones(len(grid), bool))
    half = math.ceil(math.sqrt(min_area) / 2) - BLOCK_PX // 2
    assert len(calls.calls[1]) > 0
    for x, y in calls.calls[1].astype(int):
        assert free[y - half : y + half, x - half : x + half].all()
    # ... and a minimum area no hole holds gives exactly the grid's masks.
    none, calls = run(coverage_min_area_px=1024 * 1024)
    assert len(calls.calls) == 1 and none.n_prompts == 16
    np.testing.assert_array_equal(none.box_xyxy, grid.box_xyxy)
    np.testing.assert_array_equal(none.predicted_iou, grid.predicted_iou)
    assert all(np.array_equal(a, b) for a, b in zip(none.mask_bits, grid.mask_bits, strict=True))


def test_grid_mode_ignores_valid_and_counts_its_prompts(model, scene: FieldScene) -> None:
    gen = AutomaticMaskGenerator(model, points_per_side=8)
    plain = gen.generate_compact(scene.image_rgb)
    masked = gen.generate_compact(scene.image_rgb, np.zeros((1024, 1024), bool))
    assert plain.n_prompts == masked.n_prompts == 64
    assert (plain.prompt_round == 0).all() and len(plain) == len(masked) > 0
    np.testing.assert_array_equal(plain.box_xyxy, masked.box_xyxy)


@pytest.mark.parametrize(("valid", "message"), [
    (np.ones((1024, 512), bool), "valid must be a bool array of the image's shape (1024, 1024), got bool (1024, 512): "
                                 "pass the chip's valid-pixel mask"),
    (np.ones((1024, 1024), np.uint8), "valid must be a bool array of the image's shape (1024, 1024), got uint8 "
                                      "(1024, 1024): pass the chip's valid-pixel mask"),
])
def test_bad_valid_mask_is_one_line(model, scene: FieldScene, valid: np.ndarray, message: str) -> None:
    with pytest.raises(DataError) as err:
        AutomaticMaskGenerator(model, **COVERAGE).generate_compact(scene.image_rgb, valid)
    assert str(err.value) == message


def test_coverage_runs_in_every_crop_of_a_crop_layer(model, scene: FieldScene) -> None:
    params = dict(COVERAGE, n_crop_layers=1, crop_overlap_ratio=0.25, coverage_max_points=20)
    recording, decoder = _recording(model)
    masks = AutomaticMaskGenerator(recording, **params).generate_compact(scene.image_rgb)
    grid_calls = [c for c in decoder.calls if len(c) == 16]  # 4x4 points in each of the 5 crops
    assert len(grid_calls) == 5
    assert masks.n_prompts == sum(map(len, decoder.calls)) <= 5 * (16 + 20)
    assert masks.n_prompts > 5 * 16 and (masks.prompt_round > 0).any()
    # Coverage prompts are in crop coordinates; each lies inside its crop.
    for i in np.flatnonzero(masks.prompt_round > 0):
        x0, y0, x1, y1 = masks.crop_box_xyxy[i]
        assert x0 <= masks.point_coords[i, 0] < x1 and y0 <= masks.point_coords[i, 1] < y1
