"""``build --quantize``: int8 Q/DQ builds of every plan kind on the tiny model pass their check (the fp32
executor's greedy answers, relative errors reported), record their quantization, lint for TensorRT, and
answer through ``run`` and ``eval``; bad option combinations get one line."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from helpers import tiny_plan_kinds
from helpers.cli import assert_clean_error, run

from graph_passes.quantize import weight_matmuls, weight_matmuls_after
from prune_core.manifest import Manifest
from prune_core.ops import Group, Module, Operation
from prune_export.workflows.build import BuildSettings, build

COMBINED_OPS = frozenset(
    [Operation(2, g, Module.MLP) for g in (Group.IMG_KEY, Group.IMG_REST)]
    + [Operation(3, g, Module.Q) for g in (Group.IMG_KEY, Group.IMG_REST)]
)
#: dense, gsop, fixed, autoprune: the plans the fp16 builds are checked with (test_build_precision.py), and
#: "combined": GSOP ops on both image groups (the group rule), which token selection after them does not break
KINDS = tiny_plan_kinds(combined=COMBINED_OPS)
# dense int8 is covered by the CLI test below; "combined" holds AutoPrune single
CASES = [
    ("int8", "onnxruntime", "gsop"),
    ("int8", "onnxruntime", "fixed"),
    ("int8", "onnxruntime", "combined"),
    ("int8", "tensorrt", "autoprune"),  # split prefill: head and tail calibrated and quantized, then linted
    ("int8-weights", "onnxruntime", "combined"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "target", "kind"), CASES, ids=["-".join(c) for c in CASES])
def test_quantized_build_passes_its_check(tiny_model: Path, demo_data: Path, tmp_path: Path, mode: str, target: str,
                                         kind: str) -> None:
    out = tmp_path / "build"
    settings = BuildSettings(target=target, quantize=mode, calib=demo_data if mode == "int8" else None, calib_rows=2)
    manifest = build(tiny_model, out, KINDS[kind], settings, lambda message: None)
    check = manifest.check
    assert check.status == "passed", [o for o in check.outputs if not o.ok]
    assert check.same_next_token and check.same_generation and check.near_ties is not None
    quantized_outputs = [o for o in check.outputs if o.tolerance_kind == "relative"]
    assert quantized_outputs and all(o.max_rel_diff is not None for o in quantized_outputs)
    assert any(o.max_abs_diff > 1e-4 for o in quantized_outputs)  # int8 really changed the numbers
    loaded = Manifest.load(out)
    q = loaded.quantization
    assert q is not None and q["mode"] == mode
    if mode == "int8":
        assert q["calibration_rows"] == 2 and q["calibration_fingerprint"].startswith("sha256:")
    split = target == "tensorrt"
    names = ["prefill_head", "prefill_tail", "decode"] if split else ["prefill", "decode"]
    assert [g["graph"] for g in q["graphs"]] == names
    for name in names:
        model = onnx.load(str(loaded.graph_path(out, name)), load_external_data=False)
        # every weight matmul quantized, none left in float; vision and embed untouched
        assert len(weight_matmuls_after(model)) > 0 and weight_matmuls(model) == []
        has_q = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
        assert has_q == (mode == "int8")
    for name in ("vision", "embed"):
        model = onnx.load(str(loaded.graph_path(out, name)), load_external_data=False)
        assert not any(n.op_type == "DequantizeLinear" for n in model.graph.node)


def test_quantized_build_answers_and_inspect_counts_its_int8_matmuls(tiny_model: Path, demo_data: Path,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "build"
    code, text = run("build", tiny_model, "--out", out, "--quantize", "int8", "--calib", demo_data, "--calib-rows", "2")
    assert code == 0, text
    assert "int8" in text and "check passed" in text
    rows = [json.loads(line) for line in demo_data.read_text().splitlines() if line.strip()]
    image = demo_data.parent / rows[0]["image"]
    code, text = run("run", out, "--image", image, "--question", rows[0]["question"], "--max-new-tokens", "4")
    assert code == 0, text
    code, text = run("eval", out, "--data", demo_data, "--limit", "2")
    assert code == 0, text
    code, text = run("inspect", out, "--json")
    doc = json.loads(text)
    assert doc["quantization"] == "int8" and doc["quantized_matmuls"] == doc["weight_matmuls"] > 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--quantize", "int8"], "--calib"),
        (["--quantize", "int8-weights", "--dtype", "fp16"], "--dtype fp16"),
        (["--quantize", "int8-weights", "--calib", "DATA"], "needs no calibration data"),
        (["--calib", "DATA"], "--quantize int8"),
        (["--quantize", "int8", "--calib", "missing.jsonl"], "does not exist"),
    ],
)
def test_bad_quantize_options_are_one_line(tiny_model: Path, demo_data: Path, tmp_path: Path, args: list[str],
                                           needle: str) -> None:
    args = [str(demo_data) if a == "DATA" else a for a in args]
    code, text = run("build", tiny_model, "--out", tmp_path / "b", *args)
    assert_clean_error(code, text, needle)
    assert not (tmp_path / "b").exists()
