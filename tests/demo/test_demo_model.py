"""The colour-similarity demo model: contract, determinism and masks on synthetic fields.

Ground truth comes from :func:`raysam.demo.synthetic.draw_fields`, which returns each pixel's
field id (0 on roads) next to the image.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from raysam.demo.model import build_demo_model
from raysam.demo.synthetic import FieldScene, draw_fields
from raysam.sam import contract

PRED_IOU_THRESH = 0.88  # seed workflow defaults (auto_segment_s2)
STABILITY_THRESH = 0.95
STABILITY_OFFSET = 1.0
BIG_FIELD_PX = 64 * 64  # fields at least one 16-per-side grid cell in area


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("demo_model") / "demo")


@pytest.fixture(scope="module")
def scene() -> FieldScene:
    return draw_fields(seed=0)


@pytest.fixture(scope="module")
def sessions(model_dir: Path) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return tuple(
        ort.InferenceSession(str(model_dir / name), options, providers=["CPUExecutionProvider"])
        for name in (contract.ENCODER_FILE, contract.DECODER_FILE)
    )


def _embed(encoder: ort.InferenceSession, image_rgb: np.ndarray) -> np.ndarray:
    mean, std = np.array(contract.PIXEL_MEAN, np.float32), np.array(contract.PIXEL_STD, np.float32)
    x = ((image_rgb.astype(np.float32) - mean) / std).transpose(2, 0, 1)[None]
    return encoder.run(None, {"image": np.ascontiguousarray(x)})[0]


@pytest.fixture(scope="module")
def embedding(sessions, scene: FieldScene) -> np.ndarray:
    return _embed(sessions[0], scene.image_rgb)


def _decode(decoder, embedding, points_xy) -> tuple[np.ndarray, np.ndarray]:
    coords = np.asarray(points_xy, np.float32).reshape(-1, 1, 2)
    labels = np.ones(coords.shape[:2], np.float32)
    iou, logits = decoder.run(None, {"image_embeddings": embedding, "point_coords": coords,
                                     "point_labels": labels})
    return iou, logits


def _upsample_matrix(n_in: int) -> np.ndarray:
    """[4 n_in, n_in] bilinear x4 weights, half-pixel centres (F.interpolate, align_corners=False)."""
    src = np.clip((np.arange(4 * n_in) + 0.5) / 4 - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    weights = np.zeros((4 * n_in, n_in), np.float32)
    np.add.at(weights, (np.arange(4 * n_in), lo), 1 - (src - lo))
    np.add.at(weights, (np.arange(4 * n_in), np.minimum(lo + 1, n_in - 1)), src - lo)
    return weights


UPSAMPLE = _upsample_matrix(contract.LOW_RES_SIZE)


def _mask(logits: np.ndarray, threshold: float = contract.MASK_THRESHOLD) -> np.ndarray:
    """Boolean 1024x1024 ``upsampled > threshold`` of one [256, 256] logit map (bilinear x4,
    half-pixel centres as ``F.interpolate(align_corners=False)``), upsampled only near positives.

    An upsampled pixel is a convex mix of its low-res neighbours, so it can only be positive
    within one low-res pixel of a positive low-res pixel.
    """
    mask = np.zeros((4 * logits.shape[0], 4 * logits.shape[1]), bool)
    ys, xs = np.nonzero(logits > threshold)
    if len(ys):
        ly0, ly1 = max(ys.min() - 2, 0), min(ys.max() + 3, logits.shape[0])
        lx0, lx1 = max(xs.min() - 2, 0), min(xs.max() + 3, logits.shape[1])
        side = logits.shape[0]  # square
        y0, x0 = (0 if ly0 == 0 else 4 * (ly0 + 1)), (0 if lx0 == 0 else 4 * (lx0 + 1))
        y1 = 4 * side if ly1 == side else 4 * (ly1 - 1)
        x1 = 4 * side if lx1 == side else 4 * (lx1 - 1)
        rows, cols = UPSAMPLE[y0:y1, ly0:ly1], UPSAMPLE[x0:x1, lx0:lx1]
        window = rows @ logits[ly0:ly1, lx0:lx1] @ cols.T
        mask[y0:y1, x0:x1] = window > threshold
    return mask


def _interior_point(field_id: np.ndarray, field: int, margin_px: int = 12) -> tuple[int, int]:
    """(x, y) of the field pixel nearest its centroid whose ``margin_px`` box lies inside it."""
    ys, xs = np.nonzero(field_id == field)
    y0, x0 = ys.min(), xs.min()
    inside = np.pad(field_id[y0:ys.max() + 1, x0:xs.max() + 1] == field, 1).astype(np.int32)
    integral = inside.cumsum(0).cumsum(1)
    k = 2 * margin_px + 1
    box = integral[k:, k:] - integral[:-k, k:] - integral[k:, :-k] + integral[:-k, :-k]
    iy, ix = np.nonzero(box == k * k)
    iy, ix = iy + margin_px + y0, ix + margin_px + x0
    best = np.argmin((iy - ys.mean()) ** 2 + (ix - xs.mean()) ** 2)
    return int(ix[best]), int(iy[best])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _stability(logits: np.ndarray) -> float:
    """SAM's stability score of one [256, 256] logit map, on the upsampled logits."""
    high, low = _mask(logits, STABILITY_OFFSET).sum(), _mask(logits, -STABILITY_OFFSET).sum()
    return float(high / max(low, 1))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_is_byte_deterministic(model_dir: Path, tmp_path: Path) -> None:
    again = build_demo_model(tmp_path / "again")
    for name in (contract.ENCODER_FILE, contract.DECODER_FILE, contract.MANIFEST_NAME):
        assert _sha(again / name) == _sha(model_dir / name), name


def test_manifest_describes_files_and_contract(model_dir: Path) -> None:
    from raysam.sam.model import read_manifest, verify_files

    manifest = read_manifest(model_dir)  # the loader's own checks
    verify_files(model_dir, manifest)
    assert manifest["format"] == contract.MANIFEST_FORMAT
    assert manifest["model_type"] == "demo" and manifest["model_type"] in contract.MODEL_TYPES
    assert manifest["family"] == "demo"
    assert "NOT Segment Anything" in manifest["description"]
    assert manifest["licence"] == "MIT"
    assert manifest["checkpoint"] is None and manifest["precision"] == "fp32"
    assert manifest["tools"]["onnx"] == onnx.__version__
    assert manifest["pixel_mean"] == list(contract.PIXEL_MEAN)
    assert manifest["pixel_std"] == list(contract.PIXEL_STD)
    assert manifest["image_size"] == 1024 and manifest["low_res_size"] == 256
    assert manifest["num_mask_tokens"] == 4
    assert manifest["embedding_shape"][0] == 1 and manifest["embedding_shape"][2:] == [64, 64]
    for role, name in (("encoder", contract.ENCODER_FILE), ("decoder", contract.DECODER_FILE)):
        entry = manifest[role]
        assert entry["file"] == name
        assert entry["bytes"] == (model_dir / name).stat().st_size
        assert entry["sha256"] == _sha(model_dir / name)
        assert entry["external_data"] is None


def _signature(values) -> list[tuple[str, int, list]]:
    out = []
    for v in values:
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        out.append((v.name, v.type.tensor_type.elem_type, dims))
    return out


def test_onnx_checker_and_contract_signatures(model_dir: Path) -> None:
    encoder = onnx.load(model_dir / contract.ENCODER_FILE)
    decoder = onnx.load(model_dir / contract.DECODER_FILE)
    for model in (encoder, decoder):
        onnx.checker.check_model(model, full_check=True)
    f32 = onnx.TensorProto.FLOAT
    c = json.loads((model_dir / contract.MANIFEST_NAME).read_text())["embedding_shape"][1]
    assert _signature(encoder.graph.input) == [("image", f32, [1, 3, 1024, 1024])]
    assert _signature(encoder.graph.output) == [("image_embeddings", f32, [1, c, 64, 64])]
    assert _signature(decoder.graph.input) == [
        ("image_embeddings", f32, [1, c, 64, 64]),
        ("point_coords", f32, ["B", "N", 2]),
        ("point_labels", f32, ["B", "N"]),
    ]
    assert _signature(decoder.graph.output) == [
        ("iou_predictions", f32, ["B", 4]),
        ("low_res_masks", f32, ["B", 4, 256, 256]),
    ]


def test_dynamic_batch_uses_first_point_only(sessions, embedding, scene: FieldScene) -> None:
    points = [_interior_point(scene.field_id, f) for f in (1, 2, 3)]
    iou_one, logits_one = _decode(sessions[1], embedding, points)
    coords = np.array([[p, (5.0, 5.0)] for p in points], np.float32)  # second point: elsewhere
    labels = np.array([[1.0, 0.0]] * 3, np.float32)
    iou_two, logits_two = sessions[1].run(None, {"image_embeddings": embedding,
                                                  "point_coords": coords, "point_labels": labels})
    assert iou_two.shape == (3, 4) and logits_two.shape == (3, 4, 256, 256)
    np.testing.assert_array_equal(logits_two, logits_one)
    np.testing.assert_array_equal(iou_two, iou_one)


def test_prompt_inside_a_field_recovers_it(sessions, embedding: np.ndarray, scene: FieldScene) -> None:
    areas = np.bincount(scene.field_id.ravel())
    fields = [f for f in range(1, scene.n_fields + 1) if areas[f] >= BIG_FIELD_PX]
    points = [_interior_point(scene.field_id, f) for f in fields]
    iou_pred, logits = _decode(sessions[1], embedding, points)
    for i, field in enumerate(fields):
        truth = scene.field_id == field
        ious = [_iou(_mask(logits[i, k]), truth) for k in range(4)]
        assert min(ious) >= 0.9, (field, ious)
        assert iou_pred[i].max() > PRED_IOU_THRESH, (field, iou_pred[i])


def test_same_colour_neighbours_stay_separate(sessions, embedding, scene: FieldScene) -> None:
    a, b = scene.same_colour_pair
    np.testing.assert_array_equal(scene.colours_rgb[a], scene.colours_rgb[b])
    _, logits = _decode(sessions[1], embedding, [_interior_point(scene.field_id, f) for f in (a, b)])
    for i, (own, other) in enumerate(((a, b), (b, a))):
        for k in range(4):
            mask = _mask(logits[i, k])
            assert _iou(mask, scene.field_id == own) >= 0.9
            assert (mask & (scene.field_id == other)).sum() == 0


def test_prompt_on_a_road_is_filtered_out(sessions, embedding: np.ndarray, scene: FieldScene) -> None:
    ys, xs = np.nonzero(scene.field_id == 0)
    pick = np.linspace(0, len(ys) - 1, 16).astype(int)
    iou_pred, _ = _decode(sessions[1], embedding, np.stack([xs[pick], ys[pick]], 1))
    assert iou_pred.max() < PRED_IOU_THRESH


def test_noise_lowers_stability(sessions) -> None:
    clean, noisy = draw_fields(seed=1, noise_std=2.0), draw_fields(seed=1, noise_std=24.0)
    areas = np.bincount(clean.field_id.ravel())
    fields = [f for f in range(1, clean.n_fields + 1) if areas[f] >= BIG_FIELD_PX][:8]
    points = [_interior_point(clean.field_id, f) for f in fields]
    stab = {}
    for name, s in (("clean", clean), ("noisy", noisy)):
        _, logits = _decode(sessions[1], _embed(sessions[0], s.image_rgb), points)
        stab[name] = np.array([[_stability(row[k]) for k in (1, 2, 3)] for row in logits])
    assert stab["clean"].min() >= STABILITY_THRESH
    assert (stab["noisy"] < stab["clean"]).mean() > 0.9


def _best_field(scene: FieldScene, mask: np.ndarray) -> tuple[int, float]:
    """(field id covering most of ``mask``, IoU of the mask with that field); id 0 is road."""
    ids, counts = np.unique(scene.field_id[mask], return_counts=True)
    field, inter = int(ids[np.argmax(counts)]), int(counts.max())
    return field, inter / (int(mask.sum()) + int((scene.field_id == field).sum()) - inter)


def test_generator_recovers_each_field_once(model_dir: Path, scene: FieldScene) -> None:
    from raysam.sam import AutomaticMaskGenerator, load_model

    model = load_model(model_dir, device="cpu", intra_op_threads=2)
    compact = AutomaticMaskGenerator(model, points_per_side=16).generate_compact(scene.image_rgb)
    matches = [_best_field(scene, compact.dense_mask(i)) for i in range(len(compact))]
    fields = [f for f, _ in matches]
    assert 0 not in fields and len(set(fields)) == len(fields)  # no road, no field twice
    assert min(iou for _, iou in matches) >= 0.8
    areas = np.bincount(scene.field_id.ravel())
    big = {f for f in range(1, scene.n_fields + 1) if areas[f] >= BIG_FIELD_PX}
    assert len(big & set(fields)) >= 0.85 * len(big)
    assert set(scene.same_colour_pair) <= set(fields)
