"""The graphs of a TensorRT build use no operator on an integer type that TensorRT's ONNX parser does not take.

onnx-tensorrt's operator table (TensorRT 10.x, docs/operators.md of onnx/onnx-tensorrt) lists Clip for FP32,
FP16 and BF16 only: an int64 Clip (``torch.clamp`` of a count) parses nowhere. A few ops the graphs use on
integers are checked here against that table, on a split AutoPrune build (the graph with the most integer
arithmetic: per-layer keep and merge counts).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, shape_inference

from prune_core.plan import AutoPruneSection
from prune_export.workflows.build import BuildSettings, build
from prune_export.workflows.selection import PlanChoice

#: Ops of these graphs and the integer element types onnx-tensorrt 10.1's table lists for them.
INTEGER_TYPES = {
    "Clip": set(),
    "Min": {TensorProto.INT32, TensorProto.INT64},
    "Max": {TensorProto.INT32, TensorProto.INT64},
    "Where": {TensorProto.INT32, TensorProto.INT64},
    "TopK": {TensorProto.INT32, TensorProto.INT64},
}
INTEGERS = {TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8}


@pytest.fixture(scope="module")
def split_build(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trt-types") / "autoprune"
    choice = PlanChoice(frozenset(), AutoPruneSection(tokens=4), {"tokens": 4})
    build(tiny_model, out, choice, BuildSettings(target="tensorrt", check=False), lambda message: None)
    return out


def test_no_op_runs_on_an_integer_type_tensorrt_does_not_take(split_build: Path) -> None:
    bad = []
    for graph in ("prefill_head", "prefill_tail", "decode"):
        model = shape_inference.infer_shapes(onnx.load(str(split_build / f"{graph}.onnx"), load_external_data=False))
        types = {v.name: v.type.tensor_type.elem_type
                 for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}  # fmt: skip
        types.update({t.name: t.data_type for t in model.graph.initializer})
        for node in model.graph.node:
            allowed = INTEGER_TYPES.get(node.op_type)
            data_type = types.get(node.input[1] if node.op_type == "Where" else node.input[0])
            if allowed is not None and data_type in INTEGERS and data_type not in allowed:
                bad.append(f"{graph}: {node.name} ({node.op_type} on {TensorProto.DataType.Name(data_type)})")
    assert not bad, bad
