"""int8 Q/DQ of weight matmuls (ONNX Runtime's tooling): which nodes, what scales, how close to float.

The graph under test::

    x [1, n, 8] ──► MatMul(W1 [8, 6]) ──► h ──► Gemm(W2 [4, 6], transB=1)  ... per-token projections
                                           └──► MatMul(h, hᵀ) ──► scores     ... activations x activations
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes.quantize import quantize_graph, weight_matmuls, weight_matmuls_after


def _graph(path: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(8, 6)).astype(np.float32) * np.array([1, 2, 4, 8, 0.5, 0.25], np.float32)
    w2 = rng.normal(size=(4, 6)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="proj"),
        helper.make_node("Reshape", ["h", "shape"], ["h2"], name="flat"),
        helper.make_node("Gemm", ["h2", "w2"], ["y"], name="out", transB=1),
        helper.make_node("Transpose", ["h"], ["ht"], name="t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["h", "ht"], ["scores"], name="scores"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, "n", "n"])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(np.array([-1, 6], np.int64), "shape")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10), str(path))
    return w1, w2


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def _weight_dq(model: onnx.ModelProto, node_name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """int8 weight, scales and axis of the DequantizeLinear feeding ``node_name``'s second input."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name)
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == node.input[1])
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    return inits[dq.input[0]], inits[dq.input[1]], axis


@pytest.mark.parametrize(("mode", "target"), [("int8", "tensorrt"), ("int8", "onnxruntime"),
                                              ("int8-weights", "onnxruntime")])
def test_weight_matmuls_get_per_channel_int8_weights_and_the_rest_stays_float(tmp_path: Path, mode: str,
                                                                             target: str) -> None:
    src, dst = tmp_path / "g.onnx", tmp_path / "q.onnx"
    w1, w2 = _graph(src)
    assert [n.name for n in weight_matmuls(onnx.load(str(src)))] == ["proj", "out"]
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.normal(size=(1, 5, 8)).astype(np.float32)} for _ in range(4)]
    report = quantize_graph(src, dst, mode, feeds if mode == "int8" else (), target=target)
    q = onnx.load(str(dst))
    assert (report.weight_matmuls, report.quantized) == (2, 2)
    assert {n.name for n in weight_matmuls_after(q)} == {"proj", "out"}
    # hand-computed reference: symmetric int8 per output channel, scale = max|w| / 127
    for name, w, channel_axis in (("proj", w1, 1), ("out", w2, 0)):
        w_q, scale, axis = _weight_dq(q, name)
        assert w_q.dtype == np.int8 and axis == channel_axis
        np.testing.assert_allclose(scale, np.abs(w).max(axis=1 - channel_axis) / 127, rtol=1e-6)
        np.testing.assert_array_equal(w_q, np.round(w / np.expand_dims(scale, 1 - channel_axis)).astype(np.int8))
    # the activation x activation matmul is untouched: no Q/DQ on its inputs
    scores = next(n for n in q.graph.node if n.name == "scores")
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    quantized_inputs = [producers.get(i) == "DequantizeLinear" for i in scores.input]
    assert quantized_inputs == [mode == "int8", mode == "int8"] or not any(quantized_inputs)
    acts = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert bool(acts) == (mode == "int8")  # weight-only: activations never quantized
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    for node in acts:  # TensorRT: int8 with zero point 0; ONNX Runtime's x86 kernels: uint8
        zero = inits[node.input[2]]
        if target == "tensorrt":
            assert zero.dtype == np.int8 and not zero.any()
        else:
            assert zero.dtype == np.uint8
    x = rng.normal(size=(1, 7, 8)).astype(np.float32)
    (y_ref, s_ref), (y, s) = _run(src, x), _run(dst, x)
    assert np.abs(y - y_ref).max() <= 0.05 * np.abs(y_ref).max()
    assert np.abs(s - s_ref).max() <= 0.05 * np.abs(s_ref).max()
    assert np.abs(y - y_ref).max() > 0  # it really is quantized


def test_int8_without_feeds_and_unknown_modes_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "g.onnx"
    _graph(src)
    with pytest.raises(ValueError, match="calibration"):
        quantize_graph(src, tmp_path / "q.onnx", "int8", [])
    with pytest.raises(ValueError, match="int8-weights"):
        quantize_graph(src, tmp_path / "q.onnx", "int4")
