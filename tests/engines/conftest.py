"""Fixtures of the engine tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import on_targets, plan_kinds
from helpers.engine_graphs import matmul_add_model


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    """A two-node MatMul + Add graph with a dynamic batch dim (see :func:`helpers.engine_graphs.matmul_add_model`)."""
    return matmul_add_model(tmp_path / "matmul_add.onnx")


@pytest.fixture(scope="session")
def triton_builds(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny builds to deploy: dense, AutoPrune (single prefill) and AutoPrune split (the TensorRT layout)."""
    from prune_core.plan import AutoPruneSection
    from prune_export.workflows.build import BuildSettings, build

    root = tmp_path_factory.mktemp("triton-builds")
    split = {"split": AutoPruneSection(tokens=4, positions="original")}
    kinds = on_targets(plan_kinds(AutoPruneSection(tokens=4), split=split), tensorrt=split)
    out = {}
    for name, (choice, target) in kinds.items():
        out[name] = root / name
        manifest = build(tiny_model, out[name], choice, BuildSettings(target=target), lambda message: None)
        assert manifest.check.status == "passed"
    return out


@pytest.fixture(scope="session")
def next_triton_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA-NeXT AutoPrune build (T = 20, so N0 = 50): any-resolution images, each packed from its own
    tiles, and the build's refusal of images that give fewer than N0 visual tokens."""
    from exporter.demo import build_demo_model
    from prune_core.plan import AutoPruneSection
    from prune_export.workflows.build import BuildSettings, build
    from prune_export.workflows.selection import PlanChoice

    model = build_demo_model(tmp_path_factory.mktemp("models") / "next-tiny", "next-tiny", seed=0)
    out = tmp_path_factory.mktemp("triton-builds") / "next"
    choice = PlanChoice(tokens=AutoPruneSection(tokens=20))
    manifest = build(model, out, choice, BuildSettings(), lambda message: None)
    assert manifest.check.status == "passed"
    return out
