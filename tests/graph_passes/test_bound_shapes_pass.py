"""BoundShapesPass: every dynamic input dim bounded, bounds recorded in the model."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graph_passes import SHAPE_BOUNDS_KEY, BoundShapesPass, read_shape_bounds
from prune_core.errors import BuildError

MakeModel = Callable[..., onnx.ModelProto]
RunOrt = Callable[..., list[np.ndarray]]
OpTypes = Callable[[ir.Model], list[str]]


def _dynamic_graph(make_model: MakeModel, *, x_dims: list[object] | None = None) -> onnx.ModelProto:
    """Dynamic batch and sequence, plus an int64 scalar keep count.

    ::

        x [batch, seq, 8] ── Relu ── r ── ReduceMax(axes=[1]) ── y [batch, 1, 8]
        k (int64 scalar) ── Identity ── k_out
    """
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("ReduceMax", ["r"], ["y"], axes=[1], keepdims=1),
        helper.make_node("Identity", ["k"], ["k_out"]),
    ]
    return make_model(
        nodes,
        [
            helper.make_tensor_value_info(
                "x", TensorProto.FLOAT, x_dims if x_dims is not None else ["batch", "seq", 8]
            ),
            helper.make_tensor_value_info("k", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, 8]),
            helper.make_tensor_value_info("k_out", TensorProto.INT64, []),
        ],
    )


def _feeds() -> dict[str, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    return {"x": x, "k": np.array(3, np.int64)}


def test_records_bounds(make_model: MakeModel, run_ort: RunOrt, ops: OpTypes) -> None:
    proto = _dynamic_graph(make_model)
    expected = run_ort(proto, _feeds())

    bounds = {"batch": (1, 4), "seq": (1, 576, 2048), "k": (0, 576)}
    result = BoundShapesPass(bounds, require_value_bounds=True)(ir.from_proto(proto))

    assert result.modified is True
    assert ops(result.model) == ["Relu", "ReduceMax", "Identity"]
    doc = read_shape_bounds(result.model)
    assert doc["inputs"]["x"] == [
        {"name": "batch", "min": 1, "opt": 4, "max": 4},
        {"name": "seq", "min": 1, "opt": 576, "max": 2048},
        8,
    ]
    assert doc["inputs"]["k"] == []
    assert doc["values"] == {"k": {"min": 0, "opt": 576, "max": 576}}
    saved = ir.to_proto(result.model)
    assert json.loads({p.key: p.value for p in saved.metadata_props}[SHAPE_BOUNDS_KEY]) == doc
    for got, want in zip(run_ort(result.model, _feeds()), expected, strict=True):
        np.testing.assert_array_equal(got, want)

    again = BoundShapesPass(bounds, require_value_bounds=True)(result.model)
    assert again.modified is False


def test_lists_every_unbounded_dim(make_model: MakeModel) -> None:
    proto = _dynamic_graph(make_model, x_dims=["batch", None, "hidden"])

    with pytest.raises(BuildError) as err:
        BoundShapesPass({"batch": (1, 2)})(ir.from_proto(proto))

    message = str(err.value)
    assert "2 dynamic input" in message
    assert "input 'x' dim 1: unknown size with no name" in message
    assert "input 'x' dim 2 ('hidden'): no bound" in message
    assert "'batch'" in message  # the bounds that were given


def test_requires_value_bounds_for_shape_tensor_inputs(make_model: MakeModel) -> None:
    proto = _dynamic_graph(make_model)
    bounds = {"batch": (1, 4), "seq": (1, 2048)}

    with pytest.raises(BuildError, match="'k': integer shape-tensor input with no value range"):
        BoundShapesPass(bounds, require_value_bounds=True)(ir.from_proto(proto))
    # Without the requirement (onnxruntime) the same bounds are enough.
    assert BoundShapesPass(bounds)(ir.from_proto(proto)).modified is True


def test_static_graph_needs_no_bounds(make_model: MakeModel, run_ort: RunOrt) -> None:
    """A fully static input still gets its (trivial) record; a second run does not fire."""
    proto = _dynamic_graph(make_model, x_dims=[2, 5, 8])
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 2

    model = ir.from_proto(proto)
    assert BoundShapesPass()(model).modified is True
    assert BoundShapesPass()(model).modified is False
    assert read_shape_bounds(model)["inputs"]["x"] == [2, 5, 8]
    run_ort(model, _feeds())


@pytest.mark.parametrize(
    ("bound", "match"),
    [((4, 1), "min <= opt <= max"), ((1, 2, 3, 4), r"\(min, max\)"), ((1.5, 4), "integers")],
)
def test_rejects_malformed_bounds(bound: tuple[float, ...], match: str) -> None:
    with pytest.raises(BuildError, match=match):
        BoundShapesPass({"seq": bound})  # type: ignore[dict-item]


def test_strict_rejects_unused_names(make_model: MakeModel) -> None:
    proto = _dynamic_graph(make_model)
    bounds = {"batch": (1, 4), "seq": (1, 64), "sequence": (1, 64)}

    with pytest.raises(BuildError, match=r"does not use: \['sequence'\]"):
        BoundShapesPass(bounds, strict=True)(ir.from_proto(proto))
    assert BoundShapesPass(bounds)(ir.from_proto(proto)).modified is True
