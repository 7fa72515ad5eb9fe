"""raysam.export and raysam.download: ONNX parity with torch, manifest, resumable checksummed downloads.

The ONNX graphs of the tiny SAM (tests/tiny_sam.py) are run with onnxruntime on CPU and
compared with segment_anything's own modules on the same inputs.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from raysam.download import Checkpoint, download_checkpoint  # noqa: E402
from raysam.errors import ConfigError, ModelError  # noqa: E402
from raysam.export import export_sam  # noqa: E402
from raysam.sam import contract  # noqa: E402
from tests.tiny_sam import build_random_sam, build_tiny_sam, export_tiny_sam, load_tiny_image  # noqa: E402

ATOL = 1e-4
RTOL = 1e-5
# The fixture's mask logits span about 400 (steep edges): float32 rounding shows up at ~1e-6 of that.
LOGIT_ATOL = 1e-3


@pytest.fixture(scope="module")
def tiny_sam():
    return build_tiny_sam()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return export_tiny_sam(tmp_path_factory.mktemp("tiny") / "vit_tiny")


def _session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def embeddings(tiny_sam) -> np.ndarray:
    """Torch embeddings of the fixture image, preprocessed as Sam.preprocess does."""
    image = torch.from_numpy(load_tiny_image()).permute(2, 0, 1).float()[None]
    with torch.no_grad():
        return tiny_sam.image_encoder(tiny_sam.preprocess(image)).numpy()


def test_encoder_matches_torch(model_dir, tiny_sam, embeddings):
    image = torch.from_numpy(load_tiny_image()).permute(2, 0, 1).float()[None]
    normalised = tiny_sam.preprocess(image).numpy()
    (onnx_embeddings,) = _session(model_dir / contract.ENCODER_FILE).run(None, {"image": normalised})
    assert onnx_embeddings.shape == (1, 64, contract.EMBEDDING_SIDE, contract.EMBEDDING_SIDE)
    np.testing.assert_allclose(onnx_embeddings, embeddings, atol=ATOL, rtol=RTOL)


def _torch_decoder(sam, embeddings: np.ndarray, coords: np.ndarray, labels: np.ndarray, multimask: bool):
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=(torch.from_numpy(coords), torch.from_numpy(labels)),
                                           boxes=None, masks=None)
        masks, iou = sam.mask_decoder(image_embeddings=torch.from_numpy(embeddings),
                                      image_pe=sam.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=multimask)
    return masks.numpy(), iou.numpy()


@pytest.mark.parametrize("batch, points", [(5, 1), (3, 2), (1, 3)])
def test_decoder_matches_torch(model_dir, tiny_sam, embeddings, batch, points):
    rng = np.random.default_rng(batch * 10 + points)
    coords = rng.uniform(0, 1024, size=(batch, points, 2)).astype(np.float32)
    labels = rng.integers(0, 2, size=(batch, points)).astype(np.float32)
    labels[:, 0] = 1
    iou, low_res = _session(model_dir / contract.DECODER_FILE).run(
        None, {"image_embeddings": embeddings, "point_coords": coords, "point_labels": labels})
    assert low_res.shape == (batch, 4, contract.LOW_RES_SIZE, contract.LOW_RES_SIZE)
    assert iou.shape == (batch, 4)
    multi_masks, multi_iou = _torch_decoder(tiny_sam, embeddings, coords, labels, multimask=True)
    single_mask, single_iou = _torch_decoder(tiny_sam, embeddings, coords, labels, multimask=False)
    np.testing.assert_allclose(low_res[:, 1:], multi_masks, atol=LOGIT_ATOL, rtol=RTOL)
    np.testing.assert_allclose(iou[:, 1:], multi_iou, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(low_res[:, :1], single_mask, atol=LOGIT_ATOL, rtol=RTOL)
    np.testing.assert_allclose(iou[:, :1], single_iou, atol=ATOL, rtol=RTOL)


def test_decoder_matches_torch_with_every_weight_live(tmp_path):
    """The rewritten graph (re-associated multi-head attention, channels-last upscaling with the
    LayerNorm2d mean folded into the weights) against torch on a SAM where no weight is zero."""
    sam = build_random_sam(seed=5)
    model_dir = export_sam(sam, tmp_path / "random", model_type="vit_tiny")
    rng = np.random.default_rng(11)
    embeddings = rng.normal(size=(1, 64, contract.EMBEDDING_SIDE, contract.EMBEDDING_SIDE)).astype(np.float32)
    coords = rng.uniform(0, 1024, size=(6, 2, 2)).astype(np.float32)
    labels = np.array([[1, 0], [1, 1], [0, 1], [1, 0], [1, 1], [1, 0]], np.float32)
    iou, low_res = _session(model_dir / contract.DECODER_FILE).run(
        None, {"image_embeddings": embeddings, "point_coords": coords, "point_labels": labels})
    multi_masks, multi_iou = _torch_decoder(sam, embeddings, coords, labels, multimask=True)
    single_mask, single_iou = _torch_decoder(sam, embeddings, coords, labels, multimask=False)
    torch_masks = np.concatenate([single_mask, multi_masks], axis=1)
    assert torch_masks.std() > 0.1 and np.abs(np.diff(torch_masks, axis=-1)).mean() > 1e-3  # not flat
    scale = float(np.abs(torch_masks).max())
    np.testing.assert_allclose(low_res, torch_masks, atol=1e-5 * scale, rtol=1e-4)
    np.testing.assert_allclose(iou, np.concatenate([single_iou, multi_iou], axis=1), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("change", ["kernel_3", "one_conv"])
def test_export_refuses_a_decoder_it_cannot_rewrite(tmp_path, change):
    sam = build_random_sam(seed=5)
    upscaling = sam.mask_decoder.output_upscaling
    if change == "kernel_3":
        upscaling[0] = torch.nn.ConvTranspose2d(64, 16, kernel_size=3, stride=2)
    else:  # one transposed convolution only (ConvT, LayerNorm2d, act)
        sam.mask_decoder.output_upscaling = torch.nn.Sequential(*list(upscaling)[:3])
    with pytest.raises(ModelError, match="upscaling is not SAM's") as err:
        export_sam(sam, tmp_path / "odd", model_type="vit_tiny")
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_manifest_describes_the_files(model_dir, tiny_sam):
    manifest = json.loads((model_dir / contract.MANIFEST_NAME).read_text())
    assert manifest["format"] == contract.MANIFEST_FORMAT
    assert (manifest["model_type"], manifest["family"], manifest["precision"]) == ("vit_tiny", "sam", "fp32")
    assert manifest["image_size"] == 1024 and manifest["low_res_size"] == 256
    assert manifest["embedding_shape"] == [1, 64, 64, 64] and manifest["num_mask_tokens"] == 4
    assert manifest["pixel_mean"] == pytest.approx(contract.PIXEL_MEAN)
    assert manifest["pixel_std"] == pytest.approx(contract.PIXEL_STD)
    assert manifest["checkpoint"] is None and manifest["licence"] == "Apache-2.0"
    assert {"torch", "onnx", "segment-anything"} <= set(manifest["tools"])
    for key, file_name in (("encoder", contract.ENCODER_FILE), ("decoder", contract.DECODER_FILE)):
        data = (model_dir / file_name).read_bytes()
        entry = manifest[key]
        assert (entry["file"], entry["bytes"], entry["external_data"]) == (file_name, len(data), None)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(
        [contract.ENCODER_FILE, contract.DECODER_FILE, contract.DECODER_HEAD_FILE, contract.DECODER_MASKS_FILE,
         contract.MANIFEST_NAME])
    for key, file_name in (("decoder_head", contract.DECODER_HEAD_FILE), ("decoder_masks", contract.DECODER_MASKS_FILE)):
        data = (model_dir / file_name).read_bytes()
        assert (manifest[key]["file"], manifest[key]["bytes"]) == (file_name, len(data))
        assert manifest[key]["sha256"] == hashlib.sha256(data).hexdigest()


def _graph_io(path: Path) -> dict[str, list]:
    graph = onnx.load(str(path)).graph
    return {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            for value in list(graph.input) + list(graph.output)}


def test_manifest_io_matches_the_graphs(model_dir):
    manifest = json.loads((model_dir / contract.MANIFEST_NAME).read_text())
    for key, file_name in (("encoder", contract.ENCODER_FILE), ("decoder", contract.DECODER_FILE)):
        graph_io = _graph_io(model_dir / file_name)
        declared = manifest[key]["inputs"] + manifest[key]["outputs"]
        assert {spec["name"]: spec["shape"] for spec in declared} == graph_io
        assert {spec["dtype"] for spec in declared} == {"float32"}
    assert [s["name"] for s in manifest["decoder"]["inputs"]] == list(contract.DECODER_INPUTS)
    assert [s["name"] for s in manifest["decoder"]["outputs"]] == list(contract.DECODER_OUTPUTS)
    for key, file_name in (("decoder_head", contract.DECODER_HEAD_FILE), ("decoder_masks", contract.DECODER_MASKS_FILE)):
        declared = manifest[key]["inputs"] + manifest[key]["outputs"]
        assert {spec["name"]: spec["shape"] for spec in declared} == _graph_io(model_dir / file_name)
    assert [s["name"] for s in manifest["decoder_head"]["outputs"]] == list(contract.DECODER_HEAD_OUTPUTS)
    assert [s["name"] for s in manifest["decoder_masks"]["inputs"]] == list(contract.DECODER_MASKS_INPUTS)


@pytest.mark.parametrize("seed", [None, 5])  # the fixture, and a SAM where no weight is zero
def test_split_decoder_gives_the_one_graph_decoders_values(tmp_path, seed):
    sam = build_tiny_sam() if seed is None else build_random_sam(seed=seed)
    model_dir = export_sam(sam, tmp_path / "m", model_type="vit_tiny")
    rng = np.random.default_rng(3)
    feeds = {"image_embeddings": rng.normal(size=(1, 64, 64, 64)).astype(np.float32),
             "point_coords": rng.uniform(0, 1024, (7, 2, 2)).astype(np.float32),
             "point_labels": np.array([[1, 0]] * 4 + [[1, 1]] * 3, np.float32)}
    iou, low_res = _session(model_dir / contract.DECODER_FILE).run(None, feeds)
    head_iou, features, hyper_in = _session(model_dir / contract.DECODER_HEAD_FILE).run(None, feeds)
    np.testing.assert_array_equal(head_iou, iou)
    masks = _session(model_dir / contract.DECODER_MASKS_FILE)
    for rows in ([6, 0, 3], [2], list(range(7))):
        (picked,) = masks.run(None, {"mask_features": features, "hyper_in": hyper_in,
                                     "prompt_rows": np.array(rows, np.int64)})
        np.testing.assert_array_equal(picked, low_res[rows])  # bit for bit


def test_fp16_export_keeps_float32_io(tmp_path, tiny_sam, embeddings):
    model_dir = export_sam(tiny_sam, tmp_path / "fp16", model_type="vit_tiny", precision="fp16")
    manifest = json.loads((model_dir / contract.MANIFEST_NAME).read_text())
    assert manifest["precision"] == "fp16" and manifest["io_dtype"] == "float32"
    coords = np.array([[[500.0, 500.0]], [[100.0, 900.0]]], np.float32)
    labels = np.ones((2, 1), np.float32)
    iou, low_res = _session(model_dir / contract.DECODER_FILE).run(
        None, {"image_embeddings": embeddings, "point_coords": coords, "point_labels": labels})
    assert low_res.dtype == np.float32 and iou.dtype == np.float32
    multi_masks, _ = _torch_decoder(tiny_sam, embeddings, coords, labels, multimask=True)
    agree = np.mean((low_res[:, 1:] > 0) == (multi_masks > 0))
    assert agree > 0.99


def test_export_replaces_an_older_export(tmp_path, tiny_sam):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    export_sam(tiny_sam, out, model_type="vit_tiny")
    assert not (out / "stale.txt").exists() and (out / contract.MANIFEST_NAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folders left


def test_large_graphs_keep_weights_in_external_data(tmp_path, tiny_sam, embeddings, monkeypatch):
    import raysam.export

    monkeypatch.setattr(raysam.export, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)  # as vit_h's 2.5 GB encoder
    model_dir = export_sam(tiny_sam, tmp_path / "big", model_type="vit_tiny")
    manifest = json.loads((model_dir / contract.MANIFEST_NAME).read_text())
    data = manifest["encoder"]["external_data"]
    assert data["file"] == "encoder.onnx.data"
    assert data["sha256"] == hashlib.sha256((model_dir / "encoder.onnx.data").read_bytes()).hexdigest()
    coords, labels = np.array([[[300.0, 700.0]]], np.float32), np.ones((1, 1), np.float32)
    iou, low_res = _session(model_dir / contract.DECODER_FILE).run(
        None, {"image_embeddings": embeddings, "point_coords": coords, "point_labels": labels})
    multi_masks, _ = _torch_decoder(tiny_sam, embeddings, coords, labels, multimask=True)
    np.testing.assert_allclose(low_res[:, 1:], multi_masks, atol=LOGIT_ATOL, rtol=RTOL)


def test_export_rejects_bad_arguments(tmp_path, tiny_sam):
    with pytest.raises(ConfigError, match="precision 'int8' is not supported: use one of fp32, fp16"):
        export_sam(tiny_sam, tmp_path / "m", model_type="vit_tiny", precision="int8")
    with pytest.raises(ConfigError, match="model_type 'vit_x' is unknown"):
        export_sam(tiny_sam, tmp_path / "m", model_type="vit_x")


# ---- downloads against a local HTTP server ---------------------------------------------------

PAYLOAD = np.random.default_rng(3).integers(0, 256, size=300_000, dtype=np.uint8).tobytes()
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at any path, honours ``Range: bytes=N-``; can drop the first response halfway."""

    drop_first = False
    requests_seen: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        range_header = self.headers.get("Range")
        type(self).requests_seen.append(range_header)
        start = int(range_header.split("=")[1].rstrip("-")) if range_header else 0
        body = PAYLOAD[start:]
        self.send_response(206 if range_header else 200)
        self.send_header("Content-Length", str(len(body)))
        if range_header:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.end_headers()
        if type(self).drop_first and len(type(self).requests_seen) == 1:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server():
    handler = type("Handler", (_RangeHandler,), {"requests_seen": [], "drop_first": False})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, handler, f"http://127.0.0.1:{httpd.server_address[1]}/weights/model.pth"
    httpd.shutdown()
    httpd.server_close()


def test_download_verifies_and_renames(server, tmp_path):
    _, handler, url = server
    path = download_checkpoint(Checkpoint(url, PAYLOAD_SHA256, len(PAYLOAD)), tmp_path)
    assert path == tmp_path / "model.pth" and path.read_bytes() == PAYLOAD
    assert not (tmp_path / "model.pth.part").exists()
    assert download_checkpoint(Checkpoint(url, PAYLOAD_SHA256), tmp_path) == path
    assert handler.requests_seen == [None]  # the verified copy is reused


def test_download_resumes_a_part_file(server, tmp_path):
    _, handler, url = server
    (tmp_path / "model.pth.part").write_bytes(PAYLOAD[:100_000])
    path = download_checkpoint(Checkpoint(url, PAYLOAD_SHA256), tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert handler.requests_seen == ["bytes=100000-"]


def test_download_resumes_after_a_dropped_connection(server, tmp_path):
    _, handler, url = server
    handler.drop_first = True
    path = download_checkpoint(Checkpoint(url, PAYLOAD_SHA256), tmp_path)
    assert path.read_bytes() == PAYLOAD
    first, second = handler.requests_seen
    resumed_from = int(second.removeprefix("bytes=").rstrip("-"))
    assert first is None and 0 < resumed_from <= len(PAYLOAD) // 2  # whole chunks kept, rest resumed


def test_download_rejects_a_wrong_checksum(server, tmp_path):
    _, _, url = server
    with pytest.raises(ModelError, match=r"^checksum mismatch for http://127\.0\.0\.1:\d+/weights/model\.pth"):
        download_checkpoint(Checkpoint(url, "0" * 64), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_download_reports_an_unreachable_url(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/sam.pth"
    with pytest.raises(ModelError, match=r"cannot download .*are you offline\?") as err:
        download_checkpoint(Checkpoint(url, PAYLOAD_SHA256), tmp_path, retries=1, timeout_s=2)
    assert "\n" not in str(err.value)

