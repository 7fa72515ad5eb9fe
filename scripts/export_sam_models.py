"""Download official SAM checkpoints and export them to raysam's ONNX model directories.

    python scripts/export_sam_models.py --models vit_b [vit_l vit_h] --out models/ \
        [--precision fp16] [--checkpoint-dir ~/.cache/raysam]

Each model goes to ``<out>/<model_type>/`` (``<out>/<model_type>_fp16/`` for fp16) with
``encoder.onnx``, ``decoder.onnx`` and ``manifest.json`` (see ``raysam.sam.contract``).
Downloads resume from a ``.part`` file and are checked against their sha256.
Needs the export extra: ``pip install -e .[export]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from raysam.download import SAM_CHECKPOINTS, download_checkpoint
from raysam.errors import run_cli
from raysam.sam.contract import SAM_MODEL_TYPES


def model_dir_name(model_type: str, precision: str) -> str:
    """``vit_b`` for fp32, ``vit_b_fp16`` for fp16."""
    return model_type if precision == "fp32" else f"{model_type}_{precision}"


def export_one(model_type: str, out: Path, precision: str, checkpoint_dir: Path, opset: int) -> Path:
    """Download (or reuse) one checkpoint, build the Sam module and export it."""
    from segment_anything import sam_model_registry

    from raysam.export import export_sam

    checkpoint = SAM_CHECKPOINTS[model_type]
    weights = download_checkpoint(checkpoint, checkpoint_dir)
    sam = sam_model_registry[model_type](checkpoint=str(weights))
    return export_sam(sam, out / model_dir_name(model_type, precision), model_type=model_type,
                      precision=precision, checkpoint={"url": checkpoint.url, "sha256": checkpoint.sha256},
                      opset=opset)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_b"], choices=SAM_MODEL_TYPES)
    parser.add_argument("--out", type=Path, default=Path("models"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("~/.cache/raysam").expanduser())
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args(argv)

    def export_all() -> None:
        for model_type in args.models:
            t0 = time.perf_counter()
            model_dir = export_one(model_type, args.out, args.precision, args.checkpoint_dir, args.opset)
            print(f"{model_type}: exported to {model_dir} in {time.perf_counter() - t0:.0f} s")

    return run_cli(export_all)


if __name__ == "__main__":
    sys.exit(main())
