"""``python -m raysam.demo``: the offline chip-level demo, run in-process into a temp dir."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from raysam.demo.__main__ import main, outline_image
from raysam.sam import contract


def test_demo_builds_model_and_writes_outlines(tmp_path: Path, capsys) -> None:
    model_dir, out_dir = tmp_path / "models" / "demo", tmp_path / "out"
    args = ["--out", str(out_dir), "--model-dir", str(model_dir), "--points-per-side", "8"]
    assert main(args) == 0
    line = capsys.readouterr().out.strip()
    count = int(re.search(r"(\d+) masks", line).group(1))
    recovered, total = map(int, re.search(r"(\d+)/(\d+) fields recovered", line).groups())
    assert 0 < recovered <= count <= total
    assert "not SAM" in line
    assert (model_dir / contract.MANIFEST_NAME).is_file()
    png = np.asarray(Image.open(out_dir / "demo_masks.png"))
    assert png.shape == (1024, 1024, 3)
    assert (png == 255).all(axis=2).sum() > 1000  # outlines drawn


def test_outline_marks_only_the_mask_border() -> None:
    image = np.zeros((20, 20, 3), np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    out = outline_image(image, [mask], width_px=1)
    drawn = (out == 255).all(axis=2)
    assert drawn.sum() == 4 * 10 - 4  # the 10x10 square's border ring
    assert not drawn[6:14, 6:14].any() and not drawn[~mask].any()


def test_broken_model_dir_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    model_dir = tmp_path / "demo"
    model_dir.mkdir()
    (model_dir / contract.MANIFEST_NAME).write_text("{not json")
    assert main(["--out", str(tmp_path / "out"), "--model-dir", str(model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "manifest.json" in err and "\n" not in err
    assert "delete that directory" in err and str(model_dir) in err
