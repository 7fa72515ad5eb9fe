"""Export a Segment Anything model to the ONNX pair of :mod:`raysam.sam.contract`.

Owns the export flow: checking that a Sam fits the contract, tracing the graphs, saving them
(float16 on request, external data over the protobuf limit) and describing them in
``manifest.json``. :func:`export_sam` writes ``encoder.onnx``, ``decoder.onnx`` and
``manifest.json`` into a model directory, atomically (a temporary sibling directory that is
renamed into place). The decoder graph reproduces ``Sam.prompt_encoder`` (points only, SAM's
padding point appended, no mask input) followed by ``MaskDecoder.predict_masks``; it keeps all
four mask tokens and leaves upsampling and thresholding to the generator. The torch modules
traced into the graphs live in :mod:`raysam.export_modules`. These two are the only modules
that import torch and segment_anything, and they do so lazily: the run time only needs
onnxruntime.

The same decoder is also written split in two (``decoder_head.onnx``: prompts -> predicted IoU,
per-prompt mask features and hypernetwork outputs; ``decoder_masks.onnx``: the chosen prompts'
mask features -> low-res masks), so that the generator can drop prompts whose candidates all
fail the predicted-IoU filter before the upscaling, which is about half of the decoder's work.

Checkpoint downloads (with resume and checksum) live in :mod:`raysam.download`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from raysam.download import sha256_file
from raysam.errors import ConfigError, ModelError
from raysam.export_modules import check_upscaling, decoder_module, decoder_parts, encoder_module, import_torch
from raysam.sam import contract

PRECISIONS = ("fp32", "fp16")
LICENCE = "Apache-2.0"  # segment-anything code and the official SAM checkpoints
# Protobuf cannot hold a model over 2 GiB (vit_h's encoder is ~2.5 GB): larger graphs keep
# their weights in ``<file>.data`` next to the graph.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000


# ---- ONNX export ---------------------------------------------------------------------------


def _export_graph(module: Any, args: tuple, path: Path, specs: tuple[list, list], opset: int,
                  fp16: bool) -> None:
    """Trace ``module`` (TorchScript exporter, dynamic axes) and save it to ``path`` as one graph.

    The trace goes to a scratch folder first (a model over 2 GiB comes out as one file per
    tensor); the graph's I/O shapes are set to ``specs`` (inputs, outputs; "B"/"N" dynamic),
    then it is converted to float16 if asked and saved in its final layout.
    """
    torch = import_torch()
    import warnings

    import onnx

    scratch = path.parent / f"_trace_{path.stem}"
    scratch.mkdir()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic
        torch.onnx.export(
            module, args, str(scratch / path.name),
            input_names=[s["name"] for s in specs[0]], output_names=[s["name"] for s in specs[1]],
            dynamic_axes=_dynamic_axes(specs),
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    model = onnx.load(str(scratch / path.name))  # with any external data
    shutil.rmtree(scratch)
    _declare_io(model, specs)
    if fp16:
        model = _to_fp16(model)
    _save_graph(model, path)


def _dynamic_axes(specs: tuple[list, list]) -> dict[str, dict[int, str]]:
    """``torch.onnx.export`` dynamic axes from I/O specs whose shapes name dynamic dims."""
    axes = {}
    for spec in specs[0] + specs[1]:
        named = {i: dim for i, dim in enumerate(spec["shape"]) if isinstance(dim, str)}
        if named:
            axes[spec["name"]] = named
    return axes


def _declare_io(model: Any, specs: tuple[list, list]) -> None:
    """Write the declared shapes onto the graph's inputs and outputs (fixed or named dims)."""
    by_name = {spec["name"]: spec["shape"] for spec in specs[0] + specs[1]}
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for dim, declared in zip(dims, by_name[value.name], strict=True):
            if isinstance(declared, str):
                dim.dim_param = declared
            else:
                dim.dim_value = declared


def _save_graph(model: Any, path: Path) -> None:
    """Save a graph inline, or with its weights in ``<file>.data`` when over the protobuf limit."""
    import onnx

    if sum(t.ByteSize() for t in model.graph.initializer) < EXTERNAL_DATA_THRESHOLD_BYTES:
        onnx.save_model(model, str(path))
        return
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def _to_fp16(model: Any) -> Any:
    """Float16 weights and compute, float32 inputs and outputs (casts at the graph edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True)


def _sam_shapes(sam: Any) -> dict[str, int]:
    """Read the image size, embedding shape, token count and decoder widths off a Sam module."""
    embedding_h, embedding_w = sam.prompt_encoder.image_embedding_size
    return {
        "image_size": int(sam.image_encoder.img_size),
        "embedding_dim": int(sam.prompt_encoder.embed_dim),
        "embedding_side": int(embedding_h),
        "low_res_size": 4 * int(embedding_h),
        "num_mask_tokens": int(sam.mask_decoder.num_mask_tokens),
        "embedding_w": int(embedding_w),
        "transformer_dim": int(sam.mask_decoder.transformer_dim),
        "hyper_dim": int(sam.mask_decoder.output_hypernetworks_mlps[0].layers[-1].out_features),
    }


def _check_sam(sam: Any) -> dict[str, int]:
    """Check that ``sam`` fits the contract (1024 input, 64x64 embeddings, 4 mask tokens)."""
    shapes = _sam_shapes(sam)
    expected = (contract.IMAGE_SIZE, contract.EMBEDDING_SIDE, contract.EMBEDDING_SIDE, contract.NUM_MASK_TOKENS)
    got = (shapes["image_size"], shapes["embedding_side"], shapes["embedding_w"], shapes["num_mask_tokens"])
    if got != expected:
        raise ModelError(
            f"this SAM does not fit the raysam ONNX contract (image size, embedding h/w, mask tokens = "
            f"{got}, expected {expected}): export a 1024-input SAM with 3 multimask outputs"
        )
    check_upscaling(sam.mask_decoder.output_upscaling)
    return shapes


def _example_inputs(torch: Any, shapes: dict[str, int]) -> tuple[tuple, tuple]:
    """Deterministic example inputs for tracing the encoder and the decoder."""
    side, dim, emb = shapes["image_size"], shapes["embedding_dim"], shapes["embedding_side"]
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, side, side, generator=gen)
    embeddings = torch.randn(1, dim, emb, emb, generator=gen)
    coords = torch.rand(2, 3, 2, generator=gen) * side
    labels = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    return (image,), (embeddings, coords, labels)


def _file_entry(path: Path, inputs: list[dict], outputs: list[dict]) -> dict[str, Any]:
    """Manifest entry of one graph: file name, size, sha256, I/O, external data if any."""
    data_path = path.with_name(path.name + ".data")
    entry: dict[str, Any] = {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    entry["external_data"] = (
        {"file": data_path.name, "bytes": data_path.stat().st_size, "sha256": sha256_file(data_path)}
        if data_path.exists() else None
    )
    entry["inputs"], entry["outputs"] = inputs, outputs
    return entry


def _io_specs(shapes: dict[str, int]) -> dict[str, list[dict]]:
    """Names, shapes ("B"/"N"/"K" dynamic) and dtypes of the graphs' inputs and outputs."""
    side, dim, emb, low, tokens = (shapes[k] for k in ("image_size", "embedding_dim", "embedding_side", "low_res_size", "num_mask_tokens"))

    def spec(name: str, shape: list, dtype: str = "float32") -> dict:
        return {"name": name, "shape": shape, "dtype": dtype}

    features = [spec("mask_features", ["B", emb * emb, shapes["transformer_dim"]]),
                spec("hyper_in", ["B", tokens, shapes["hyper_dim"]])]

    return {
        "encoder_inputs": [spec("image", [1, 3, side, side])],
        "encoder_outputs": [spec("image_embeddings", [1, dim, emb, emb])],
        "decoder_inputs": [
            spec("image_embeddings", [1, dim, emb, emb]),
            spec("point_coords", ["B", "N", 2]),
            spec("point_labels", ["B", "N"]),
        ],
        "decoder_outputs": [
            spec("iou_predictions", ["B", tokens]),
            spec("low_res_masks", ["B", tokens, low, low]),
        ],
        "decoder_head_outputs": [spec("iou_predictions", ["B", tokens]), *features],
        "decoder_masks_inputs": [*features, spec("prompt_rows", ["K"], "int64")],
        "decoder_masks_outputs": [spec("low_res_masks", ["K", tokens, low, low])],
    }


def _tool_versions() -> dict[str, str]:
    """Versions of the packages that produced the graphs."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "onnx", "onnxruntime-gpu", "onnxruntime", "segment-anything"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def build_manifest(sam: Any, model_dir: Path, model_type: str, precision: str,
                   checkpoint: dict[str, str] | None, opset: int) -> dict[str, Any]:
    """Describe an exported model directory (see :func:`export_sam`)."""
    shapes = _sam_shapes(sam)
    io = _io_specs(shapes)
    return {
        "format": contract.MANIFEST_FORMAT,
        "model_type": model_type,
        "family": "sam",
        "image_size": shapes["image_size"],
        "embedding_shape": [1, shapes["embedding_dim"], shapes["embedding_side"], shapes["embedding_side"]],
        "low_res_size": shapes["low_res_size"],
        "num_mask_tokens": shapes["num_mask_tokens"],
        "mask_threshold": float(sam.mask_threshold),
        "pixel_mean": [float(v) for v in sam.pixel_mean.flatten()],
        "pixel_std": [float(v) for v in sam.pixel_std.flatten()],
        "encoder": _file_entry(model_dir / contract.ENCODER_FILE, io["encoder_inputs"], io["encoder_outputs"]),
        "decoder": _file_entry(model_dir / contract.DECODER_FILE, io["decoder_inputs"], io["decoder_outputs"]),
        "decoder_head": _file_entry(model_dir / contract.DECODER_HEAD_FILE, io["decoder_inputs"],
                                    io["decoder_head_outputs"]),
        "decoder_masks": _file_entry(model_dir / contract.DECODER_MASKS_FILE, io["decoder_masks_inputs"],
                                     io["decoder_masks_outputs"]),
        "opset": opset,
        "precision": precision,
        "io_dtype": "float32",
        "checkpoint": checkpoint,
        "licence": LICENCE,
        "tools": _tool_versions(),
    }


def _write_graphs(sam: Any, tmp_dir: Path, precision: str, opset: int) -> None:
    """Export the graphs of ``sam`` into ``tmp_dir`` (float32, then float16 if asked)."""
    torch = import_torch()
    encoder_args, decoder_args = _example_inputs(torch, _sam_shapes(sam))
    io, fp16 = _io_specs(_sam_shapes(sam)), precision == "fp16"
    _export_graph(encoder_module(sam), encoder_args, tmp_dir / contract.ENCODER_FILE,
                  (io["encoder_inputs"], io["encoder_outputs"]), opset, fp16)
    _export_graph(decoder_module(sam), decoder_args, tmp_dir / contract.DECODER_FILE,
                  (io["decoder_inputs"], io["decoder_outputs"]), opset, fp16)
    head, masks = decoder_parts(sam)
    _export_graph(head, decoder_args, tmp_dir / contract.DECODER_HEAD_FILE,
                  (io["decoder_inputs"], io["decoder_head_outputs"]), opset, fp16)
    with torch.no_grad():
        _, features, hyper_in = head(*decoder_args)
    rows = torch.tensor([1, 0], dtype=torch.int64)  # the example batch's two prompts, reordered
    _export_graph(masks, (features, hyper_in, rows), tmp_dir / contract.DECODER_MASKS_FILE,
                  (io["decoder_masks_inputs"], io["decoder_masks_outputs"]), opset, fp16)


def _replace_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Move ``tmp_dir`` to ``out_dir``, replacing an older export there."""
    old_dir = None
    if out_dir.exists():
        old_dir = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old_dir)
    os.replace(tmp_dir, out_dir)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


def export_sam(sam: Any, out_dir: str | Path, model_type: str = "vit_b", precision: str = "fp32",
               checkpoint: dict[str, str] | None = None, opset: int = 17) -> Path:
    """Export a ``segment_anything.modeling.Sam`` to an ONNX model directory.

    Args:
        sam: any Sam module (vit_b/l/h or a tiny one) with a 1024 input and 3 multimask outputs.
        out_dir: the model directory to write (created; an older export there is replaced).
        model_type: the name recorded in the manifest (one of ``contract.MODEL_TYPES``).
        precision: ``"fp32"``, or ``"fp16"`` for float16 weights and compute (GPU); the graphs'
            inputs and outputs stay float32 either way.
        checkpoint: ``{"url": ..., "sha256": ...}`` of the weights, recorded in the manifest.
        opset: the ONNX opset.

    Returns:
        ``out_dir`` as a Path, holding ``encoder.onnx``, ``decoder.onnx`` (also split in
        ``decoder_head.onnx`` and ``decoder_masks.onnx``) and ``manifest.json``.

    Raises:
        ConfigError: unknown precision or model type.
        ModelError: torch/segment-anything missing, or a Sam that does not fit the contract.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not supported: use one of {', '.join(PRECISIONS)}")
    if model_type not in contract.MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is unknown: use one of {', '.join(contract.MODEL_TYPES)}")
    _check_sam(sam)
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        sam = sam.float().eval()
        _write_graphs(sam, tmp_dir, precision, opset)
        manifest = build_manifest(sam, tmp_dir, model_type, precision, checkpoint, opset)
        (tmp_dir / contract.MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir
