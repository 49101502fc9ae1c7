"""Fixtures of the engine tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_graphs import matmul_add_model


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    """A two-node MatMul + Add graph with a dynamic batch dim (see :func:`engine_graphs.matmul_add_model`)."""
    return matmul_add_model(tmp_path / "matmul_add.onnx")
