"""PassManager and default_pipeline: order, per-pass reports, user errors unwrapped."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes import (
    BoundShapesPass,
    CastPrecisionPass,
    CleanupPass,
    NormalizeVersionsPass,
    PassManager,
    TensorRTLintPass,
    default_pipeline,
)
from prune_core.errors import BuildError

MakeModel = Callable[..., onnx.ModelProto]
RunOrt = Callable[..., list[np.ndarray]]
OpTypes = Callable[[ir.Model], list[str]]


def _names(passes: list[ir.passes.PassBase]) -> list[str]:
    return [type(p).__name__ for p in passes]


def test_default_pipeline_order() -> None:
    assert _names(default_pipeline("onnxruntime", "fp32", None)) == [
        "NormalizeVersionsPass",
        "CleanupPass",
    ]
    assert _names(default_pipeline("onnxruntime", "bf16", {"seq": (1, 64)})) == [
        "NormalizeVersionsPass",
        "CleanupPass",
        "CastPrecisionPass",
        "CleanupPass",
        "BoundShapesPass",
    ]
    trt = default_pipeline("tensorrt", "fp16", {"seq": (1, 64)})
    assert _names(trt) == [
        "NormalizeVersionsPass",
        "CleanupPass",
        "CastPrecisionPass",
        "CleanupPass",
        "BoundShapesPass",
        "TensorRTLintPass",
    ]
    assert isinstance(trt[-1], TensorRTLintPass)
    assert _names(default_pipeline("tensorrt", "fp32", None))[-2:] == [
        "BoundShapesPass",
        "TensorRTLintPass",
    ]


@pytest.mark.parametrize(
    ("target", "dtype", "match"),
    [("tvm", "fp16", r"unknown target 'tvm'.*onnxruntime"), ("tensorrt", "int8", r"unknown dtype 'int8'")],
)
def test_default_pipeline_rejects_unknown_names(target: str, dtype: str, match: str) -> None:
    with pytest.raises(BuildError, match=match):
        default_pipeline(target, dtype, None)


def _graph(make_model: MakeModel) -> onnx.ModelProto:
    """::

    c1 (init) ── Neg ── nc ──┐
    x [batch, 4] ─────────── Add ── a ── Softmax ── y
    """
    nodes = [
        helper.make_node("Neg", ["c1"], ["nc"]),
        helper.make_node("Add", ["x", "nc"], ["a"]),
        helper.make_node("Softmax", ["a"], ["y"], axis=-1),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.arange(4, dtype=np.float32), "c1")],
        ir_version=14,
    )


def test_runs_a_pipeline_with_reports(make_model: MakeModel, run_ort: RunOrt, ops: OpTypes) -> None:
    proto = _graph(make_model)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    (expected,) = run_ort(proto, {"x": x})

    manager = PassManager(default_pipeline("tensorrt", "fp16", {"batch": (1, 8)}))
    result = manager.run(ir.from_proto(proto))

    assert result.modified is True
    assert [(r.name, r.modified) for r in result.reports] == [
        ("NormalizeVersionsPass", True),
        ("CleanupPass", True),
        ("CastPrecisionPass", True),
        ("CleanupPass", False),
        ("BoundShapesPass", True),
        ("TensorRTLintPass", False),
    ]
    assert all(r.seconds >= 0 for r in result.reports)
    assert ops(result.model) == ["Add", "Cast", "Softmax", "Cast"]
    assert result.model.ir_version == 10
    (actual,) = run_ort(result.model, {"x": x.astype(np.float16)})
    np.testing.assert_allclose(actual.astype(np.float32), expected, atol=2e-3)

    again = PassManager(default_pipeline("tensorrt", "fp16", {"batch": (1, 8)})).run(result.model)
    assert again.modified is False


def test_user_errors_pass_through_unwrapped(make_model: MakeModel) -> None:
    """A lint failure reaches the caller as the BuildError itself, not a wrapped PassError."""
    node = helper.make_node("NonZero", ["x"], ["idx"], name="nz")
    proto = make_model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("idx", TensorProto.INT64, None)],
    )
    manager = PassManager([CleanupPass(), TensorRTLintPass()])

    with pytest.raises(BuildError, match=r"nz \(NonZero\)"):
        manager.run(ir.from_proto(proto))


def test_unbounded_tensorrt_input_fails_before_lint(make_model: MakeModel) -> None:
    manager = PassManager(default_pipeline("tensorrt", "fp32", None))

    with pytest.raises(BuildError, match=r"'batch'\): no bound"):
        manager.run(ir.from_proto(_graph(make_model)))


def test_repr_names_every_pass() -> None:
    manager = PassManager(
        [NormalizeVersionsPass(), CleanupPass(), CastPrecisionPass("fp16"), BoundShapesPass({"s": (1, 2)})]
    )
    assert repr(manager) == (
        "PassManager([NormalizeVersionsPass(ir_version=10, min_opset=17), CleanupPass(), "
        "CastPrecisionPass(dtype='fp16'), BoundShapesPass(['s'])])"
    )
