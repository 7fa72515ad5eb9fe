"""upsample.py: SAM's logit upsampling as sparse taps, and the exact thresholded-upsampling engine.

The taps are checked against torch's ``F.interpolate`` (as ``Sam.postprocess_masks`` uses it);
the engine's block decisions against dense upsampling of the same logits.
"""

from __future__ import annotations

import numpy as np
import pytest

from raysam.sam import upsample as M


def _logits(kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "noisy":
        return (rng.normal(size=(256, 256)) * 3).astype(np.float32)
    if kind == "blob":  # a smooth blob like a real SAM mask, with exact ties on thresholds
        yy, xx = np.mgrid[0:256, 0:256]
        cy, cx, r = rng.uniform(40, 216, 3)
        out = (r / 3 - np.hypot(yy - cy, xx - cx)).astype(np.float32) / 4
        out[10:20, 10:20] = 1.0
        return np.round(out * 8) / 8
    out = np.full((256, 256), -20.0, np.float32)
    if kind == "padding":  # live only beyond what a 600-px-wide input's outputs see (SAM's padding)
        out[220 + seed : 240, 200:250] = 5.0
    return out


@pytest.mark.parametrize("kind", ["noisy", "blob", "empty", "padding"])
@pytest.mark.parametrize(("input_hw", "crop_hw"), [((1024, 1024), (1024, 1024)), ((1024, 1024), (683, 683)), ((768, 1024), (600, 800)),
                                                  ((1024, 600), (1024, 600))])
def test_thresholded_upsampling_equals_dense_upsampling(kind: str, input_hw: tuple, crop_hw: tuple) -> None:
    """Block decisions and the live region change nothing: counts and mask equal the dense map's."""
    taps = [M.postprocess_taps(256, 1024, i, o) for i, o in zip(input_hw, crop_hw)]
    runs = [M.AxisRuns.from_taps(t) for t in taps]
    thresholds = (-1.0, 0.0, 1.0)
    for seed in range(3):
        logits = _logits(kind, seed)
        dense = M.apply_taps(logits, taps[0], taps[1], (0, crop_hw[0]), (0, crop_hw[1]))
        got = M.upsample_thresholded(logits, runs[0], runs[1], thresholds, mask_index=1)
        assert got.counts.tolist() == [int(np.count_nonzero(dense > t)) for t in thresholds]
        full = np.zeros(crop_hw, bool)
        (y0, x0), (h, w) = got.origin, got.mask.shape
        full[y0 : y0 + h, x0 : x0 + w] = got.mask
        np.testing.assert_array_equal(full, dense > 0)


def test_batched_thresholding_equals_one_map_at_a_time() -> None:
    """Maps of all kinds thresholded together give what each gives alone (the exact dense answer)."""
    taps = [M.postprocess_taps(256, 1024, 1024, 1024)] * 2
    runs = [M.AxisRuns.from_taps(t) for t in taps]
    thresholds = (-1.0, 0.0, 1.0)
    maps = [_logits(kind, seed) for seed in range(3) for kind in ("blob", "noisy", "empty")]
    batch = M.upsample_thresholded_batch(maps, runs[0], runs[1], thresholds, mask_index=1)
    for logits, got in zip(maps, batch, strict=True):
        dense = M.apply_taps(logits, taps[0], taps[1], (0, 1024), (0, 1024))
        assert got.counts.tolist() == [int(np.count_nonzero(dense > t)) for t in thresholds]
        full = np.zeros((1024, 1024), bool)
        (y0, x0), (h, w) = got.origin, got.mask.shape
        full[y0 : y0 + h, x0 : x0 + w] = got.mask
        np.testing.assert_array_equal(full, dense > 0)


@pytest.mark.parametrize(("in_size", "out_size"), [(256, 1024), (1024, 683), (1024, 1024), (7, 3), (5, 13)])
def test_bilinear_matrix_matches_torch_interpolate(in_size: int, out_size: int) -> None:
    torch = pytest.importorskip("torch")
    x = torch.randn(1, 1, in_size, 3)
    ref = torch.nn.functional.interpolate(x, (out_size, 3), mode="bilinear", align_corners=False)
    ours = M.bilinear_matrix(in_size, out_size) @ x[0, 0].numpy()
    np.testing.assert_allclose(ours, ref[0, 0].numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("input_hw", "original_hw"), [((1024, 1024), (1024, 1024)), ((1024, 1024), (683, 683)), ((768, 1024), (600, 800))])
def test_postprocess_taps_match_sam_postprocess(input_hw: tuple[int, int], original_hw: tuple[int, int]) -> None:
    """Our sparse taps reproduce Sam.postprocess_masks (two bilinear resizes) on random logits."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    low = (rng.normal(size=(2, 256, 256)) * 4).astype(np.float32)
    t = torch.as_tensor(low)[:, None]
    up = torch.nn.functional.interpolate(t, (1024, 1024), mode="bilinear", align_corners=False)
    up = up[..., : input_hw[0], : input_hw[1]]
    ref = torch.nn.functional.interpolate(up, original_hw, mode="bilinear", align_corners=False)[:, 0].numpy()
    taps_y = M.postprocess_taps(256, 1024, input_hw[0], original_hw[0])
    taps_x = M.postprocess_taps(256, 1024, input_hw[1], original_hw[1])
    for i in range(2):
        full = M.apply_taps(low[i], taps_y, taps_x, (0, original_hw[0]), (0, original_hw[1]))
        np.testing.assert_allclose(full, ref[i], rtol=0, atol=2e-5)
        part = M.apply_taps(low[i], taps_y, taps_x, (100, 300), (37, 500))
        np.testing.assert_array_equal(part, full[100:300, 37:500])


def test_out_range_covers_every_output_touching_inputs() -> None:
    taps = M.postprocess_taps(256, 1024, 1024, 683)
    lo, hi = taps.out_range(100, 120)
    mat = M.bilinear_matrix(1024, 683) @ M.bilinear_matrix(256, 1024)
    touching = np.flatnonzero(mat[:, 100:121].any(axis=1))
    assert lo <= touching[0] and hi >= touching[-1] + 1
    assert not mat[:lo, 100:121].any() and not mat[hi:, 100:121].any()
