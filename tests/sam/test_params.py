"""AmgParams validation: every bad value gets a one-line ConfigError naming the field."""

from __future__ import annotations

import numpy as np
import pytest

from raysam.errors import ConfigError
from raysam.sam import AmgParams


def test_defaults_follow_the_seed_and_sam() -> None:
    p = AmgParams()
    assert (p.points_per_side, p.points_per_batch, p.n_crop_layers) == (16, 16, 0)
    assert (p.pred_iou_thresh, p.stability_score_thresh, p.stability_score_offset) == (0.88, 0.95, 1.0)
    assert (p.chip_nms_thr, p.crop_overlap_ratio, p.crop_n_points_downscale_factor) == (0.7, 0.0, 1)
    assert p.min_mask_region_area == 0 and p.multimask is True and p.point_grids is None
    assert p.prompts == "grid"  # SAM's generator unless coverage prompts are asked for


def test_good_edge_values_are_accepted() -> None:
    AmgParams(pred_iou_thresh=0.0, stability_score_thresh=1.0, chip_nms_thr=1.0, crop_overlap_ratio=0.999)
    AmgParams(points_per_side=None, point_grids=(np.array([[0.5, 0.5]]),))
    AmgParams(points_per_side=np.int64(8), multimask=False, n_crop_layers=2)
    AmgParams(prompts="coverage", coverage_min_area_px=1, coverage_max_rounds=1, coverage_max_points=1)


BAD = [
    ("points_per_side", 0, "points_per_side must be a positive integer (>= 1), got 0"),
    ("points_per_side", 16.0, "points_per_side must be a positive integer, got 16.0 (float)"),
    ("points_per_side", True, "points_per_side must be a positive integer, got True (bool)"),
    ("points_per_side", "16", "points_per_side must be a positive integer, got '16' (str)"),
    ("points_per_batch", -4, "points_per_batch must be a positive integer (>= 1), got -4"),
    ("points_per_batch", False, "points_per_batch must be a positive integer, got False (bool)"),
    ("pred_iou_thresh", 1.5, "pred_iou_thresh must be in [0, 1] (0 disables the filter), got 1.5"),
    ("pred_iou_thresh", -0.1, "pred_iou_thresh must be in [0, 1] (0 disables the filter), got -0.1"),
    ("pred_iou_thresh", "0.8", "pred_iou_thresh must be a number, got '0.8' (str)"),
    ("pred_iou_thresh", float("nan"), "pred_iou_thresh must be a finite number, got nan"),
    ("stability_score_thresh", 2, "stability_score_thresh must be in [0, 1] (0 disables the filter), got 2"),
    ("stability_score_thresh", True, "stability_score_thresh must be a number, got True (bool)"),
    ("stability_score_offset", 0.0, "stability_score_offset must be > 0 (a logit offset), got 0.0"),
    ("stability_score_offset", None, "stability_score_offset must be a number, got None (NoneType)"),
    ("chip_nms_thr", 0.0, "chip_nms_thr must be in (0, 1] (a box IoU cutoff), got 0.0"),
    ("chip_nms_thr", 1.01, "chip_nms_thr must be in (0, 1] (a box IoU cutoff), got 1.01"),
    ("n_crop_layers", -1, "n_crop_layers must be a non-negative integer (>= 0), got -1"),
    ("n_crop_layers", 1.0, "n_crop_layers must be a non-negative integer, got 1.0 (float)"),
    ("crop_overlap_ratio", 1.0, "crop_overlap_ratio must be in [0, 1), got 1.0"),
    ("crop_overlap_ratio", -0.2, "crop_overlap_ratio must be in [0, 1), got -0.2"),
    ("crop_n_points_downscale_factor", 0, "crop_n_points_downscale_factor must be a positive integer (>= 1), got 0"),
    ("min_mask_region_area", 100, "min_mask_region_area=100 is not supported (small-region removal is not implemented): set min_mask_region_area=0"),
    ("min_mask_region_area", -1, "min_mask_region_area must be a non-negative integer (>= 0), got -1"),
    ("multimask", 1, "multimask must be true or false, got 1 (int)"),
    ("multimask", "yes", "multimask must be true or false, got 'yes' (str)"),
    ("point_grids", "grid", "point_grids must be a list of (n, 2) arrays in [0, 1], got str"),
    ("prompts", "random", "prompts must be one of grid, coverage, got 'random'"),
    ("prompts", None, "prompts must be one of grid, coverage, got None"),
    ("coverage_min_area_px", 0, "coverage_min_area_px must be a positive integer (>= 1), got 0"),
    ("coverage_min_area_px", 400.0, "coverage_min_area_px must be a positive integer, got 400.0 (float)"),
    ("coverage_max_rounds", 0, "coverage_max_rounds must be a positive integer (>= 1), got 0"),
    ("coverage_max_rounds", "3", "coverage_max_rounds must be a positive integer, got '3' (str)"),
    ("coverage_max_points", -1, "coverage_max_points must be a positive integer (>= 1), got -1"),
    ("coverage_max_points", True, "coverage_max_points must be a positive integer, got True (bool)"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_bad_parameter_message(name: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        AmgParams(**{name: value})
    assert str(err.value) == message
    assert "\n" not in str(err.value)


def test_point_grids_and_points_per_side_are_exclusive() -> None:
    grid = (np.array([[0.5, 0.5]]),)
    with pytest.raises(ConfigError, match="give exactly one of points_per_side or point_grids"):
        AmgParams(point_grids=grid)
    with pytest.raises(ConfigError, match="give exactly one of points_per_side or point_grids"):
        AmgParams(points_per_side=None)
    with pytest.raises(ConfigError, match="point_grids has 1 grids but n_crop_layers=1 needs 2"):
        AmgParams(points_per_side=None, point_grids=grid, n_crop_layers=1)
    with pytest.raises(ConfigError, match=r"point_grids points must be normalised to \[0, 1\]"):
        AmgParams(points_per_side=None, point_grids=(np.array([[0.5, 1.5]]),))
    with pytest.raises(ConfigError, match=r"point_grids must hold \(n, 2\) numeric arrays, got shape \(3,\)"):
        AmgParams(points_per_side=None, point_grids=(np.array([0.1, 0.2, 0.3]),))


def test_params_are_frozen() -> None:
    with pytest.raises(AttributeError):
        AmgParams().points_per_side = 4  # type: ignore[misc]
