"""Parameters of the chip-level automatic mask generator, validated on construction.

Defaults follow the seed workflow (``auto_segment_s2``) and, where it is silent,
``segment_anything.SamAutomaticMaskGenerator``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from raysam.errors import ConfigError


@dataclass(frozen=True)
class AmgParams:
    """Automatic mask generation parameters (one chip).

    Attributes:
        points_per_side: Prompt points per chip side (points_per_side² in all); None when
            ``point_grids`` is given.
        points_per_batch: Prompts decoded together.
        pred_iou_thresh: Keep masks whose predicted IoU is > this (0 disables).
        stability_score_thresh: Keep masks whose stability score is >= this (0 disables).
        stability_score_offset: Logit offset used for the stability score.
        chip_nms_thr: Box IoU cutoff of NMS within a crop and across crops.
        n_crop_layers: Extra crop layers; layer i has (2**i)² crops.
        crop_overlap_ratio: Crop overlap as a fraction of the chip's short side.
        crop_n_points_downscale_factor: Points per side shrink by this factor per layer.
        min_mask_region_area: Only 0 (no small-region post-processing) is supported.
        multimask: Use SAM's three multimask candidates (tokens 1..3), else token 0.
        point_grids: Optional explicit grids, one (n, 2) array in [0, 1] per crop layer.
        prompts: ``grid`` (SAM's point grid only, identical to SAM's generator) or
            ``coverage`` (after the grid, prompt what no kept mask covers, in rounds; see
            :mod:`raysam.sam.coverage`).
        coverage_min_area_px: Coverage prompts go only where the uncovered valid pixels hold
            a square of at least this many pixels around the prompt.
        coverage_max_rounds: Coverage rounds after the grid at most (each decodes the new
            prompts, then looks at what is still uncovered).
        coverage_max_points: Coverage prompts per crop at most, all rounds together; each
            round may use an even share of what the earlier rounds left.
    """

    points_per_side: int | None = 16
    points_per_batch: int = 16
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    chip_nms_thr: float = 0.7
    n_crop_layers: int = 0
    crop_overlap_ratio: float = 0.0
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    multimask: bool = True
    point_grids: tuple[np.ndarray, ...] | None = None
    prompts: str = "grid"
    # 20 x 20 px: 4 ha at Sentinel-2's 10 m, well below a field; roads and margins never hold it.
    coverage_min_area_px: int = 400
    coverage_max_rounds: int = 3
    # With the seed's 16 x 16 grid, a chip's decoder prompts stay under 40 % of a 32 x 32 grid's
    # (256 + 150 = 406 of 1024), the cost target of issue 13.
    coverage_max_points: int = 150

    def __post_init__(self) -> None:
        for f in fields(self):
            _VALIDATORS[f.name](f.name, getattr(self, f.name))
        self._check_grids()

    def _check_grids(self) -> None:
        if (self.points_per_side is None) == (self.point_grids is None):
            raise ConfigError(
                "give exactly one of points_per_side or point_grids "
                f"(got points_per_side={self.points_per_side!r}, "
                f"point_grids={'set' if self.point_grids is not None else None}): "
                "set points_per_side=None to use custom point grids"
            )
        if self.point_grids is not None and len(self.point_grids) != self.n_crop_layers + 1:
            raise ConfigError(
                f"point_grids has {len(self.point_grids)} grids but n_crop_layers="
                f"{self.n_crop_layers} needs {self.n_crop_layers + 1}: give one grid per crop layer"
            )


def _type_name(value: Any) -> str:
    return type(value).__name__


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be a positive integer, got {value!r} ({_type_name(value)})")
    if value < 1:
        raise ConfigError(f"{name} must be a positive integer (>= 1), got {value}")


def _optional_positive_int(name: str, value: Any) -> None:
    if value is not None:
        _positive_int(name, value)


def _non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(
            f"{name} must be a non-negative integer, got {value!r} ({_type_name(value)})"
        )
    if value < 0:
        raise ConfigError(f"{name} must be a non-negative integer (>= 0), got {value}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name} must be a number, got {value!r} ({_type_name(value)})")
    if not np.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _unit_closed(name: str, value: Any) -> None:
    if not 0.0 <= _number(name, value) <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1] (0 disables the filter), got {value}")


def _unit_half_open(name: str, value: Any) -> None:
    if not 0.0 <= _number(name, value) < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {value}")


def _nms_threshold(name: str, value: Any) -> None:
    if not 0.0 < _number(name, value) <= 1.0:
        raise ConfigError(f"{name} must be in (0, 1] (a box IoU cutoff), got {value}")


def _positive_number(name: str, value: Any) -> None:
    if not _number(name, value) > 0.0:
        raise ConfigError(f"{name} must be > 0 (a logit offset), got {value}")


def _zero_area(name: str, value: Any) -> None:
    _non_negative_int(name, value)
    if value != 0:
        raise ConfigError(
            f"{name}={value} is not supported (small-region removal is not implemented): "
            f"set {name}=0"
        )


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be true or false, got {value!r} ({_type_name(value)})")


PROMPT_MODES = ("grid", "coverage")


def _prompt_mode(name: str, value: Any) -> None:
    if not isinstance(value, str) or value not in PROMPT_MODES:
        raise ConfigError(f"{name} must be one of {', '.join(PROMPT_MODES)}, got {value!r}")


def _grids(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name} must be a list of (n, 2) arrays in [0, 1], got {_type_name(value)}")
    for grid in value:
        arr = np.asarray(grid)
        if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0 or arr.dtype.kind not in "fiu":
            raise ConfigError(f"{name} must hold (n, 2) numeric arrays, got shape {arr.shape}")
        if arr.min() < 0 or arr.max() > 1:
            raise ConfigError(f"{name} points must be normalised to [0, 1]")


_VALIDATORS = {
    "points_per_side": _optional_positive_int,
    "points_per_batch": _positive_int,
    "pred_iou_thresh": _unit_closed,
    "stability_score_thresh": _unit_closed,
    "stability_score_offset": _positive_number,
    "chip_nms_thr": _nms_threshold,
    "n_crop_layers": _non_negative_int,
    "crop_overlap_ratio": _unit_half_open,
    "crop_n_points_downscale_factor": _positive_int,
    "min_mask_region_area": _zero_area,
    "multimask": _boolean,
    "point_grids": _grids,
    "prompts": _prompt_mode,
    "coverage_min_area_px": _positive_int,
    "coverage_max_rounds": _positive_int,
    "coverage_max_points": _positive_int,
}
