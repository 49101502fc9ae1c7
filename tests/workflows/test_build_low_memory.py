"""``build --dtype fp16 --low-memory``: exported from the model in fp16 (no fp32 copy), checked, and
computing what the default fp16 build (fp32 export, then cast) computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from engines.prefill import PrefillRunner
from prune_core.plan import AutoPruneSection
from prune_export.cli import main
from prune_export.workflows.build import BuildSettings, build
from prune_export.workflows.open_build import load_check_inputs
from prune_export.workflows.selection import PlanChoice


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "autoprune"])
def test_low_memory_fp16_build_matches_the_cast_build(tiny_model: Path, tmp_path: Path, kind: str) -> None:
    choice = PlanChoice(tokens=AutoPruneSection(tokens=4)) if kind == "autoprune" else PlanChoice()
    low = build(tiny_model, tmp_path / "low", choice, BuildSettings(dtype="fp16", low_memory=True), lambda m: None)
    cast = build(tiny_model, tmp_path / "cast", choice, BuildSettings(dtype="fp16"), lambda m: None)
    assert cast.check.status == "passed"
    assert low.check.status == "passed" and low.check.same_next_token and low.dtype == "fp16"
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    weights = [t for t in onnx.load(str(tmp_path / "low" / "prefill.onnx")).graph.initializer
               if len(t.dims) == 2 and t.data_type in floats]  # fmt: skip
    assert weights and {t.data_type for t in weights} == {onnx.TensorProto.FLOAT16}  # matrices exported in fp16
    feeds = load_check_inputs(tmp_path / "cast")
    outs = {}
    for name in ("low", "cast"):
        runner = PrefillRunner(tmp_path / name, provider="cpu")
        meta = runner.input_metadata()
        outs[name] = runner.infer({k: feeds[k].astype(meta[k][0]) for k in meta})
    a, b = outs["low"]["logits"].astype(np.float64), outs["cast"]["logits"].astype(np.float64)
    assert np.abs(a - b).max() <= 0.02 * np.abs(b).max()  # two fp16 roundings of one fp32 model
    assert int(a.argmax()) == int(b.argmax())
    for layer in range(4):
        assert outs["low"][f"present.{layer}.key"].shape == outs["cast"][f"present.{layer}.key"].shape


def test_low_memory_needs_a_half_precision(tiny_model: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["build", str(tiny_model), "--out", str(tmp_path / "b"), "--low-memory"])
    assert result.exit_code == 1 and "--low-memory exports the model in the precision it is built in" in result.output
    assert not (tmp_path / "b").exists()
