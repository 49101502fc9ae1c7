"""The graph models of a Triton repository written from a real tiny build (AutoPrune, single prefill)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from engines.triton.config import check_against_onnx, parse_config
from engines.triton.repository import GraphModelsFromBuild
from prune_export.errors import BuildError
from prune_export.plan import AutoPruneSection
from prune_export.workflows.build import BuildSettings, PlanChoice, build

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is a dependency")


@pytest.fixture(scope="module")
def autoprune_build(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "ap"
    build(tiny_model, out, PlanChoice(tokens=AutoPruneSection(tokens=4)), BuildSettings(), lambda m: None)
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_graph_becomes_a_checked_onnxruntime_model(autoprune_build: Path, tmp_path: Path) -> None:
    repo = GraphModelsFromBuild(autoprune_build, tmp_path / "repo", name="vlm", instances=2)()
    models = sorted(p.name for p in repo.iterdir() if p.is_dir())
    assert models == ["vlm_decode", "vlm_embed", "vlm_prefill", "vlm_vision"]
    for model in models:
        graph = model.removeprefix("vlm_")
        cfg = parse_config((repo / model / "config.pbtxt").read_text(), model)
        assert cfg.name == model and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 0
        assert cfg.instance_group[0].count == 2
        served = repo / model / "1" / "model.onnx"
        assert _sha(served) == _sha(autoprune_build / f"{graph}.onnx")  # the build's graph, unchanged
        check_against_onnx(cfg, served, model)
    decode = parse_config((repo / "vlm_decode" / "config.pbtxt").read_text(), "decode")
    assert [list(t.dims) for t in decode.input[:4]] == [[1, 1], [1, 4, -1, 16], [1, 4, -1, 16], [1, -1]]
    versions = json.loads((repo / "versions.json").read_text())
    assert versions["build"]["target"] == "onnxruntime" and versions["onnxruntime"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial directory left


def test_bad_repository_requests_are_refused(autoprune_build: Path, tmp_path: Path) -> None:
    for bad in ("my model", ".hidden", "a/b", "x" * 129, ""):
        with pytest.raises(BuildError, match="cannot be served"):
            GraphModelsFromBuild(autoprune_build, tmp_path / "r", name=bad)
    repo = GraphModelsFromBuild(autoprune_build, tmp_path / "r")()
    with pytest.raises(BuildError, match="already exists and is not empty; pass --overwrite"):
        GraphModelsFromBuild(autoprune_build, repo)()
    assert GraphModelsFromBuild(autoprune_build, repo, overwrite=True)() == repo
    with pytest.raises(BuildError, match="not a build directory"):
        GraphModelsFromBuild(tmp_path, tmp_path / "r2")


def test_a_damaged_build_is_named_before_anything_is_written(autoprune_build: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(autoprune_build, copy)
    data = (copy / "decode.onnx").read_bytes()
    (copy / "decode.onnx").write_bytes(data[:100])
    with pytest.raises(BuildError, match="decode.onnx is truncated"):
        GraphModelsFromBuild(copy, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
