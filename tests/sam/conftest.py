"""Fixtures of the SAM tests: the tiny SAM exported to ONNX once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_sam import build_tiny_sam, export_tiny_sam, load_tiny_image


@pytest.fixture(scope="session")
def tiny_sam():
    """The tiny torch SAM (reference side)."""
    pytest.importorskip("torch")
    return build_tiny_sam()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SAM exported by raysam.export (encoder.onnx, decoder.onnx, manifest.json)."""
    pytest.importorskip("torch")
    return export_tiny_sam(tmp_path_factory.mktemp("tiny_sam") / "vit_tiny")


@pytest.fixture(scope="session")
def tiny_image():
    """The 1024x1024 fixture image (uint8 RGB)."""
    return load_tiny_image()
