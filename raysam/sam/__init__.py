"""Chip-level Segment Anything on ONNX Runtime: model loading and automatic mask generation.

Public API::

    from raysam.sam import load_model, AutomaticMaskGenerator, AmgParams
    model = load_model("models/vit_b", device="auto")
    masks = AutomaticMaskGenerator(model, points_per_side=16).generate_compact(chip_rgb)
"""

from raysam.sam.amg import AutomaticMaskGenerator
from raysam.sam.masks import CompactMasks, MaskData, pack_mask, paste_mask
from raysam.sam.model import SamModel, load_model
from raysam.sam.params import AmgParams

__all__ = [
    "AmgParams",
    "AutomaticMaskGenerator",
    "CompactMasks",
    "MaskData",
    "SamModel",
    "load_model",
    "pack_mask",
    "paste_mask",
]
