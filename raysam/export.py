"""Export a Segment Anything model to the ONNX pair of :mod:`raysam.sam.contract`.

This is the only module that imports torch and segment_anything, and it does so lazily: the
run time only needs onnxruntime. :func:`export_sam` writes ``encoder.onnx``, ``decoder.onnx``
and ``manifest.json`` into a model directory, atomically (a temporary sibling directory that is
renamed into place). The decoder graph reproduces ``Sam.prompt_encoder`` (points only, SAM's
padding point appended, no mask input) followed by ``MaskDecoder.predict_masks``; it keeps all
four mask tokens and leaves upsampling and thresholding to the generator.

The same decoder is also written split in two (``decoder_head.onnx``: prompts -> predicted IoU,
per-prompt mask features and hypernetwork outputs; ``decoder_masks.onnx``: the chosen prompts'
mask features -> low-res masks), so that the generator can drop prompts whose candidates all
fail the predicted-IoU filter before the upscaling, which is about half of the decoder's work.

Checkpoint downloads (with resume and checksum) live in :mod:`raysam.download`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from raysam.download import sha256_file
from raysam.errors import ConfigError, ModelError
from raysam.sam import contract

PRECISIONS = ("fp32", "fp16")
LICENCE = "Apache-2.0"  # segment-anything code and the official SAM checkpoints
# Protobuf cannot hold a model over 2 GiB (vit_h's encoder is ~2.5 GB): larger graphs keep
# their weights in ``<file>.data`` next to the graph.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000


def _import_torch() -> Any:
    """Import torch, or raise a ModelError saying how to install the export extra."""
    try:
        import torch
        import segment_anything  # noqa: F401
    except ImportError as err:
        raise ModelError(
            f"exporting SAM needs torch and segment-anything ({err.name} is missing): "
            "install them with `pip install -e .[export]`"
        ) from err
    return torch


# ---- graph wrappers ------------------------------------------------------------------------


def _encoder_module(sam: Any) -> Any:
    """Wrap ``sam.image_encoder``: normalised, padded image [1,3,1024,1024] -> embeddings."""
    torch = _import_torch()

    class SamEncoderOnnx(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.image_encoder = sam.image_encoder

        def forward(self, image: Any) -> Any:
            return self.image_encoder(image)

    return SamEncoderOnnx().eval()


def _decoder_module(sam: Any) -> Any:
    """Wrap prompt encoder + mask decoder into a branch-free graph with all 4 mask tokens."""
    torch = _import_torch()
    prompt_encoder, mask_decoder = sam.prompt_encoder, sam.mask_decoder

    class SamDecoderOnnx(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.prompt_encoder = prompt_encoder
            self.mask_decoder = mask_decoder
            image_h, image_w = prompt_encoder.input_image_size
            self.register_buffer("input_size_xy", torch.tensor([float(image_w), float(image_h)]))

        def embed_points(self, coords_xy: Any, labels: Any) -> Any:
            """``PromptEncoder._embed_points(pad=True)`` written arithmetically (no masking)."""
            pad_xy = torch.zeros_like(coords_xy[:, :1, :])
            coords_xy = torch.cat([coords_xy + 0.5, pad_xy], dim=1)
            labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1).unsqueeze(-1)
            pe = self.prompt_encoder.pe_layer._pe_encoding(coords_xy / self.input_size_xy)
            embedding = pe * (labels != -1)
            embedding = embedding + self.prompt_encoder.not_a_point_embed.weight * (labels == -1)
            for label in (0, 1):  # PromptEncoder embeds point labels 0 and 1 only
                weight = self.prompt_encoder.point_embeddings[label].weight
                embedding = embedding + weight * (labels == label)
            return embedding

        def head(self, image_embeddings: Any, point_coords: Any, point_labels: Any) -> tuple[Any, Any, Any]:
            """``MaskDecoder.predict_masks`` (no-mask dense embedding) up to the upscaling.

            The image side enters the transformer at batch 1 (see :func:`_two_way_transformer`).

            Returns:
                Predicted IoU (B, T), the per-prompt image tokens after the transformer
                (B, h*w, C) and the hypernetwork outputs (B, T, C/8).
            """
            decoder = self.mask_decoder
            sparse = self.embed_points(point_coords, point_labels)
            batch = sparse.shape[0]
            output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
            tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse], dim=1)
            no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
            src = image_embeddings + no_mask
            image_pe = self.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2)
            hs, src = _two_way_transformer(decoder.transformer, src.flatten(2).transpose(1, 2),
                                           image_pe, tokens)
            if not decoder.transformer.layers:  # otherwise the image tokens are per prompt already
                src = src.expand(batch, -1, -1)
            hyper_in = torch.stack(
                [mlp(hs[:, 1 + i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
                dim=1,
            )
            return decoder.iou_prediction_head(hs[:, 0, :]), src, hyper_in

        def masks(self, src: Any, hyper_in: Any) -> Any:
            """The upscaling and hypernetwork product, channels-last (see :func:`_upscale_masks`)."""
            h, w = self.prompt_encoder.image_embedding_size
            return _upscale_masks(self.mask_decoder.output_upscaling, src, hyper_in, h, w)

        def forward(self, image_embeddings: Any, point_coords: Any, point_labels: Any) -> tuple[Any, Any]:
            iou, src, hyper_in = self.head(image_embeddings, point_coords, point_labels)
            return iou, self.masks(src, hyper_in)

    return SamDecoderOnnx().eval()


def _decoder_parts(sam: Any) -> tuple[Any, Any]:
    """The decoder of :func:`_decoder_module` as two graphs: its head, and its masks for chosen rows.

    The second gathers the rows ``prompt_rows`` of the head's per-prompt outputs and computes
    only their masks, with the same operations as the one-graph decoder.
    """
    torch = _import_torch()
    decoder = _decoder_module(sam)

    class SamDecoderHeadOnnx(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = decoder

        def forward(self, image_embeddings: Any, point_coords: Any, point_labels: Any) -> tuple[Any, Any, Any]:
            return self.decoder.head(image_embeddings, point_coords, point_labels)

    class SamDecoderMasksOnnx(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = decoder

        def forward(self, mask_features: Any, hyper_in: Any, prompt_rows: Any) -> Any:
            return self.decoder.masks(mask_features.index_select(0, prompt_rows), hyper_in.index_select(0, prompt_rows))

    return SamDecoderHeadOnnx().eval(), SamDecoderMasksOnnx().eval()


def _two_way_transformer(transformer: Any, image: Any, image_pe: Any, tokens: Any) -> tuple[Any, Any]:
    """``TwoWayTransformer.forward`` on token-major inputs, arranged for many prompts per image.

    The image tokens enter at batch 1 and broadcast against the prompts, so everything the
    first block computes from the image alone (its projections) runs once per chip, not
    once per prompt. Where image tokens are per prompt, the attentions are re-associated so
    that no projection runs over all h*w image tokens (see :func:`_attend_tokens_to_image`
    and :func:`_attend_image_to_tokens`). Same function, other summation order.

    Args:
        transformer: ``MaskDecoder.transformer``.
        image: (1, h*w, C) image embedding tokens.
        image_pe: (1, h*w, C) their positional encoding.
        tokens: (B, N, C) output and prompt tokens.

    Returns:
        The (B, N, C) processed tokens and the (B or 1, h*w, C) processed image tokens.
    """
    queries, keys = tokens, image
    for i, layer in enumerate(transformer.layers):
        shared = i == 0  # the image tokens are the same for every prompt until block 0 ends
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + tokens
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        q, k = queries + tokens, keys + image_pe
        attn = layer.cross_attn_token_to_image
        out = attn(q=q, k=k, v=keys) if shared else _attend_tokens_to_image(attn, q, keys, image_pe)
        queries = layer.norm2(queries + out)
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + tokens
        keys = layer.norm4(keys + _attend_image_to_tokens(layer.cross_attn_image_to_token, k, q, queries))
    q, attn = queries + tokens, transformer.final_attn_token_to_image
    if transformer.layers:
        out = _attend_tokens_to_image(attn, q, keys, image_pe)
    else:
        out = attn(q=q, k=keys + image_pe, v=keys)
    return transformer.norm_final_attn(queries + out), keys


def _attend_tokens_to_image(attn: Any, q: Any, image: Any, image_pe: Any) -> Any:
    """SAM's ``Attention(q=tokens, k=image + image_pe, v=image)`` without projecting the image.

    Per head, ``(q Wq_h)(k Wk_h + bk_h)^T = ((q Wq_h) Wk_h) k^T + const`` per query row (which
    softmax ignores), and since attention rows sum to one, ``attn (v Wv_h^T + bv_h) =
    (attn v) Wv_h^T + bv_h``: the C x C/r projections act on the N tokens, not on h*w pixels.
    The key's two terms are two products, so ``image + image_pe`` is never formed per prompt.
    q: (B, N, C); image: (B, h*w, C); image_pe: (1, h*w, C).
    """
    import torch

    heads, c = attn.num_heads, attn.embedding_dim
    d = attn.internal_dim // heads
    batch, n = q.shape[0], q.shape[1]
    qh = attn.q_proj(q).reshape(batch, n, heads, d).transpose(1, 2)  # (B, heads, N, d)
    qk = (qh @ attn.k_proj.weight.reshape(heads, d, c)).reshape(batch, heads * n, c)
    logits = qk @ image.transpose(1, 2) + (qk.reshape(-1, c) @ image_pe[0].T).reshape(batch, heads * n, -1)
    weights = torch.softmax(logits / math.sqrt(d), dim=-1)  # (B, heads*N, h*w)
    ctx = (weights @ image).reshape(batch, heads, n, c)
    out = ctx @ attn.v_proj.weight.reshape(heads, d, c).transpose(1, 2) + attn.v_proj.bias.reshape(heads, 1, d)
    return attn.out_proj(out.transpose(1, 2).reshape(batch, n, heads * d))


def _attend_image_to_tokens(attn: Any, q: Any, k: Any, v: Any) -> Any:
    """SAM's ``Attention(q=image, k=tokens, v=tokens)`` with the output projection folded in.

    ``concat_h(attn_h v_h) Wo^T = sum_h attn_h (v_h Wo_h^T)``: the heads are laid side by
    side along the token axis, so one product over the N*heads tokens gives the C-wide output
    and no C/r x C projection runs over the h*w pixels. q: (B or 1, h*w, C); k, v: (B, N, C).
    """
    import torch

    heads, c = attn.num_heads, attn.embedding_dim
    d = attn.internal_dim // heads
    batch, n, pixels = k.shape[0], k.shape[1], q.shape[1]
    qh = attn.q_proj(q).reshape(q.shape[0], pixels, heads, d).transpose(1, 2)  # (B|1, heads, hw, d)
    kh = attn.k_proj(k).reshape(batch, n, heads, d).transpose(1, 2)  # (B, heads, N, d)
    vh = attn.v_proj(v).reshape(batch, n, heads, d).transpose(1, 2)
    weights = torch.softmax((qh @ kh.transpose(2, 3)) / math.sqrt(d), dim=-1)  # (B, heads, hw, N)
    weights = weights.transpose(1, 2).reshape(batch, pixels, heads * n)
    vo = (vh @ attn.out_proj.weight.reshape(c, heads, d).permute(1, 2, 0)).reshape(batch, heads * n, c)
    # Each head's weights sum to one, so the output bias rides on the N*heads rows of vo.
    return weights @ (vo + attn.out_proj.bias / heads)


def _upscale_masks(upscaling: Any, src: Any, hyper_in: Any, h: int, w: int) -> Any:
    """``MaskDecoder``'s output upscaling and hypernetwork product, channels-last, as GEMMs.

    SAM computes ``hyper_in @ upscaling(src)`` channels-first: two ``ConvTranspose2d``
    (kernel 2, stride 2) with ``LayerNorm2d`` and GELUs between. Here the image tokens stay
    token-major (no transpose) and each transposed convolution is one GEMM per kernel row
    (:func:`_conv_transpose_rows`), whose output rows are image rows in order. The four
    (first row, second row) combinations are carried through to the hypernetwork product and
    interleaved once, on the T mask channels, instead of on the wider feature maps.
    ``LayerNorm2d``'s mean is folded into the first convolution's weights, leaving a
    root-mean-square norm that ONNX Runtime fuses into one kernel. Same function, other
    summation order.

    Args:
        upscaling: ``MaskDecoder.output_upscaling`` (ConvT, LayerNorm2d, act, ConvT, act).
        src: (B, h*w, C) image tokens after the transformer.
        hyper_in: (B, T, C/8) hypernetwork outputs, one row per mask token.

    Returns:
        (B, T, 4h, 4w) low-resolution mask logits.
    """
    import torch

    conv1, norm, act1, conv2, act2 = upscaling
    batch, c1, c2 = hyper_in.shape[0], conv1.out_channels, conv2.out_channels
    weight1 = conv1.weight - conv1.weight.mean(dim=1, keepdim=True)  # mean over output channels
    bias1 = conv1.bias - conv1.bias.mean()
    pieces = []  # output rows 4i + 2 * ky1 + ky2, in that order
    for x in _conv_transpose_rows(src.reshape(-1, conv1.in_channels), weight1, bias1):
        x = x.reshape(-1, c1)  # centred: LayerNorm2d is its root-mean-square norm
        x = x / (x.pow(2).mean(dim=-1, keepdim=True) + norm.eps).sqrt() * norm.weight
        # The bias is added along rows of 2w pixels: one long broadcast span (fused with the GELU).
        x = act1(x.reshape(-1, 2 * w * c1) + norm.bias.repeat(2 * w))
        for y in _conv_transpose_rows(x.reshape(-1, c1), conv2.weight, conv2.bias):
            y = act2(y).reshape(batch, h * 4 * w, c2)
            pieces.append((hyper_in @ y.transpose(1, 2)).reshape(batch, -1, h, 1, 4 * w))
    return torch.cat(pieces, dim=3).reshape(batch, -1, 4 * h, 4 * w)


def _conv_transpose_rows(x: Any, weight: Any, bias: Any) -> list[Any]:
    """``conv_transpose2d(kernel_size=2, stride=2)`` of channels-last pixels, one GEMM per
    kernel row.

    Input pixel ``(i, j)`` becomes output pixels ``(2i + ky, 2j + kx)``; the GEMM for kernel
    row ``ky`` puts its two columns ``kx`` side by side, so its output, read as pixels, is
    output row ``2i + ky`` in order.

    Args:
        x: (n*h*w, c_in) pixels in row-major order (n images of h x w).
        weight: (c_in, c_out, 2, 2) ``ConvTranspose2d`` weight; bias: (c_out,).

    Returns:
        For ky = 0 and 1: (n*h*w, 2*c_out), that is (n, h, 2w, c_out) pixels of rows 2i + ky.
    """
    c_in, c_out = weight.shape[0], weight.shape[1]
    return [x @ weight[:, :, ky, :].permute(0, 2, 1).reshape(c_in, 2 * c_out) + bias.repeat(2) for ky in (0, 1)]


# ---- ONNX export ---------------------------------------------------------------------------


def _export_graph(module: Any, args: tuple, path: Path, specs: tuple[list, list], opset: int,
                  fp16: bool) -> None:
    """Trace ``module`` (TorchScript exporter, dynamic axes) and save it to ``path`` as one graph.

    The trace goes to a scratch folder first (a model over 2 GiB comes out as one file per
    tensor); the graph's I/O shapes are set to ``specs`` (inputs, outputs; "B"/"N" dynamic),
    then it is converted to float16 if asked and saved in its final layout.
    """
    torch = _import_torch()
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
    _check_upscaling(sam.mask_decoder.output_upscaling)
    return shapes


def _check_upscaling(upscaling: Any) -> None:
    """Check that ``output_upscaling`` is SAM's (the layout :func:`_upscale_masks` rewrites)."""
    torch = _import_torch()
    layers = list(upscaling)
    plain = len(layers) == 5 and all(
        isinstance(conv, torch.nn.ConvTranspose2d) and conv.bias is not None and conv.groups == 1
        and (tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding), tuple(conv.output_padding),
             tuple(conv.dilation)) == ((2, 2), (2, 2), (0, 0), (0, 0), (1, 1))
        for conv in layers[0::3]
    )
    if not (plain and all(hasattr(layers[1], name) for name in ("weight", "bias", "eps"))):
        raise ModelError(
            "this SAM's mask decoder upscaling is not SAM's (ConvTranspose2d 2x2/2, LayerNorm2d, act, "
            "ConvTranspose2d 2x2/2, act): export a segment_anything MaskDecoder"
        )


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
    torch = _import_torch()
    encoder_args, decoder_args = _example_inputs(torch, _sam_shapes(sam))
    io, fp16 = _io_specs(_sam_shapes(sam)), precision == "fp16"
    _export_graph(_encoder_module(sam), encoder_args, tmp_dir / contract.ENCODER_FILE,
                  (io["encoder_inputs"], io["encoder_outputs"]), opset, fp16)
    _export_graph(_decoder_module(sam), decoder_args, tmp_dir / contract.DECODER_FILE,
                  (io["decoder_inputs"], io["decoder_outputs"]), opset, fp16)
    head, masks = _decoder_parts(sam)
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
