"""Shared fixtures: tiny random LLaVA models and a small synthetic data set, built once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporter.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_gqa_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporter.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("models") / "tiny_gqa", "tiny", seed=1, kv_heads=2)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporter.demo import build_demo_data

    return build_demo_data(tmp_path_factory.mktemp("data"), samples=4, seed=0)


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model: Path):
    from exporter.adapters import load_adapter

    return load_adapter(tiny_model)


@pytest.fixture()
def config_only(tiny_model: Path, tmp_path: Path) -> Path:
    """A folder holding only config.json (no weights, no tokenizer)."""
    folder = tmp_path / "config_only"
    folder.mkdir()
    shutil.copy(tiny_model / "config.json", folder / "config.json")
    return folder
