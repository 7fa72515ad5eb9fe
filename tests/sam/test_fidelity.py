"""Fidelity: our ONNX generator against segment_anything.SamAutomaticMaskGenerator on the tiny SAM.

The reference is slow (tens of seconds per image on 2 cores), so each configuration's
reference output is computed once per module and shared by its assertions.

The tiny SAM (tests/tiny_sam.py) has hand-set weights that make every prompt yield a localised
mask, so hundreds of distinct masks survive the seed's thresholds and NMS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from raysam.sam import AutomaticMaskGenerator, load_model

pytestmark = pytest.mark.slow

BASE = dict(points_per_side=16, points_per_batch=16, pred_iou_thresh=0.88,
            stability_score_thresh=0.95, stability_score_offset=1.0, chip_nms_thr=0.7)
CONFIGS = {
    "single_layer": dict(BASE, n_crop_layers=0, crop_overlap_ratio=0.0, crop_n_points_downscale_factor=1),
    "crop_layer": dict(BASE, n_crop_layers=1, crop_overlap_ratio=512 / 1500, crop_n_points_downscale_factor=2),
}
MIN_REFERENCE_MASKS = 50  # the bar for a parity test that proves something


def reference_generator(sam, params: dict):
    """SAM's generator with the same parameters (chip_nms_thr serves both NMS passes)."""
    from segment_anything import SamAutomaticMaskGenerator

    p = dict(params)
    nms = p.pop("chip_nms_thr")
    return SamAutomaticMaskGenerator(
        sam, box_nms_thresh=nms, crop_nms_thresh=nms, crop_n_layers=p.pop("n_crop_layers"), **p
    )


def match_masks(ours: list[dict], ref: list[dict]) -> list[tuple[int, int, float]]:
    """Greedy best-IoU one-to-one matching: (our index, reference index, mask IoU)."""
    pairs = []
    for i, a in enumerate(ours):
        for j, b in enumerate(ref):
            if _boxes_overlap(a["bbox"], b["bbox"]):
                pairs.append((_mask_iou(a, b), i, j))
    used_i, used_j, out = set(), set(), []
    for iou, i, j in sorted(pairs, reverse=True):
        if i not in used_i and j not in used_j:
            used_i.add(i), used_j.add(j)
            out.append((i, j, iou))
    return out


def _boxes_overlap(a: list[int], b: list[int]) -> bool:
    return a[0] <= b[0] + b[2] and b[0] <= a[0] + a[2] and a[1] <= b[1] + b[3] and b[1] <= a[1] + a[3]


def _mask_iou(a: dict, b: dict) -> float:
    """Mask IoU of two records, computed inside the union of their XYWH boxes."""
    x0, y0 = min(a["bbox"][0], b["bbox"][0]), min(a["bbox"][1], b["bbox"][1])
    x1 = max(a["bbox"][0] + a["bbox"][2], b["bbox"][0] + b["bbox"][2]) + 1
    y1 = max(a["bbox"][1] + a["bbox"][3], b["bbox"][1] + b["bbox"][3]) + 1
    sa, sb = a["segmentation"][y0:y1, x0:x1], b["segmentation"][y0:y1, x0:x1]
    union = np.count_nonzero(sa | sb)
    return 1.0 if union == 0 else np.count_nonzero(sa & sb) / union


@pytest.fixture(scope="module", params=list(CONFIGS))
def outputs(request, tiny_sam, tiny_model_dir: Path, tiny_image: np.ndarray):
    """(name, ours, reference) for one configuration."""
    params = CONFIGS[request.param]
    reference = reference_generator(tiny_sam, params).generate(tiny_image)
    ours = AutomaticMaskGenerator(load_model(tiny_model_dir, device="cpu"), **params).generate(tiny_image)
    return request.param, ours, reference


def test_reference_keeps_enough_masks(outputs) -> None:
    _, _, reference = outputs
    assert len(reference) >= MIN_REFERENCE_MASKS


def test_same_masks_as_reference(outputs) -> None:
    _, ours, reference = outputs
    assert len(ours) == len(reference)
    matches = match_masks(ours, reference)
    assert len(matches) == len(reference)
    for i, j, iou in matches:
        assert iou >= 0.99, (i, j, iou)
        assert abs(ours[i]["predicted_iou"] - reference[j]["predicted_iou"]) <= 1e-3
        assert abs(ours[i]["stability_score"] - reference[j]["stability_score"]) <= 1e-3
        assert ours[i]["crop_box"] == reference[j]["crop_box"]
        np.testing.assert_allclose(ours[i]["point_coords"], reference[j]["point_coords"], atol=1e-3)
    # Same order, up to swaps of masks whose scores agree within the tolerance.
    in_place = sum(i == j for i, j, _ in matches)
    assert in_place >= 0.9 * len(matches)


def test_same_record_format_as_reference(outputs) -> None:
    _, ours, reference = outputs
    for a, b in zip(ours, reference):
        assert set(a) == set(b)
        for key in a:
            assert type(a[key]) is type(b[key]) or key == "segmentation", key
        assert a["segmentation"].dtype == b["segmentation"].dtype == bool
        assert a["segmentation"].shape == b["segmentation"].shape
