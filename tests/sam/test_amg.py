"""The generator's own machinery: output records, single-mask mode, concurrent decoding, input errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from raysam.errors import ConfigError, DataError
from raysam.sam import AmgParams, AutomaticMaskGenerator, load_model
from raysam.sam import masks as M
from raysam.sam.amg import prefetched


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    return load_model(tiny_model_dir, device="cpu")


def test_records_have_sam_keys_and_agree_with_compact(model, tiny_image: np.ndarray) -> None:
    gen = AutomaticMaskGenerator(model, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    records = gen.generate(tiny_image)
    compact = gen.generate_compact(tiny_image)
    assert len(records) == len(compact) > 0
    for i, rec in enumerate(records):
        assert set(rec) == {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box"}
        seg = rec["segmentation"]
        assert seg.dtype == bool and seg.shape == tiny_image.shape[:2]
        assert rec["area"] == int(seg.sum()) == int(compact.area[i])
        if rec["area"]:
            box = M.batched_mask_to_box(seg)
            assert rec["bbox"] == [int(box[0]), int(box[1]), int(box[2] - box[0]), int(box[3] - box[1])]
        assert rec["crop_box"] == [0, 0, 1024, 1024]
        assert isinstance(rec["predicted_iou"], float) and isinstance(rec["stability_score"], float)
        assert len(rec["point_coords"]) == 1 and len(rec["point_coords"][0]) == 2
    assert compact.box_xyxy.dtype == np.int32 and compact.crop_box_xyxy.dtype == np.int32
    assert all(b.dtype == np.uint8 and b.shape[0] == compact.box_xyxy[i, 3] - compact.box_xyxy[i, 1] + 1
               for i, b in enumerate(compact.mask_bits))
    # Sorted by predicted IoU within the one crop, as SAM's NMS leaves them.
    assert np.all(np.diff(compact.predicted_iou) <= 0)


def test_single_mask_mode_uses_token_zero(model, tiny_image: np.ndarray) -> None:
    gen = AutomaticMaskGenerator(model, points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                 chip_nms_thr=1.0, multimask=False)
    compact = gen.generate_compact(tiny_image)
    emb = model.encode(model.preprocess(tiny_image)[0])
    points = M.build_point_grid(2) * 1024
    iou, _ = model.decode(emb, points[:, None, :], np.ones((4, 1)))
    np.testing.assert_allclose(np.sort(compact.predicted_iou), np.sort(iou[:, 0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("workers", [1, 2, 3, 5])
def test_prefetched_keeps_order_and_bounds_what_runs_ahead(workers: int) -> None:
    import threading
    import time

    lock, running, most = threading.Lock(), [0], [0]

    def slow_square(x: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.01 * (x % 3))  # out-of-order completion
        with lock:
            running[0] -= 1
        return x * x

    items = list(range(9))
    assert list(prefetched(slow_square, items, workers)) == [x * x for x in items]
    assert min(workers, 2) <= most[0] <= workers  # it does run ahead, and no further than asked
    assert list(prefetched(slow_square, [4], workers)) == [16] and list(prefetched(slow_square, [], workers)) == []


def test_concurrent_decoder_runs_give_the_same_masks(tiny_model_dir: Path, tiny_image: np.ndarray) -> None:
    params = dict(points_per_side=8, points_per_batch=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    results = {}
    for threads in (1, 2, 3):
        model = load_model(tiny_model_dir, device="cpu", intra_op_threads=threads)
        assert model.decode_workers == threads
        results[threads] = AutomaticMaskGenerator(model, **params).generate_compact(tiny_image)
    assert len(results[1]) > 10
    for other in (results[2], results[3]):
        np.testing.assert_array_equal(other.box_xyxy, results[1].box_xyxy)
        np.testing.assert_array_equal(other.predicted_iou, results[1].predicted_iou)
        np.testing.assert_array_equal(other.stability_score, results[1].stability_score)
        assert all(np.array_equal(a, b) for a, b in zip(other.mask_bits, results[1].mask_bits, strict=True))


def test_params_object_and_overrides(model) -> None:
    p = AmgParams(points_per_side=8)
    assert AutomaticMaskGenerator(model, p).params is p
    assert AutomaticMaskGenerator(model, p, points_per_batch=4).params.points_per_batch == 4
    with pytest.raises(ConfigError, match="unknown mask generator parameter"):
        AutomaticMaskGenerator(model, box_nms_thresh=0.5)
    with pytest.raises(ConfigError, match="points_per_batch must be a positive integer"):
        AutomaticMaskGenerator(model, points_per_batch=0)


@pytest.mark.parametrize(("image", "message"), [
    (np.zeros((64, 64), np.uint8), "image must be an HxWx3 uint8 array, got shape (64, 64): pass RGB pixels"),
    (np.zeros((64, 64, 3), np.float32), "image must be uint8 (0..255), got float32: scale it to uint8 first"),
    (np.zeros((0, 64, 3), np.uint8), "image is empty (shape (0, 64, 3)): pass a non-empty chip"),
])
def test_bad_images(model, image: np.ndarray, message: str) -> None:
    with pytest.raises(DataError) as err:
        AutomaticMaskGenerator(model).generate_compact(image)
    assert str(err.value) == message


@pytest.mark.parametrize("pred_iou_thresh", [0.0, 0.88, 0.96, 0.97])
def test_split_decoder_gives_the_same_masks(tiny_model_dir: Path, tiny_image: np.ndarray, pred_iou_thresh: float) -> None:
    """Prompts without a candidate above the threshold skip the upscaling; the masks do not change.

    The fixture predicts 0.97, 0.95 and 0.93 for tokens 1..3: at 0.96 only token 1 passes, at
    0.97 nothing does (every prompt is dropped before the upscaling).
    """
    params = dict(points_per_side=8, pred_iou_thresh=pred_iou_thresh)
    split = AutomaticMaskGenerator(load_model(tiny_model_dir, device="cpu"), **params).generate_compact(tiny_image)
    one = AutomaticMaskGenerator(load_model(tiny_model_dir, device="cpu", split_decoder=False),
                                 **params).generate_compact(tiny_image)
    assert (len(one) > 0) == (pred_iou_thresh < 0.97)
    np.testing.assert_array_equal(split.box_xyxy, one.box_xyxy)
    np.testing.assert_array_equal(split.predicted_iou, one.predicted_iou)
    np.testing.assert_array_equal(split.stability_score, one.stability_score)
    assert all(np.array_equal(a, b) for a, b in zip(split.mask_bits, one.mask_bits, strict=True))


def test_split_decoder_drops_some_prompts_and_keeps_the_masks(tmp_path: Path, tiny_image: np.ndarray) -> None:
    """A SAM whose predicted IoU varies by prompt: the prompts without a candidate are dropped."""
    pytest.importorskip("torch")
    from raysam.export import export_sam
    from tests.tiny_sam import build_random_sam

    model_dir = export_sam(build_random_sam(seed=0), tmp_path / "random", model_type="vit_tiny")
    params = dict(points_per_side=16, pred_iou_thresh=1.0, stability_score_thresh=0.0)
    split_model = load_model(model_dir, device="cpu")
    gen = AutomaticMaskGenerator(split_model, **params)
    emb = split_model.encode(split_model.preprocess(tiny_image)[0])
    iou, _ = split_model.decode(emb, gen.point_grids[0][:, None, :] * 1024, np.ones((256, 1)))
    dropped = int((~gen._has_candidate(iou)).sum())
    assert 0 < dropped < 256  # the split really skips some prompts' upscaling
    split = gen.generate_compact(tiny_image)
    one = AutomaticMaskGenerator(load_model(model_dir, device="cpu", split_decoder=False), **params).generate_compact(tiny_image)
    assert len(one) > 0
    np.testing.assert_array_equal(split.box_xyxy, one.box_xyxy)
    np.testing.assert_array_equal(split.stability_score, one.stability_score)
    assert all(np.array_equal(a, b) for a, b in zip(split.mask_bits, one.mask_bits, strict=True))
