"""The torch modules that :mod:`raysam.export` traces into SAM's ONNX graphs.

Owns what goes into each graph: the image-encoder wrapper, and the decoder rewritten as a
branch-free graph (``Sam.prompt_encoder`` for points only, with SAM's padding point appended,
then ``MaskDecoder.predict_masks`` keeping all four mask tokens), whole or split into its head
and its masks for chosen prompts. The rewrites compute SAM's function in another summation
order: the image side of the two-way transformer runs once per chip, the attentions are
re-associated so that no projection runs over all image tokens, and the output upscaling is
a few GEMMs, channels-last (:func:`check_upscaling` checks that a decoder has the layout they
assume). Tracing, saving and describing the graphs stay in :mod:`raysam.export`. torch and
segment_anything are imported lazily (:func:`import_torch`); the run time never imports
this module.
"""

from __future__ import annotations

import math
from typing import Any

from raysam.errors import ModelError


def import_torch() -> Any:
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


def encoder_module(sam: Any) -> Any:
    """Wrap ``sam.image_encoder``: normalised, padded image [1,3,1024,1024] -> embeddings."""
    torch = import_torch()

    class SamEncoderOnnx(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.image_encoder = sam.image_encoder

        def forward(self, image: Any) -> Any:
            return self.image_encoder(image)

    return SamEncoderOnnx().eval()


def decoder_module(sam: Any) -> Any:
    """Wrap prompt encoder + mask decoder into a branch-free graph with all 4 mask tokens."""
    torch = import_torch()
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


def decoder_parts(sam: Any) -> tuple[Any, Any]:
    """The decoder of :func:`decoder_module` as two graphs: its head, and its masks for chosen rows.

    The second gathers the rows ``prompt_rows`` of the head's per-prompt outputs and computes
    only their masks, with the same operations as the one-graph decoder.
    """
    torch = import_torch()
    decoder = decoder_module(sam)

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


def check_upscaling(upscaling: Any) -> None:
    """Check that ``output_upscaling`` is SAM's (the layout :func:`_upscale_masks` rewrites)."""
    torch = import_torch()
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
