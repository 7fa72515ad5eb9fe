"""ONNX SAM model directories: manifest checks, ONNX Runtime sessions, SAM's preprocessing.

A model directory honours :mod:`raysam.sam.contract`. Its ``manifest.json`` is written by
:func:`raysam.export.export_sam` (or the demo model builder); the fields checked here are::

    {"format": "raysam-sam-onnx/1", "model_type": "vit_b",
     "pixel_mean": [123.675, 116.28, 103.53], "pixel_std": [58.395, 57.12, 57.375],
     "mask_threshold": 0.0,                                    # optional, default 0.0
     "encoder": {"file": "encoder.onnx", "bytes": 123, "sha256": "...",
                 "external_data": null | {"file": "encoder.onnx.data", "bytes": .., "sha256": ..},
                 "inputs": [{"name": "image", "dtype": "float32", "shape": [1, 3, 1024, 1024]}],
                 "outputs": [...]},
     "decoder": {...},
     "decoder_head": {...}, "decoder_masks": {...}}              # optional, both or neither

``shape`` entries are ints, or strings/``null`` for dynamic axes. Other keys (licence,
checkpoint, tool versions) are kept but not checked. When the split decoder is listed, the CPU
decoder runs it (:meth:`SamModel.decode_kept`): prompts none of whose candidates can pass the
generator's predicted-IoU filter skip the upscaling. On CUDA the one-graph decoder runs (the
split would carry every prompt's mask features through host memory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from raysam.errors import ConfigError, ModelError
from raysam.sam import contract

logger = logging.getLogger(__name__)

_HASH_CHUNK_BYTES = 1 << 20
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16",
               "tensor(int64)": "int64", "tensor(int32)": "int32"}
# name -> (dtype, rank) the contract fixes for each file.
_CONTRACT_IO: dict[str, dict[str, dict[str, tuple[str, int]]]] = {
    contract.ENCODER_FILE: {
        "inputs": {"image": ("float32", 4)},
        "outputs": {"image_embeddings": ("float32", 4)},
    },
    contract.DECODER_FILE: {
        "inputs": {"image_embeddings": ("float32", 4), "point_coords": ("float32", 3),
                   "point_labels": ("float32", 2)},
        "outputs": {"iou_predictions": ("float32", 2), "low_res_masks": ("float32", 4)},
    },
    contract.DECODER_HEAD_FILE: {
        "inputs": {"image_embeddings": ("float32", 4), "point_coords": ("float32", 3),
                   "point_labels": ("float32", 2)},
        "outputs": {"iou_predictions": ("float32", 2), "mask_features": ("float32", 3),
                    "hyper_in": ("float32", 3)},
    },
    contract.DECODER_MASKS_FILE: {
        "inputs": {"mask_features": ("float32", 3), "hyper_in": ("float32", 3), "prompt_rows": ("int64", 1)},
        "outputs": {"low_res_masks": ("float32", 4)},
    },
}
_DEVICES = ("auto", "cuda", "cpu")
# Concurrent decoder runs on the CPU at most; each holds one point batch's activations.
MAX_DECODE_WORKERS = 4
_ORT_DEFAULT_SEVERITY = 2  # onnxruntime's default logger level (warnings)
_sha_cache: dict[tuple[str, int, int], str] = {}


def _fix(model_type: str | None) -> str:
    return "re-run " + contract.EXPORT_COMMAND.format(model_type=model_type or "<model_type>")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, hashed in 1 MiB chunks and cached by (path, size, mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _sha_cache:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
        _sha_cache[key] = digest.hexdigest()
    return _sha_cache[key]


_GRAPHS = {"encoder": contract.ENCODER_FILE, "decoder": contract.DECODER_FILE}
_SPLIT_GRAPHS = {"decoder_head": contract.DECODER_HEAD_FILE, "decoder_masks": contract.DECODER_MASKS_FILE}
_ALL_GRAPHS = {**_GRAPHS, **_SPLIT_GRAPHS}


def read_manifest(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``manifest.json`` (format, model_type, normalisation, file entries)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(
            f"model directory {model_dir} does not exist: {_fix(None)} (or point model_dir at it)"
        )
    path = model_dir / contract.MANIFEST_NAME
    if not path.is_file():
        raise ModelError(f"{contract.MANIFEST_NAME} is missing from {model_dir}: {_fix(None)}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{path} is not valid JSON ({err}): {_fix(None)}") from err
    _check_manifest_fields(manifest, path)
    return manifest


def _check_manifest_fields(manifest: Any, path: Path) -> None:
    if not isinstance(manifest, dict):
        raise ModelError(f"{path} must hold a JSON object: {_fix(None)}")
    model_type = manifest.get("model_type")
    known = model_type if model_type in contract.MODEL_TYPES else None
    if manifest.get("format") != contract.MANIFEST_FORMAT:
        raise ModelError(
            f"{path} has format {manifest.get('format')!r}, expected "
            f"{contract.MANIFEST_FORMAT!r}: {_fix(known)}"
        )
    if known is None:
        raise ModelError(
            f"{path} names unknown model_type {model_type!r} (known: "
            f"{', '.join(contract.MODEL_TYPES)}): {_fix(None)}"
        )
    for key in ("pixel_mean", "pixel_std"):
        value = manifest.get(key)
        if not (isinstance(value, list) and len(value) == 3
                and all(isinstance(v, (int, float)) for v in value)):
            raise ModelError(f"{path} needs {key} as 3 numbers, got {value!r}: {_fix(model_type)}")
    split = any(graph in manifest for graph in _SPLIT_GRAPHS)
    for graph in [*_GRAPHS, *(_SPLIT_GRAPHS if split else ())]:
        name = _ALL_GRAPHS[graph]
        if not _is_file_entry(manifest.get(graph)) or manifest[graph].get("file", name) != name:
            raise ModelError(
                f"{path} lacks a '{graph}' entry for {name} with bytes and sha256: {_fix(model_type)}"
            )


def _graphs(manifest: dict[str, Any]) -> dict[str, str]:
    """The graphs a checked manifest lists: encoder and decoder, and the split decoder if there."""
    return _ALL_GRAPHS if "decoder_head" in manifest else _GRAPHS


def _is_file_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
            and isinstance(entry.get("sha256"), str))


def verify_files(model_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Check each ONNX file (and external data file) exists and matches its manifest entry."""
    model_type = manifest["model_type"]
    for graph, name in _graphs(manifest).items():
        entry = manifest[graph]
        _verify_file(Path(model_dir), name, entry, model_type)
        external = entry.get("external_data")
        if external is not None:
            if not _is_file_entry(external) or not isinstance(external.get("file"), str):
                raise ModelError(f"manifest.json {graph}.external_data is malformed: {_fix(model_type)}")
            _verify_file(Path(model_dir), external["file"], external, model_type)


def _verify_file(model_dir: Path, name: str, entry: dict[str, Any], model_type: str) -> None:
    path = model_dir / name
    if not path.is_file():
        raise ModelError(f"{name} is missing from {model_dir}: {_fix(model_type)}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ModelError(
            f"{name} is truncated or corrupt ({size} bytes, manifest says "
            f"{entry['bytes']}): {_fix(model_type)}"
        )
    if sha256_file(path) != entry["sha256"]:
        raise ModelError(
            f"{name} does not match the sha256 in manifest.json (corrupt or replaced): "
            f"{_fix(model_type)}"
        )


def onnx_signature(session: Any) -> dict[str, dict[str, tuple[str, int]]]:
    """``{"inputs"|"outputs": {name: (dtype, rank)}}`` of an ONNX Runtime session."""
    def io(args: list[Any]) -> dict[str, tuple[str, int]]:
        return {a.name: (_ORT_DTYPES.get(a.type, a.type), len(a.shape)) for a in args}

    return {"inputs": io(session.get_inputs()), "outputs": io(session.get_outputs())}


def check_signature(graph: str, session: Any, manifest: dict[str, Any]) -> None:
    """Check a session's inputs/outputs against the contract and the manifest entry."""
    name = _ALL_GRAPHS[graph]
    actual = onnx_signature(session)
    fix = _fix(manifest["model_type"])
    for kind in ("inputs", "outputs"):
        got, want = actual[kind], _CONTRACT_IO[name][kind]
        if got != want:
            raise ModelError(f"{name} {kind} are {_fmt(got)}, the contract needs {_fmt(want)}: {fix}")
        listed = manifest[graph].get(kind)
        if listed is not None and _manifest_io(listed) != got:
            raise ModelError(
                f"{name} {kind} {_fmt(got)} differ from manifest.json's "
                f"{_fmt(_manifest_io(listed))}: {fix}"
            )


def _manifest_io(listed: Any) -> dict[str, tuple[str, int]]:
    try:
        return {s["name"]: (s["dtype"], len(s["shape"])) for s in listed}
    except (TypeError, KeyError):
        return {}


def _fmt(io: dict[str, tuple[str, int]]) -> str:
    return "[" + ", ".join(f"{n}:{d}/rank{r}" for n, (d, r) in sorted(io.items())) + "]"


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as err:  # pragma: no cover - a base dependency
        raise ModelError("onnxruntime is not installed: pip install onnxruntime-gpu") from err
    return onnxruntime


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def decoder_split(threads: int) -> tuple[int, int]:
    """How a CPU decoder uses ``threads``: (concurrent runs, intra-op threads per run).

    One point batch is many small ops, which split poorly across threads: separate runs on a
    thread each keep every core busy (on 2 cores, two one-thread runs decode a chip's 256
    prompts 15-20 % faster than one two-thread run). At most :data:`MAX_DECODE_WORKERS` runs,
    to bound memory.
    """
    workers = max(1, min(threads, MAX_DECODE_WORKERS))
    return workers, max(1, threads // workers)


def _new_session(path: Path, providers: list[str], options: Any, threads: int) -> Any:
    ort = _ort()
    if options is None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only; the provider choice is logged below
        # Idle ORT threads sleep instead of spinning: the generator post-processes one batch
        # on the CPU while the next ones decode (see raysam.sam.amg.prefetched).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if "CUDAExecutionProvider" in providers:
        ort.set_default_logger_severity(4)  # a failed CUDA probe is reported by us, not by ORT
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{path.name} could not be loaded by onnxruntime ({first[:200]})") from err
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)


def _providers_for(device: str) -> list[str]:
    if device not in _DEVICES:
        raise ConfigError(f"device must be one of {', '.join(_DEVICES)}, got {device!r}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = _ort().get_available_providers()
    if "CUDAExecutionProvider" not in available:
        if device == "cuda":
            raise ConfigError(_no_cuda_message(available))
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _no_cuda_message(providers: list[str]) -> str:
    return (
        f"device='cuda' but onnxruntime cannot run on CUDA here (it got {', '.join(providers)}): "
        "use device='auto' or device='cpu', or install onnxruntime-gpu with a working CUDA driver"
    )


@dataclass
class SamModel:
    """An ONNX SAM encoder/decoder pair with SAM's exact pre-processing.

    Attributes:
        model_dir: Directory the model was loaded from.
        manifest: The parsed manifest.json.
        provider: ONNX Runtime provider the sessions run on.
        decode_workers: How many :meth:`decode` calls the generator runs at once (the
            decoder session is thread-safe): several one-thread runs on the CPU, one on CUDA.
    """

    model_dir: Path
    manifest: dict[str, Any]
    provider: str
    encoder: Any = field(repr=False)
    decoder: Any = field(repr=False)
    image_size: int = contract.IMAGE_SIZE
    decode_workers: int = 1
    decoder_head: Any = field(default=None, repr=False)
    decoder_masks: Any = field(default=None, repr=False)

    @property
    def model_type(self) -> str:
        """The manifest's model_type."""
        return self.manifest["model_type"]

    @property
    def mask_threshold(self) -> float:
        """Logit threshold of a mask (manifest ``mask_threshold``, SAM's 0.0 by default)."""
        return float(self.manifest.get("mask_threshold", contract.MASK_THRESHOLD))

    @property
    def pixel_mean(self) -> np.ndarray:
        """Normalisation mean, float32 (3,)."""
        return np.asarray(self.manifest["pixel_mean"], np.float32)

    @property
    def pixel_std(self) -> np.ndarray:
        """Normalisation std, float32 (3,)."""
        return np.asarray(self.manifest["pixel_std"], np.float32)

    def preprocess_shape(self, h: int, w: int) -> tuple[int, int]:
        """(h, w) after resizing the longest side to 1024 (ResizeLongestSide rounding)."""
        scale = self.image_size * 1.0 / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def apply_image(self, image_hwc: np.ndarray) -> np.ndarray:
        """Resize a uint8 HxWx3 image so its longest side is 1024 (PIL bilinear, as SAM)."""
        new_h, new_w = self.preprocess_shape(*image_hwc.shape[:2])
        if (new_h, new_w) == image_hwc.shape[:2]:
            return image_hwc
        resized = Image.fromarray(image_hwc).resize((new_w, new_h), Image.BILINEAR)
        return np.asarray(resized)

    def apply_coords(self, coords_xy: np.ndarray, original_hw: tuple[int, int]) -> np.ndarray:
        """Map x/y pixel coordinates of the original image into the resized 1024 frame."""
        old_h, old_w = original_hw
        new_h, new_w = self.preprocess_shape(old_h, old_w)
        coords = np.array(coords_xy, dtype=np.float64, copy=True)
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords

    def normalize_and_pad(self, resized_hwc: np.ndarray) -> np.ndarray:
        """(x - mean) / std, CHW float32, zero-padded bottom/right to [1, 3, 1024, 1024]."""
        h, w = resized_hwc.shape[:2]
        out = np.zeros((1, 3, self.image_size, self.image_size), np.float32)
        # uint8 pixels: a 256-entry table per channel holds exactly the float32 arithmetic.
        levels = np.arange(256, dtype=np.float32)
        table = (levels[None, :] - self.pixel_mean[:, None]) / self.pixel_std[:, None]
        for c in range(3):
            out[0, c, :h, :w] = table[c][resized_hwc[:, :, c]]
        return out

    def preprocess(self, image_hwc: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """Encoder input for a uint8 HxWx3 image and the resized (h, w) inside the padding."""
        resized = self.apply_image(image_hwc)
        return self.normalize_and_pad(resized), resized.shape[:2]

    def encode(self, image_chw_1024: np.ndarray) -> np.ndarray:
        """Run the encoder on a preprocessed [1, 3, 1024, 1024] (or [3, ...]) image."""
        x = np.asarray(image_chw_1024, np.float32)
        x = x[None] if x.ndim == 3 else x
        return self.encoder.run(None, {"image": x})[0]

    def decode(
        self, embeddings: np.ndarray, point_coords: np.ndarray, point_labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Decode point prompts (1024-frame x/y, [B, N, 2]) into (iou [B, 4], logits [B, 4, 256, 256])."""
        feeds = _decoder_feeds(embeddings, point_coords, point_labels)
        iou, low_res = self.decoder.run(list(contract.DECODER_OUTPUTS), feeds)
        return iou, low_res

    def decode_kept(
        self, embeddings: np.ndarray, point_coords: np.ndarray, point_labels: np.ndarray,
        keep: Callable[[np.ndarray], np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decode prompts, computing the masks only of those ``keep`` selects by predicted IoU.

        Args:
            embeddings, point_coords, point_labels: As :meth:`decode`.
            keep: Maps the (B, 4) predicted IoU to a (B,) bool array of prompts whose masks are
                needed. Without the split decoder every prompt's masks are computed anyway.

        Returns:
            iou [B, 4]; logits [K, 4, 256, 256] of the prompts ``rows`` [K] (int64, ascending),
            the same values :meth:`decode` gives for them.
        """
        if self.decoder_head is None:
            iou, low_res = self.decode(embeddings, point_coords, point_labels)
            return iou, low_res, np.arange(len(iou))
        feeds = _decoder_feeds(embeddings, point_coords, point_labels)
        iou, features, hyper_in = self.decoder_head.run(list(contract.DECODER_HEAD_OUTPUTS), feeds)
        rows = np.flatnonzero(keep(iou)).astype(np.int64)
        if not rows.size:
            side = contract.LOW_RES_SIZE
            return iou, np.zeros((0, iou.shape[1], side, side), np.float32), rows
        (low_res,) = self.decoder_masks.run(
            ["low_res_masks"], {"mask_features": features, "hyper_in": hyper_in, "prompt_rows": rows})
        return iou, low_res, rows


def _decoder_feeds(embeddings: np.ndarray, point_coords: np.ndarray, point_labels: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "image_embeddings": np.asarray(embeddings, np.float32),
        "point_coords": np.asarray(point_coords, np.float32),
        "point_labels": np.asarray(point_labels, np.float32),
    }


def load_model(
    path: str | os.PathLike,
    device: str = "auto",
    session_options: Any = None,
    intra_op_threads: int | None = None,
    split_decoder: bool = True,
) -> SamModel:
    """Load and verify an ONNX SAM model directory.

    Args:
        path: Directory with manifest.json, encoder.onnx and decoder.onnx.
        device: ``auto`` (CUDA only if a session really runs on it), ``cuda`` or ``cpu``.
        session_options: Optional ``onnxruntime.SessionOptions`` used for both sessions (then
            the decoder runs one batch at a time).
        intra_op_threads: CPU threads when no options are given (default: CPUs this process
            may use): the encoder's intra-op threads; on the CPU the decoder spreads them over
            concurrent runs (:func:`decoder_split`).
        split_decoder: On the CPU, also load the split decoder when the manifest lists it
            (:meth:`SamModel.decode_kept`); False keeps to the one-graph decoder.

    Returns:
        The loaded model.

    Raises:
        ModelError: The directory, a file, the manifest or an ONNX signature is wrong.
        ConfigError: ``device`` is unknown, or ``cuda`` was asked for and is unavailable.
    """
    model_dir = Path(path)
    providers = _providers_for(device)
    manifest = read_manifest(model_dir)
    verify_files(model_dir, manifest)
    fix = _fix(manifest["model_type"])
    threads = intra_op_threads or _default_threads()
    sessions, workers = {}, 1
    for graph, name in _graphs(manifest).items():
        if graph in _SPLIT_GRAPHS and (providers[0] != "CPUExecutionProvider" or not split_decoder):
            continue
        graph_threads = threads
        if graph != "encoder" and providers[0] == "CPUExecutionProvider" and session_options is None:
            workers, graph_threads = decoder_split(threads)
        try:
            sessions[graph] = _new_session(model_dir / name, providers, session_options, graph_threads)
        except ModelError as err:
            raise ModelError(f"{err}: {fix}") from err
        if graph == "encoder":
            providers = _settle_providers(sessions[graph], providers, device)
        check_signature(graph, sessions[graph], manifest)
    provider = providers[0]
    logger.info("SAM model %s (%s) runs on %s", model_dir, manifest["model_type"], provider)
    return SamModel(model_dir, manifest, provider, sessions["encoder"], sessions["decoder"], decode_workers=workers,
                    decoder_head=sessions.get("decoder_head"), decoder_masks=sessions.get("decoder_masks"))


def _settle_providers(session: Any, providers: list[str], device: str) -> list[str]:
    """Providers the first session really got; CUDA that fell back is an error for 'cuda'."""
    got = session.get_providers()
    if providers[0] == "CUDAExecutionProvider" and got[0] != "CUDAExecutionProvider":
        if device == "cuda":
            raise ConfigError(_no_cuda_message(got))
        return ["CPUExecutionProvider"]
    return providers
