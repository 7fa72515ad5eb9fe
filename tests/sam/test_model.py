"""load_model: manifest/file/signature checks with one-line errors, providers, SAM preprocessing."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from raysam.errors import ConfigError, ModelError
from raysam.sam import load_model
from raysam.sam.contract import EXPORT_COMMAND
from raysam.sam.model import decoder_split

FIX = "re-run " + EXPORT_COMMAND.format(model_type="vit_tiny")


@pytest.fixture()
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the exported tiny model, free to damage."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def _manifest(model_dir: Path) -> dict:
    return json.loads((model_dir / "manifest.json").read_text())


def _write_manifest(model_dir: Path, manifest: dict) -> None:
    (model_dir / "manifest.json").write_text(json.dumps(manifest))


def _load_error(model_dir: Path, exc: type[Exception] = ModelError, **kwargs) -> str:
    with pytest.raises(exc) as err:
        load_model(model_dir, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_loads_on_cpu_and_says_so(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="raysam.sam.model"):
        model = load_model(tiny_model_dir, device="cpu")
    assert model.provider == "CPUExecutionProvider" and model.model_type == "vit_tiny"
    assert "runs on CPUExecutionProvider" in caplog.text


@pytest.mark.parametrize(("threads", "workers", "per_run"), [(1, 1, 1), (2, 2, 1), (3, 3, 1), (16, 4, 4), (17, 4, 4)])
def test_cpu_decoder_spreads_threads_over_concurrent_runs(tiny_model_dir: Path, threads, workers, per_run) -> None:
    assert decoder_split(threads) == (workers, per_run)
    if threads <= 3:
        model = load_model(tiny_model_dir, device="cpu", intra_op_threads=threads)
        assert model.decode_workers == workers


def test_own_session_options_decode_one_batch_at_a_time(tiny_model_dir: Path) -> None:
    import onnxruntime

    model = load_model(tiny_model_dir, device="cpu", session_options=onnxruntime.SessionOptions())
    assert model.decode_workers == 1


def test_auto_uses_a_provider_that_really_initialised(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir, device="auto")
    assert model.provider in model.encoder.get_providers()[0]
    assert model.decoder.get_providers()[0] == model.provider


def test_missing_directory(tmp_path: Path) -> None:
    message = _load_error(tmp_path / "nope")
    assert message.startswith(f"model directory {tmp_path / 'nope'} does not exist: re-run python scripts/export_sam_models.py")


def test_missing_manifest(model_copy: Path) -> None:
    (model_copy / "manifest.json").unlink()
    assert _load_error(model_copy).startswith(f"manifest.json is missing from {model_copy}: re-run")


def test_missing_decoder(model_copy: Path) -> None:
    (model_copy / "decoder.onnx").unlink()
    assert _load_error(model_copy) == f"decoder.onnx is missing from {model_copy}: {FIX}"


def test_truncated_encoder(model_copy: Path) -> None:
    path = model_copy / "encoder.onnx"
    full = path.stat().st_size
    path.write_bytes(path.read_bytes()[: full // 2])
    assert _load_error(model_copy) == (
        f"encoder.onnx is truncated or corrupt ({full // 2} bytes, manifest says {full}): {FIX}"
    )


def test_same_size_but_different_bytes(model_copy: Path) -> None:
    path = model_copy / "decoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert _load_error(model_copy) == (
        f"decoder.onnx does not match the sha256 in manifest.json (corrupt or replaced): {FIX}"
    )


def test_corrupt_file_with_a_matching_manifest(model_copy: Path) -> None:
    import hashlib

    junk = b"not an onnx graph" * 100
    (model_copy / "encoder.onnx").write_bytes(junk)
    manifest = _manifest(model_copy)
    manifest["encoder"].update(bytes=len(junk), sha256=hashlib.sha256(junk).hexdigest())
    _write_manifest(model_copy, manifest)
    message = _load_error(model_copy)
    assert message.startswith("encoder.onnx could not be loaded by onnxruntime (")
    assert message.endswith(FIX)


def test_unknown_model_type(model_copy: Path) -> None:
    manifest = _manifest(model_copy)
    manifest["model_type"] = "vit_x"
    _write_manifest(model_copy, manifest)
    message = _load_error(model_copy)
    assert "names unknown model_type 'vit_x' (known: vit_b, vit_l, vit_h, vit_tiny, demo)" in message


def test_wrong_format(model_copy: Path) -> None:
    manifest = _manifest(model_copy)
    manifest["format"] = "something/2"
    _write_manifest(model_copy, manifest)
    assert "has format 'something/2', expected 'raysam-sam-onnx/1'" in _load_error(model_copy)


def test_manifest_signature_that_does_not_match_the_graph(model_copy: Path) -> None:
    manifest = _manifest(model_copy)
    manifest["decoder"]["inputs"][1]["name"] = "points"
    _write_manifest(model_copy, manifest)
    message = _load_error(model_copy)
    assert message.startswith("decoder.onnx inputs [image_embeddings:float32/rank4, point_coords:float32/rank3")
    assert "differ from manifest.json's" in message and message.endswith(FIX)


def test_graph_that_breaks_the_contract(model_copy: Path) -> None:
    """An encoder whose input is not called ``image`` is refused even with a consistent manifest."""
    import hashlib

    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["pixels"], ["image_embeddings"])], "g",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 3, 1024, 1024])],
        [helper.make_tensor_value_info("image_embeddings", TensorProto.FLOAT, [1, 3, 1024, 1024])],
    )
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(data))
    (model_copy / "encoder.onnx").write_bytes(data)
    manifest = _manifest(model_copy)
    manifest["encoder"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    _write_manifest(model_copy, manifest)
    assert _load_error(model_copy) == (
        "encoder.onnx inputs are [pixels:float32/rank4], the contract needs [image:float32/rank4]: " + FIX
    )


def test_cuda_without_cuda_is_a_clear_error(tiny_model_dir: Path) -> None:
    if load_model(tiny_model_dir, device="auto").provider == "CUDAExecutionProvider":
        pytest.skip("this machine has a working CUDA provider")
    message = _load_error(tiny_model_dir, ConfigError, device="cuda")
    assert message.startswith("device='cuda' but onnxruntime cannot run on CUDA here")
    assert "use device='auto' or device='cpu'" in message


def test_unknown_device(tiny_model_dir: Path) -> None:
    assert _load_error(tiny_model_dir, ConfigError, device="gpu") == (
        "device must be one of auto, cuda, cpu, got 'gpu'"
    )


def test_preprocessing_matches_sam(tiny_model_dir: Path, tiny_sam) -> None:
    torch = pytest.importorskip("torch")
    from segment_anything.utils.transforms import ResizeLongestSide

    model = load_model(tiny_model_dir, device="cpu")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (600, 437, 3), dtype=np.uint8)
    transform = ResizeLongestSide(1024)
    resized = model.apply_image(image)
    np.testing.assert_array_equal(resized, transform.apply_image(image))
    coords = rng.uniform(0, 437, (5, 2))
    np.testing.assert_allclose(model.apply_coords(coords, image.shape[:2]), transform.apply_coords(coords, image.shape[:2]))
    x, input_hw = model.preprocess(image)
    ref = tiny_sam.preprocess(torch.as_tensor(resized.copy()).permute(2, 0, 1).contiguous()[None])
    assert input_hw == resized.shape[:2] and x.shape == (1, 3, 1024, 1024)
    np.testing.assert_allclose(x, ref.numpy(), rtol=0, atol=1e-5)


def test_decode_shapes(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir, device="cpu")
    emb = model.encode(np.zeros((3, 1024, 1024), np.float32))
    iou, low = model.decode(emb, np.full((5, 1, 2), 100.0), np.ones((5, 1)))
    assert iou.shape == (5, 4) and low.shape == (5, 4, 256, 256) and low.dtype == np.float32


def test_split_decoder_decodes_only_the_kept_prompts_exactly(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir, device="cpu")
    assert model.decoder_head is not None and model.decoder_masks is not None
    emb = model.encode(np.random.default_rng(0).normal(size=(3, 1024, 1024)).astype(np.float32))
    coords = np.random.default_rng(1).uniform(0, 1024, (6, 1, 2))
    iou, low = model.decode(emb, coords, np.ones((6, 1)))
    for pick in (np.array([True, False, False, True, True, False]), np.zeros(6, bool), np.ones(6, bool)):
        got_iou, got_low, rows = model.decode_kept(emb, coords, np.ones((6, 1)), lambda _: pick)
        assert rows.tolist() == np.flatnonzero(pick).tolist()
        np.testing.assert_array_equal(got_iou, iou)
        np.testing.assert_array_equal(got_low, low[rows])
    one_graph = load_model(tiny_model_dir, device="cpu", split_decoder=False)
    assert one_graph.decoder_head is None
    _, all_low, rows = one_graph.decode_kept(emb, coords, np.ones((6, 1)), lambda _: np.zeros(6, bool))
    assert rows.tolist() == list(range(6))  # without the split every prompt is decoded
    np.testing.assert_array_equal(all_low, low)


def test_split_decoder_is_optional_but_checked(model_copy: Path) -> None:
    manifest = _manifest(model_copy)
    without = {k: v for k, v in manifest.items() if k not in ("decoder_head", "decoder_masks")}
    _write_manifest(model_copy, without)
    assert load_model(model_copy, device="cpu").decoder_head is None  # models exported before the split
    _write_manifest(model_copy, {**without, "decoder_masks": manifest["decoder_masks"]})
    assert _load_error(model_copy) == (
        f"{model_copy / 'manifest.json'} lacks a 'decoder_head' entry for decoder_head.onnx with bytes and sha256: " + FIX
    )
    _write_manifest(model_copy, manifest)
    (model_copy / "decoder_masks.onnx").write_bytes(b"x" * manifest["decoder_masks"]["bytes"])
    assert _load_error(model_copy) == (
        "decoder_masks.onnx does not match the sha256 in manifest.json (corrupt or replaced): " + FIX
    )
