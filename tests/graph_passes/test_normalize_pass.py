"""NormalizeVersionsPass: IR version pinned, default-domain opset explicit and >= a minimum."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graph_passes import NormalizeVersionsPass, max_opset_for_ir
from prune_core.errors import BuildError

MakeModel = Callable[..., onnx.ModelProto]
RunOrt = Callable[..., list[np.ndarray]]
OpTypes = Callable[[ir.Model], list[str]]


def _reduce_graph(make_model: MakeModel, *, opset: int, ir_version: int) -> onnx.ModelProto:
    """``ReduceMean`` with an ``axes`` attribute (an input from opset 18 on).

    ::

        x [2, 3] ── ReduceMean(axes=[1]) ── m ── Relu ── y
    """
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=1),
        helper.make_node("Relu", ["m"], ["y"]),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1])],
        opset=opset,
        ir_version=ir_version,
    )


def _x() -> np.ndarray:
    return np.array([[1.0, -2.0, 4.0], [3.0, 5.0, 7.0]], np.float32)


def test_pins_ir_version(make_model: MakeModel, run_ort: RunOrt, ops: OpTypes) -> None:
    proto = _reduce_graph(make_model, opset=17, ir_version=14)  # what onnx 1.23 writes
    (expected,) = run_ort(proto, {"x": _x()})  # run_ort lowers the IR version for ORT itself

    result = NormalizeVersionsPass()(ir.from_proto(proto))

    assert result.modified is True
    assert result.model.ir_version == 10
    assert result.model.opset_imports[""] == 17
    assert ops(result.model) == ["ReduceMean", "Relu"]
    (actual,) = run_ort(result.model, {"x": _x()})
    np.testing.assert_array_equal(actual, expected)
    assert NormalizeVersionsPass()(result.model).modified is False


def test_upgrades_an_old_opset(make_model: MakeModel, run_ort: RunOrt, ops: OpTypes) -> None:
    proto = _reduce_graph(make_model, opset=13, ir_version=8)
    (expected,) = run_ort(proto, {"x": _x()})

    result = NormalizeVersionsPass(min_opset=18)(ir.from_proto(proto))

    assert result.modified is True
    assert result.model.opset_imports[""] == 18
    assert result.model.ir_version == 10
    assert ops(result.model)[-2:] == ["ReduceMean", "Relu"]  # axes now an input (maybe a Constant)
    reduce = next(n for n in result.model.graph if n.op_type == "ReduceMean")
    assert "axes" not in reduce.attributes
    (actual,) = run_ort(result.model, {"x": _x()})
    np.testing.assert_allclose(actual, expected, rtol=0, atol=0)
    assert NormalizeVersionsPass(min_opset=18)(result.model).modified is False


def test_does_not_fire_when_already_normal(make_model: MakeModel, ops: OpTypes) -> None:
    proto = _reduce_graph(make_model, opset=17, ir_version=10)

    result = NormalizeVersionsPass()(ir.from_proto(proto))

    assert result.modified is False
    assert ops(result.model) == ["ReduceMean", "Relu"]


def test_refuses_an_opset_newer_than_the_ir_version_allows(make_model: MakeModel) -> None:
    assert max_opset_for_ir(10) == 22
    proto = _reduce_graph(make_model, opset=23, ir_version=11)

    with pytest.raises(BuildError, match=r"opset 23.*at most opset 22"):
        NormalizeVersionsPass(ir_version=10)(ir.from_proto(proto))
    # The same model is fine when the target IR version can carry opset 23.
    assert NormalizeVersionsPass(ir_version=11)(ir.from_proto(proto)).model.ir_version == 11


def test_makes_the_default_opset_explicit(make_model: MakeModel) -> None:
    """A graph of custom-domain ops only gets an explicit ai.onnx import; ai.onnx is one spelling.

    ::

        x ── custom.Op ── y
    """
    node = helper.make_node("Op", ["x"], ["y"], domain="custom")
    proto = make_model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    del proto.opset_import[:]
    proto.opset_import.append(helper.make_opsetid("custom", 1))

    result = NormalizeVersionsPass(min_opset=17)(ir.from_proto(proto))
    assert result.modified is True
    assert result.model.opset_imports == {"custom": 1, "": 17}

    aliased = _reduce_graph(make_model, opset=17, ir_version=10)
    aliased.opset_import[0].domain = "ai.onnx"
    unified = NormalizeVersionsPass()(ir.from_proto(aliased))
    assert unified.modified is True
    assert unified.model.opset_imports == {"": 17}


def test_refuses_onnx_ops_without_an_opset_import(make_model: MakeModel) -> None:
    proto = _reduce_graph(make_model, opset=17, ir_version=10)
    del proto.opset_import[:]

    with pytest.raises(BuildError, match="imports no ai.onnx opset"):
        NormalizeVersionsPass()(ir.from_proto(proto))
