"""The ONNX model contract shared by exported SAM models and the demo model.

A model directory holds ``encoder.onnx``, ``decoder.onnx`` and ``manifest.json``. The
generator only relies on what is written here, so any model pair that honours it (the
official SAM checkpoints exported by :mod:`raysam.export`, a tiny random SAM in tests, or
the colour-similarity demo model in :mod:`raysam.demo.model`) is interchangeable.

Encoder
    input  ``image``            float32 [1, 3, 1024, 1024]: the image resized so its longest
                                side is 1024 (PIL bilinear, as SAM's ``ResizeLongestSide``),
                                normalised with ``pixel_mean``/``pixel_std`` from the manifest,
                                then zero-padded at the bottom and right (as ``Sam.preprocess``).
    output ``image_embeddings`` float32 [1, C, 64, 64].

Decoder (all mask tokens kept, no upsampling inside the graph)
    inputs ``image_embeddings`` float32 [1, C, 64, 64]
           ``point_coords``     float32 [B, N, 2], x/y in the resized 1024 frame
           ``point_labels``     float32 [B, N], 1 foreground, 0 background
                                (the graph appends SAM's padding point itself, as
                                ``PromptEncoder`` does when no box is given)
    outputs ``iou_predictions`` float32 [B, 4]
            ``low_res_masks``   float32 [B, 4, 256, 256] mask logits; token 0 is SAM's
                                single-mask output, tokens 1..3 its three multimask candidates.

Optional: the same decoder split in two (written by :mod:`raysam.export`, listed in the manifest
as ``decoder_head`` and ``decoder_masks``), so prompts can be dropped before the upscaling:
    ``decoder_head.onnx``  inputs as the decoder; outputs ``iou_predictions`` [B, 4],
                           ``mask_features`` float32 [B, h*w, C] (image tokens after the
                           transformer, per prompt) and ``hyper_in`` float32 [B, 4, C/8]
    ``decoder_masks.onnx`` inputs ``mask_features``, ``hyper_in`` and ``prompt_rows`` int64 [K];
                           output ``low_res_masks`` [K, 4, 256, 256] of those rows, the same
                           values as the one-graph decoder's.
"""

MANIFEST_FORMAT = "raysam-sam-onnx/1"
MANIFEST_NAME = "manifest.json"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
DECODER_HEAD_FILE = "decoder_head.onnx"
DECODER_MASKS_FILE = "decoder_masks.onnx"

IMAGE_SIZE = 1024  # SAM's image encoder input side (segment_anything.modeling.ImageEncoderViT img_size)
EMBEDDING_SIDE = 64  # IMAGE_SIZE / patch size 16
LOW_RES_SIZE = 256  # mask decoder output side (4x the embedding side)
NUM_MASK_TOKENS = 4  # SAM's MaskDecoder: num_multimask_outputs (3) + 1
MASK_THRESHOLD = 0.0  # Sam.mask_threshold

# segment_anything.modeling.Sam defaults (ImageNet statistics in 0..255).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

ENCODER_INPUTS = ("image",)
ENCODER_OUTPUTS = ("image_embeddings",)
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels")
DECODER_OUTPUTS = ("iou_predictions", "low_res_masks")
DECODER_HEAD_OUTPUTS = ("iou_predictions", "mask_features", "hyper_in")
DECODER_MASKS_INPUTS = ("mask_features", "hyper_in", "prompt_rows")

# Official SAM checkpoints (segment-anything README) and the tiny architecture used in tests.
SAM_MODEL_TYPES = ("vit_b", "vit_l", "vit_h")
TEST_MODEL_TYPES = ("vit_tiny",)
DEMO_MODEL_TYPE = "demo"
MODEL_TYPES = SAM_MODEL_TYPES + TEST_MODEL_TYPES + (DEMO_MODEL_TYPE,)

EXPORT_COMMAND = "python scripts/export_sam_models.py --models {model_type} --out models/"
