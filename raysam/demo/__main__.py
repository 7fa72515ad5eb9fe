"""Offline chip-level demo: ``python -m raysam.demo [--out demo_out/]``.

Builds the colour-similarity demo model (NOT Segment Anything) into a cache directory if it
is missing, draws a synthetic 1024x1024 field image, runs the automatic mask generator on it
and writes ``demo_masks.png`` (mask outlines over the image). Needs no network and no GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from raysam.demo.model import build_demo_model
from raysam.demo.synthetic import FieldScene, draw_fields
from raysam.errors import ModelError, run_cli
from raysam.sam import contract

DEFAULT_MODEL_DIR = Path("demo_data/models/demo")
OUTLINE_RGB = (255, 255, 255)
RECOVERED_IOU = 0.8  # a field counts as recovered by a mask with at least this IoU


def ensure_demo_model(model_dir: Path) -> Path:
    """Build the demo model into ``model_dir`` unless its manifest is already there."""
    if not (model_dir / contract.MANIFEST_NAME).is_file():
        build_demo_model(model_dir)
    return model_dir


def outline_image(image_rgb: np.ndarray, masks: list[np.ndarray], width_px: int = 2) -> np.ndarray:
    """Copy of ``image_rgb`` with the inner outline (``width_px`` wide) of every mask drawn."""
    out = image_rgb.copy()
    for mask in masks:
        inner = mask
        for _ in range(width_px):
            inner = _erode4(inner)
        out[mask & ~inner] = OUTLINE_RGB
    return out


def _erode4(mask: np.ndarray) -> np.ndarray:
    """One step of 4-neighbour binary erosion (pixels outside the image count as set)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner


def recovered_fields(scene: FieldScene, masks: list[np.ndarray], min_iou: float = RECOVERED_IOU) -> int:
    """Number of ground-truth fields matched by some mask with IoU >= ``min_iou``."""
    areas = np.bincount(scene.field_id.ravel(), minlength=scene.n_fields + 1)
    found = set()
    for mask in masks:
        ids, counts = np.unique(scene.field_id[mask], return_counts=True)
        best = int(np.argmax(counts))
        field, inter = int(ids[best]), int(counts[best])
        if field and inter / (int(mask.sum()) + areas[field] - inter) >= min_iou:
            found.add(field)
    return len(found)


def run_demo(out_dir: Path, model_dir: Path, points_per_side: int, seed: int) -> str:
    """Run the chip-level demo and return its one-line summary."""
    from PIL import Image

    from raysam.sam import AutomaticMaskGenerator, load_model

    try:
        model = load_model(ensure_demo_model(model_dir), device="auto")
    except ModelError as err:
        raise ModelError(
            f"the demo model cache {model_dir} is unusable ({str(err).split(': re-run')[0]}): delete "
            "that directory and re-run python -m raysam.demo, which rebuilds it"
        ) from err
    scene = draw_fields(seed=seed)
    start = time.perf_counter()
    generator = AutomaticMaskGenerator(model, points_per_side=points_per_side)
    compact = generator.generate_compact(scene.image_rgb)
    seconds = time.perf_counter() - start
    masks = [compact.dense_mask(i) for i in range(len(compact))]
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "demo_masks.png"
    Image.fromarray(outline_image(scene.image_rgb, masks)).save(png)
    found = recovered_fields(scene, masks)
    return (
        f"raysam demo: {len(masks)} masks on a {scene.image_rgb.shape[1]}x{scene.image_rgb.shape[0]} "
        f"synthetic chip in {seconds:.1f} s on {model.provider}, {found}/{scene.n_fields} fields "
        f"recovered (IoU >= {RECOVERED_IOU}); colour-similarity demo model, not SAM -> {png}"
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="python -m raysam.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="demo model cache")
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic image")
    args = parser.parse_args(argv)
    return run_cli(lambda: print(run_demo(args.out, args.model_dir, args.points_per_side, args.seed)))


if __name__ == "__main__":
    sys.exit(main())
