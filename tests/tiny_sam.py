"""The tiny SAM fidelity fixture: a shrunk Segment Anything model and its synthetic image.

The model has SAM's architecture (``ImageEncoderViT``, ``PromptEncoder``, ``MaskDecoder`` with a
``TwoWayTransformer``) at a fraction of the width and depth, so the reference
``segment_anything.SamAutomaticMaskGenerator`` and raysam's ONNX generator can be compared on
CPU in seconds. It is a seeded random initialisation: fitted weights (``tests/data/tiny_sam.pt``,
loaded when present) that make a point prompt on ``tests/data/tiny_sam_image.png`` yield the
region under it are still to come, so today its masks hardly depend on the prompt.

The image is a field-like partition of 1024x1024 pixels into polygons (Voronoi cells of a
non-uniform seed set), each a distinct colour, some textured; :func:`make_tiny_image` returns
it with its label map (the ground truth).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).parent / "data"
WEIGHTS_PATH = DATA_DIR / "tiny_sam.pt"
IMAGE_PATH = DATA_DIR / "tiny_sam_image.png"

MODEL_TYPE = "vit_tiny"  # raysam.sam.contract.TEST_MODEL_TYPES
IMAGE_SIDE_PX = 1024
INIT_SEED = 0
IMAGE_SEED = 7

# Architecture (SAM vit_b: embed 768, depth 12, 12 heads, prompt dim 256, decoder mlp 2048).
ENCODER_EMBED_DIM = 64
ENCODER_DEPTH = 2
ENCODER_HEADS = 2
ENCODER_GLOBAL_ATTN = (1,)
WINDOW_SIZE = 14
PROMPT_DIM = 64  # encoder out_chans = transformer dim; the upscaled mask features get PROMPT_DIM // 8
DECODER_DEPTH = 2
DECODER_HEADS = 2
DECODER_MLP_DIM = 128
IOU_HEAD_HIDDEN = 64
# Scale of the random Fourier features of the prompt encoder (SAM uses 1.0); sharper
# positional codes let so small a decoder localise a point prompt.
PE_SCALE = 4.0


def build_tiny_sam(weights: Path | None = WEIGHTS_PATH):
    """Build the tiny SAM, deterministic and in eval mode.

    Args:
        weights: a fitted state_dict, loaded when the file exists; otherwise the seeded
            random initialisation is kept.

    Returns:
        A ``segment_anything.modeling.Sam`` on CPU, float32, eval mode.
    """
    import torch
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )
    from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(INIT_SEED)
    try:
        embedding_side = IMAGE_SIDE_PX // 16
        prompt_encoder = PromptEncoder(
            embed_dim=PROMPT_DIM,
            image_embedding_size=(embedding_side, embedding_side),
            input_image_size=(IMAGE_SIDE_PX, IMAGE_SIDE_PX),
            mask_in_chans=16,
        )
        prompt_encoder.pe_layer = PositionEmbeddingRandom(PROMPT_DIM // 2, scale=PE_SCALE)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=IMAGE_SIDE_PX,
                patch_size=16,
                embed_dim=ENCODER_EMBED_DIM,
                depth=ENCODER_DEPTH,
                num_heads=ENCODER_HEADS,
                mlp_ratio=4,
                out_chans=PROMPT_DIM,
                qkv_bias=True,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                use_rel_pos=True,
                window_size=WINDOW_SIZE,
                global_attn_indexes=ENCODER_GLOBAL_ATTN,
            ),
            prompt_encoder=prompt_encoder,
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(
                    depth=DECODER_DEPTH,
                    embedding_dim=PROMPT_DIM,
                    mlp_dim=DECODER_MLP_DIM,
                    num_heads=DECODER_HEADS,
                ),
                transformer_dim=PROMPT_DIM,
                iou_head_depth=3,
                iou_head_hidden_dim=IOU_HEAD_HIDDEN,
            ),
        )
    finally:
        torch.random.set_rng_state(generator_state)
    if weights is not None and Path(weights).exists():
        state = torch.load(weights, map_location="cpu", weights_only=True)
        sam.load_state_dict({k: v.float() for k, v in state.items()})
    return sam.eval()


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
