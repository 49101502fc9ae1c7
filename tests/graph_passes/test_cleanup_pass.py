"""CleanupPass: constant folding and dead-code removal, with a truthful ``modified`` flag."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from graph_passes import CleanupPass

MakeModel = Callable[..., onnx.ModelProto]
RunOrt = Callable[..., list[np.ndarray]]
OpTypes = Callable[[ir.Model], list[str]]


def _foldable_graph(make_model: MakeModel) -> onnx.ModelProto:
    """A constant subexpression, a dead branch, an unused initializer and stale value_info.

    ::

        a (init) ──┐
                   Add ── c ──┐
        b (init) ──┘          Mul ── y
        x ────────────────────┘
        x ── Relu ── dead          (unused)
        unused (init)              (unused)
        value_info: c, ghost       (ghost names no value)
    """
    inits = [
        numpy_helper.from_array(np.full((2, 3), 1.5, np.float32), "a"),
        numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "b"),
        numpy_helper.from_array(np.ones(4, np.float32), "unused"),
    ]
    nodes = [
        helper.make_node("Add", ["a", "b"], ["c"], name="add"),
        helper.make_node("Mul", ["x", "c"], ["y"], name="mul"),
        helper.make_node("Relu", ["x"], ["dead"], name="relu"),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        inits,
    )
    model.graph.value_info.extend(
        [
            helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("ghost", TensorProto.FLOAT, [7]),
        ]
    )
    return model


def _shape_graph(make_model: MakeModel) -> onnx.ModelProto:
    """``Shape`` of a partly dynamic input, folded into the Reshape's shape constant.

    ::

        x [n, 3] ──────────────────────────────┐
        x ── Shape(start=1) ── s ──┐           Reshape ── y
        minus_one (init [-1]) ─────Concat ── shp ┘
    """
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], start=1),
        helper.make_node("Concat", ["minus_one", "s"], ["shp"], axis=0),
        helper.make_node("Reshape", ["x", "shp"], ["y"]),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([-1], np.int64), "minus_one")],
    )


def _clean_graph(make_model: MakeModel, *, annotated: bool = True) -> onnx.ModelProto:
    """Nothing to fold or remove (``annotated``: ``r`` already has its type and shape).

    ::

        x ── Relu ── r ── Neg ── y
    """
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    if annotated:
        model.graph.value_info.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [4]))
    return model


def test_folds_constants_and_removes_dead_code(make_model: MakeModel, run_ort: RunOrt, ops: OpTypes) -> None:
    proto = _foldable_graph(make_model)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    (expected,) = run_ort(proto, {"x": x})

    model = ir.from_proto(proto)
    result = CleanupPass()(model)

    assert result.modified is True
    assert ops(result.model) == ["Mul"]
    assert list(result.model.graph.initializers) == ["c"]
    saved = ir.to_proto(result.model)
    assert {vi.name for vi in saved.graph.value_info} <= {"c"}
    (actual,) = run_ort(result.model, {"x": x})
    np.testing.assert_array_equal(actual, expected)

    assert CleanupPass()(result.model).modified is False


def test_folds_shape_of_static_dims(make_model: MakeModel, run_ort: RunOrt, ops: OpTypes) -> None:
    proto = _shape_graph(make_model)
    x = np.arange(15, dtype=np.float32).reshape(5, 3)
    (expected,) = run_ort(proto, {"x": x})

    result = CleanupPass()(ir.from_proto(proto))

    assert result.modified is True
    assert ops(result.model) == ["Reshape"]
    shape_input = result.model.graph[0].inputs[1]
    np.testing.assert_array_equal(shape_input.const_value.numpy(), [-1, 3])
    (actual,) = run_ort(result.model, {"x": x})
    np.testing.assert_array_equal(actual, expected)
    assert CleanupPass()(result.model).modified is False


def test_does_not_fire_on_a_clean_graph(make_model: MakeModel, run_ort: RunOrt, ops: OpTypes) -> None:
    proto = _clean_graph(make_model)
    x = np.array([-1.0, 0.5, 2.0, -3.0], np.float32)
    (expected,) = run_ort(proto, {"x": x})

    result = CleanupPass()(ir.from_proto(proto))

    assert result.modified is False
    assert ops(result.model) == ["Relu", "Neg"]
    (actual,) = run_ort(result.model, {"x": x})
    np.testing.assert_array_equal(actual, expected)


def test_keeps_unused_graph_inputs(make_model: MakeModel, ops: OpTypes) -> None:
    """The signature is a contract with the caller: an unused input stays."""
    proto = _clean_graph(make_model)
    proto.graph.input.append(helper.make_tensor_value_info("spare", TensorProto.INT64, []))

    result = CleanupPass()(ir.from_proto(proto))

    assert [v.name for v in result.model.graph.inputs] == ["x", "spare"]
    assert ops(result.model) == ["Relu", "Neg"]


def test_reports_added_type_annotations_as_a_change(make_model: MakeModel, ops: OpTypes) -> None:
    """Folding runs shape inference; a value_info it adds is a real change of the file."""
    model = ir.from_proto(_clean_graph(make_model, annotated=False))

    result = CleanupPass()(model)

    assert result.modified is True
    assert ops(result.model) == ["Relu", "Neg"]
    assert result.model.graph[0].outputs[0].dtype == ir.DataType.FLOAT
    assert CleanupPass()(result.model).modified is False
