"""Saving an optimized graph over its own file: the external data file holds exactly what the graph uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from exporter.onnx_export import save_for_ort, save_ir_for_ort


def _matmul_model(weight: np.ndarray) -> onnx.ModelProto:
    """x [2, 64] @ W [64, 64] -> y (one MatMul, W an initializer)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(weight, "W")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_resaving_a_changed_weight_leaves_no_stale_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    path = tmp_path / "m.onnx"
    data = save_for_ort(_matmul_model(w), path, inline_limit=0)
    assert data is not None and data.stat().st_size == w.nbytes
    # a pass replaces the weight (as the cast pass does), then the graph is saved over itself
    model = ir.load(str(path))
    new = (w * 2).astype(np.float32)
    model.graph.initializers["W"].const_value = ir.tensor(new, name="W")
    assert save_ir_for_ort(model, path, inline_limit=0) == data
    assert data.stat().st_size == new.nbytes  # not old + new
    x = rng.standard_normal((2, 64)).astype(np.float32)
    (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ new, rtol=1e-5, atol=1e-5)
    # unchanged weights are streamed from the old file into the new one
    model = ir.load(str(path))
    save_ir_for_ort(model, path, inline_limit=0)
    assert data.stat().st_size == new.nbytes
    (y2,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(y, y2)
    # and a graph small enough to be inline drops its data file
    save_ir_for_ort(ir.load(str(path)), path)
    assert not data.exists()
    (y3,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(y, y3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no staging folder left
