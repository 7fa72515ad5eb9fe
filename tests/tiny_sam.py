"""The tiny SAM fidelity fixture: a shrunk Segment Anything model and its synthetic image.

The model has SAM's architecture (``ImageEncoderViT``, ``PromptEncoder``, ``MaskDecoder`` with a
``TwoWayTransformer``) at a fraction of the width and depth, so the reference
``segment_anything.SamAutomaticMaskGenerator`` and raysam's ONNX generator can be compared on
CPU in seconds.

A randomly initialised SAM barely localises: its masks hardly depend on the prompt and collapse
to one blob after NMS, so parity on it proves little. Fitting one by training did not converge
on a 2-core CPU, so the fixture's weights are set by hand, deterministically, to make every
point prompt yield a localised, sharp mask around the point:

* the prompt encoder's random Fourier features use 16 live frequencies (the rest are zero, which
  frees channels that are constant in every positional code) drawn from N(0, 1) with a seed
  chosen for low side lobes (label-0 points, unused by the generators, carry no flag), so ``PE(x) . PE(p)`` is a Gaussian-like kernel around the point;
* the image encoder's neck returns a constant embedding, and the decoder's first self-attention,
  the token-to-image attention and the MLP pass the tokens through;
* the image-to-token attention compares each pixel's positional code with the point token's, so
  pixels near the point attend to it and receive its "point" flag in one channel; the upscaling
  layers carry that channel to the mask features, and the hypernetworks threshold it at three
  kernel levels (tokens 1-3: nested discs) with steep logits, so stability is high; the IoU head
  predicts constants above 0.88.

With 16 x 16 points and the seed's thresholds the reference keeps several hundred masks (discs
and their nested variants, cut where they meet the image border). The masks do not depend on
the image; the image (distinct-coloured Voronoi regions, some textured) is still what both
generators see, so encoder and preprocessing are exercised.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).parent / "data"
IMAGE_PATH = DATA_DIR / "tiny_sam_image.png"

MODEL_TYPE = "vit_tiny"  # raysam.sam.contract.TEST_MODEL_TYPES
IMAGE_SIDE_PX = 1024
INIT_SEED = 0
IMAGE_SEED = 7

# Architecture (SAM vit_b: embed 768, depth 12, 12 heads, prompt dim 256, decoder mlp 2048).
ENCODER_EMBED_DIM = 32
PROMPT_DIM = 64  # transformer dim; the positional code has PROMPT_DIM // 2 frequencies
LIVE_FREQS = 16  # frequencies with non-zero weights (the image-to-token attention sees all of them)
PE_SIGMA = 1.0  # std of the live frequencies: kernel half-width ~96 px at 1024
PE_SEED = 1026  # of 2,000 seeds, the one with the lowest far side lobe (0.31 of the peak)
ATTENTION_GAIN = 1.06  # point-token attention score = 2.83 * gain * kernel (a softmax against 6 tokens)
KERNEL_LEVELS = (0.65, 0.5, 0.65, 0.8)  # mask edge of token 0 (single) and tokens 1-3 (multimask)
LOGIT_SPAN = 400.0  # logit range over the image: steep edges, stability ~1 away from the border
IOU_PREDICTIONS = (0.96, 0.97, 0.95, 0.93)  # constant predicted IoU per token

_SIN_LIVE = list(range(0, LIVE_FREQS))
_COS_LIVE = list(range(PROMPT_DIM // 2, PROMPT_DIM // 2 + LIVE_FREQS))
_LIVE = _SIN_LIVE + _COS_LIVE  # positional channels that vary with position
_FREE = list(range(LIVE_FREQS, PROMPT_DIM // 2))  # sin of zero frequencies: always 0
_ONES = list(range(PROMPT_DIM // 2 + LIVE_FREQS, PROMPT_DIM))  # cos of zero frequencies: always 1
_NEAR = _FREE[14]  # the image channel that says "near the point"


def build_tiny_sam():
    """Build the tiny SAM with its hand-set weights, deterministic and in eval mode.

    Returns:
        A ``segment_anything.modeling.Sam`` on CPU, float32, eval mode.
    """
    import torch

    sam = _seeded_sam(INIT_SEED, transformer_depth=1, num_heads=1, mlp_dim=64)
    with torch.no_grad():
        _set_disc_weights(sam)
        _set_mask_thresholds(sam)
    return sam.eval()


def build_random_sam(seed: int = 0):
    """A tiny SAM with every prompt-encoder and decoder weight random (seeded), in eval mode.

    Unlike :func:`build_tiny_sam`, nothing is zero or hand-set, and its transformer has two
    blocks of two heads, so every path of the exported decoder graph carries signal. Its
    masks mean nothing; it is for graph-versus-torch parity.
    """
    import torch

    sam = _seeded_sam(seed, transformer_depth=2, num_heads=2, mlp_dim=128)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norms and biases too, away from their ones-and-zeros defaults
        for param in [*sam.prompt_encoder.parameters(), *sam.mask_decoder.parameters()]:
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return sam.eval()


def _seeded_sam(seed: int, transformer_depth: int, num_heads: int, mlp_dim: int):
    """The tiny architecture, initialised by torch from ``seed`` (the global RNG is left as it was)."""
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        side = IMAGE_SIDE_PX // 16
        return Sam(
            image_encoder=ImageEncoderViT(
                img_size=IMAGE_SIDE_PX, patch_size=16, embed_dim=ENCODER_EMBED_DIM, depth=1, num_heads=1,
                mlp_ratio=2, out_chans=PROMPT_DIM, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                use_rel_pos=True, window_size=14, global_attn_indexes=(0,),
            ),
            prompt_encoder=PromptEncoder(embed_dim=PROMPT_DIM, image_embedding_size=(side, side),
                                         input_image_size=(IMAGE_SIDE_PX, IMAGE_SIDE_PX), mask_in_chans=16),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=transformer_depth, embedding_dim=PROMPT_DIM, mlp_dim=mlp_dim,
                                              num_heads=num_heads),
                transformer_dim=PROMPT_DIM, iou_head_depth=3, iou_head_hidden_dim=32,
            ),
        )
    finally:
        torch.random.set_rng_state(generator_state)


def _flag(torch, dims: list[int], value: float = 4.0):
    v = torch.zeros(PROMPT_DIM)
    v[dims] = value
    return v


def _set_disc_weights(sam) -> None:
    """Everything but the hypernetworks' thresholds (see the module docstring)."""
    import torch

    pe, dec = sam.prompt_encoder, sam.mask_decoder
    freqs = np.zeros((2, PROMPT_DIM // 2), np.float32)
    freqs[:, :LIVE_FREQS] = np.random.default_rng(PE_SEED).normal(0, PE_SIGMA, (2, LIVE_FREQS))
    pe.pe_layer.positional_encoding_gaussian_matrix.copy_(torch.from_numpy(freqs))
    for emb in pe.point_embeddings:
        emb.weight.zero_()
    pe.point_embeddings[1].weight[0] = _flag(torch, _FREE[12:14])  # label 1 carries the point flag
    pe.not_a_point_embed.weight[0] = _flag(torch, _FREE[10:12])
    pe.no_mask_embed.weight.zero_()
    dec.iou_token.weight[0] = _flag(torch, _FREE[0:2])
    for i in range(4):
        dec.mask_tokens.weight[i] = _flag(torch, _FREE[2 + 2 * i: 4 + 2 * i])
    constant = torch.zeros(PROMPT_DIM)  # the image embedding, away from live and flag channels
    rest = _FREE[15:] + _ONES
    constant[rest] = torch.tensor([(-1.0) ** k for k in range(len(rest))])
    sam.image_encoder.neck[3].weight.zero_()
    sam.image_encoder.neck[3].bias.copy_(constant)
    block = dec.transformer.layers[0]
    eye = torch.eye(PROMPT_DIM)
    for linear, weight in ((block.self_attn.q_proj, 2 * eye), (block.self_attn.k_proj, 2 * eye),
                           (block.self_attn.v_proj, eye), (block.self_attn.out_proj, eye)):
        linear.weight.copy_(weight)
        linear.bias.zero_()
    for linear in (block.cross_attn_token_to_image.out_proj, block.mlp.lin2):
        linear.weight.zero_()
        linear.bias.zero_()
    for norm in (block.norm1, block.norm2, block.norm3, block.norm4):
        norm.weight.fill_(1.0)
        norm.bias.zero_()
    block.norm3.weight[_LIVE] = 0.0  # tokens keep their positional code only in query_pe
    attention = block.cross_attn_image_to_token
    select = torch.zeros(PROMPT_DIM // 2, PROMPT_DIM)
    select[torch.arange(PROMPT_DIM // 2), torch.tensor(_LIVE)] = 1.0
    attention.q_proj.weight.copy_(ATTENTION_GAIN * select)
    attention.k_proj.weight.copy_(select)
    for linear in (attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj):
        linear.bias.zero_()
    attention.v_proj.weight.zero_()
    attention.v_proj.weight[0, _FREE[12:14]] = 1 / math.sqrt(2)
    attention.out_proj.weight.zero_()
    attention.out_proj.weight[_NEAR, 0] = 0.15
    up = dec.output_upscaling
    up[0].weight.zero_()
    up[0].bias.zero_()
    up[0].weight[_NEAR, 0] = 0.1
    up[0].bias[1] = 1.0
    up[1].weight.fill_(1.0)
    up[1].bias.zero_()
    up[3].weight.zero_()
    up[3].bias.zero_()
    up[3].weight[0, 0] = 1.0
    up[3].bias[1] = 3.0  # a constant feature: the hypernetworks' threshold
    for mlp in dec.output_hypernetworks_mlps:
        mlp.layers[-1].weight.zero_()
        mlp.layers[-1].bias.zero_()
        mlp.layers[-1].bias[0] = 1.0
    dec.iou_prediction_head.layers[-1].weight.zero_()
    dec.iou_prediction_head.layers[-1].bias.copy_(torch.tensor(IOU_PREDICTIONS))


def _set_mask_thresholds(sam) -> None:
    """Threshold each token's mask feature where the kernel falls to its KERNEL_LEVELS value."""
    import torch

    encoder_input = torch.zeros(1, 3, IMAGE_SIDE_PX, IMAGE_SIDE_PX)
    centre = torch.tensor([[[IMAGE_SIDE_PX / 2, IMAGE_SIDE_PX / 2]]])
    sparse, dense = sam.prompt_encoder(points=(centre, torch.ones(1, 1)), boxes=None, masks=None)
    feature, _ = sam.mask_decoder(sam.image_encoder(encoder_input), sam.prompt_encoder.get_dense_pe(),
                                  sparse, dense, multimask_output=False)
    feature = feature[0, 0].numpy()  # the "near" feature itself (hypernetwork weight 1, threshold 0)
    side = feature.shape[0]
    profile = feature[side // 2, side // 2:]  # along +x from the point
    alpha = LOGIT_SPAN / float(feature.max() - feature.min())
    constant = float(torch.nn.functional.gelu(torch.tensor(3.0)))
    for mlp, level in zip(sam.mask_decoder.output_hypernetworks_mlps, KERNEL_LEVELS):
        radius = math.sqrt(-math.log(level) / 2) / (math.pi * PE_SIGMA)  # in [-1, 1] image units
        threshold = float(profile[min(round(radius * side / 2), len(profile) - 1)])
        mlp.layers[-1].bias[0] = alpha
        mlp.layers[-1].bias[1] = -alpha * threshold / constant


def load_tiny_image() -> np.ndarray:
    """Return the committed fixture image as an H x W x 3 uint8 array (1024 x 1024)."""
    from PIL import Image

    with Image.open(IMAGE_PATH) as img:
        return np.asarray(img.convert("RGB")).copy()


def export_tiny_sam(out_dir: Path) -> Path:
    """Export the tiny SAM to ONNX under ``out_dir`` (``encoder.onnx``, ``decoder.onnx``, manifest).

    Returns:
        The model directory (``out_dir``).
    """
    from raysam.export import export_sam

    return export_sam(build_tiny_sam(), out_dir, model_type=MODEL_TYPE)


# ---- the synthetic image ---------------------------------------------------------------------

N_REGIONS = 96
MIN_COLOUR_DISTANCE = 36.0  # RGB units between any two region colours
TEXTURED_FRACTION = 0.3
TEXTURE_AMPLITUDE = 10.0  # +- RGB units of the texture inside a textured region


def _region_seeds_px(rng: np.random.Generator, n: int, side_px: int) -> np.ndarray:
    """Voronoi seeds, denser in two clusters, so cells range from small to large."""
    n_cluster = n // 3
    centres = rng.uniform(0.25, 0.75, size=(2, 2)) * side_px
    cluster = centres[rng.integers(0, 2, n_cluster)] + rng.normal(0, side_px * 0.08, (n_cluster, 2))
    uniform = rng.uniform(0, side_px, size=(n - n_cluster, 2))
    return np.clip(np.concatenate([cluster, uniform]), 0, side_px - 1)


def _distinct_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` RGB colours at least ``MIN_COLOUR_DISTANCE`` apart (rejection sampling)."""
    colours = np.empty((0, 3))
    for _ in range(100 * n):
        candidate = rng.uniform(10, 245, size=3)
        if np.all(np.linalg.norm(colours - candidate, axis=1) >= MIN_COLOUR_DISTANCE):
            colours = np.vstack([colours, candidate])
            if len(colours) == n:
                return colours
    raise RuntimeError(f"cannot draw {n} colours {MIN_COLOUR_DISTANCE} apart")


def _voronoi_labels(seeds_px: np.ndarray, side_px: int) -> np.ndarray:
    """Label of the nearest seed for every pixel centre (int32, side x side)."""
    ys, xs = np.mgrid[0:side_px, 0:side_px].astype(np.float32) + 0.5
    labels = np.zeros((side_px, side_px), np.int32)
    best = np.full((side_px, side_px), np.inf, np.float32)
    for i, (sx, sy) in enumerate(seeds_px.astype(np.float32)):
        d2 = (xs - sx) ** 2 + (ys - sy) ** 2
        closer = d2 < best
        best[closer] = d2[closer]
        labels[closer] = i
    return labels


def _texture(rng: np.random.Generator, side_px: int) -> np.ndarray:
    """A stripe-and-noise pattern in [-1, 1] (side x side)."""
    ys, xs = np.mgrid[0:side_px, 0:side_px]
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6, 20)
    stripes = np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / period)
    return np.clip(0.7 * stripes + 0.3 * rng.uniform(-1, 1, (side_px, side_px)), -1, 1)


def make_tiny_image(seed: int = IMAGE_SEED, side_px: int = IMAGE_SIDE_PX) -> tuple[np.ndarray, np.ndarray]:
    """Generate the fixture image and its ground truth.

    Args:
        seed: the random seed (the committed image uses ``IMAGE_SEED``).
        side_px: the image side in pixels.

    Returns:
        ``(rgb, labels)``: ``rgb`` uint8 side x side x 3; ``labels`` int32 side x side, one id
        per region (0..N_REGIONS-1), each region one distinct colour (textured or flat).
    """
    rng = np.random.default_rng(seed)
    labels = _voronoi_labels(_region_seeds_px(rng, N_REGIONS, side_px), side_px)
    colours = _distinct_colours(rng, N_REGIONS)
    rgb = colours[labels].astype(np.float32)
    for region in np.flatnonzero(rng.uniform(size=N_REGIONS) < TEXTURED_FRACTION):
        inside = labels == region
        rgb[inside] += TEXTURE_AMPLITUDE * _texture(rng, side_px)[inside][:, None]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), labels
