"""prune-export check BUILD_DIR: a finished build's check run again, on the graphs as they are now."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers.cli import run
from onnx import numpy_helper

from prune_export.workflows.build import BuildSettings, build
from prune_export.workflows.selection import PlanChoice


@pytest.fixture(scope="module")
def built(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("check") / "dense"
    build(tiny_model, out, PlanChoice(), BuildSettings(provider="cpu"), lambda message: None)
    return out


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def _check(*args: object) -> tuple[int, str]:
    return run("check", *args)


def test_a_fresh_build_passes_again_and_nothing_in_it_changes(built: Path) -> None:
    before = _digests(built)
    code, output = _check(built, "--provider", "cpu", "--json")
    assert code == 0, output
    report = json.loads(output[output.index("{"):])
    manifest = json.loads((built / "manifest.json").read_text())
    assert report["status"] == "passed" and report["same_generation"] is True
    assert [o["name"] for o in report["outputs"]] == [o["name"] for o in manifest["check"]["outputs"]]
    assert all(o["max_abs_diff"] <= o["tolerance"] for o in report["outputs"] if o["name"] != "census_flops_relative")
    assert _digests(built) == before


def test_a_damaged_weight_fails_naming_the_outputs(built: Path, tmp_path: Path) -> None:
    """The LM head's weight scaled on a quarter of its rows: a clear error, not a near tie."""
    damaged = tmp_path / "damaged"
    shutil.copytree(built, damaged)
    model = onnx.load(str(damaged / "prefill.onnx"))
    weight = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(weight).copy()
    values.flat[: values.size // 4] *= 3.0
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    onnx.save(model, str(damaged / "prefill.onnx"))
    before = _digests(damaged)
    code, output = _check(damaged, "--provider", "cpu")
    assert code == 1
    assert "prefill.onnx has sha256" in output and "checking the graphs as they are now" in output
    assert "the graphs do not match the PyTorch executor" in output
    assert "  logits: max abs diff" in output and "FAILED" in output
    assert "Traceback" not in output
    assert _digests(damaged) == before


def test_a_missing_model_folder_is_one_line(built: Path, tmp_path: Path) -> None:
    code, output = _check(built, "--model", tmp_path / "absent")
    assert code == 1 and "Traceback" not in output
    assert len([line for line in output.splitlines() if line.strip()]) == 1
    assert "pass --model MODEL_DIR" in output
