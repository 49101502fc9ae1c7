"""TensorRT lint: one small graph per violation, each caught; a clean graph passes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes import BoundShapesPass, TensorRTLintPass, lint_tensorrt
from prune_core.errors import BuildError

MakeModel = Callable[..., onnx.ModelProto]
RunOrt = Callable[..., list[np.ndarray]]
OpTypes = Callable[[ir.Model], list[str]]

F, I64, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def _vi(name: str, elem: int, shape: list[object] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _i64(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def topk_k_4000(make_model: MakeModel) -> onnx.ModelProto:
    """::

    x [5000] ── TopK(K = 4000 const) ── values, indices
    """
    node = helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="topk")
    outputs = [_vi("values", F, None), _vi("indices", I64, None)]
    return make_model([node], [_vi("x", F, [5000])], outputs, [_i64("k", [4000])])


def topk_unsorted(make_model: MakeModel) -> onnx.ModelProto:
    """::

    x [8] ── TopK(K = 2 const, sorted=0) ── values, indices
    """
    node = helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="topk", sorted=0)
    outputs = [_vi("values", F, None), _vi("indices", I64, None)]
    return make_model([node], [_vi("x", F, [8])], outputs, [_i64("k", [2])])


def nonzero(make_model: MakeModel) -> onnx.ModelProto:
    """::

    x [8] ── NonZero ── idx
    """
    node = helper.make_node("NonZero", ["x"], ["idx"], name="nz")
    return make_model([node], [_vi("x", F, [8])], [_vi("idx", I64, None)])


def unique(make_model: MakeModel) -> onnx.ModelProto:
    """::

    x [8] ── Unique ── u
    """
    node = helper.make_node("Unique", ["x"], ["u"], name="uniq")
    return make_model([node], [_vi("x", F, [8])], [_vi("u", F, None)])


def compress(make_model: MakeModel) -> onnx.ModelProto:
    """::

    x [8] ──────────┐
    keep [8] (bool) ─ Compress(axis=0) ── y
    """
    node = helper.make_node("Compress", ["x", "keep"], ["y"], name="compress", axis=0)
    return make_model([node], [_vi("x", F, [8]), _vi("keep", B, [8])], [_vi("y", F, None)])


def bool_scatter_elements(make_model: MakeModel) -> onnx.ModelProto:
    """::

    mask [8] (bool) ─┐
    idx [2] (int64) ─ ScatterElements ── out (bool)
    upd [2] (bool) ──┘
    """
    node = helper.make_node("ScatterElements", ["mask", "idx", "upd"], ["out"], name="scatter")
    return make_model(
        [node], [_vi("mask", B, [8]), _vi("idx", I64, [2]), _vi("upd", B, [2])], [_vi("out", B, None)]
    )


def scatter_nd_add(make_model: MakeModel) -> onnx.ModelProto:
    """::

    data [8] ──────┐
    idx [2, 1] ─── ScatterND(reduction="add") ── out
    upd [2] ───────┘
    """
    node = helper.make_node("ScatterND", ["data", "idx", "upd"], ["out"], name="snd", reduction="add")
    return make_model(
        [node], [_vi("data", F, [8]), _vi("idx", I64, [2, 1]), _vi("upd", F, [2])], [_vi("out", F, None)]
    )


def cumsum_runtime_axis(make_model: MakeModel) -> onnx.ModelProto:
    """::

    x [4, 4] ───────────┐
    axis (int64 scalar) ─ CumSum ── y
    """
    node = helper.make_node("CumSum", ["x", "axis"], ["y"], name="cumsum")
    return make_model([node], [_vi("x", F, [4, 4]), _vi("axis", I64, [])], [_vi("y", F, None)])


def reshape_from_float_data(make_model: MakeModel) -> onnx.ModelProto:
    """A Reshape whose target shape is computed from activations.

    ::

        x [2] ── ReduceSum ── total [1] ── Cast(INT64) ── shape [1] ──┐
        y [6] ──────────────────────────────────────────────────── Reshape ── out
    """
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=1),
        helper.make_node("Cast", ["total"], ["shape"], to=I64),
        helper.make_node("Reshape", ["y", "shape"], ["out"], name="reshape"),
    ]
    return make_model(nodes, [_vi("x", F, [2]), _vi("y", F, [6])], [_vi("out", F, None)])


def slice_end_from_argmax(make_model: MakeModel) -> onnx.ModelProto:
    """::

    x [8] ── ArgMax(keepdims=1) ── end [1] ──┐
    x ─────────────────────────────────── Slice(starts = [0]) ── y
    """
    nodes = [
        helper.make_node("ArgMax", ["x"], ["end"], keepdims=1),
        helper.make_node("Slice", ["x", "zero", "end"], ["y"], name="slice"),
    ]
    return make_model(nodes, [_vi("x", F, [8])], [_vi("y", F, None)], [_i64("zero", [0])])


def int64_clip(make_model: MakeModel) -> onnx.ModelProto:
    """A count clamped as ``torch.clamp`` exports it (onnx-tensorrt takes Clip on floats only).

    ::

        n [1] (int64) ── Clip(lo = 0, hi = 9) ── y
    """
    node = helper.make_node("Clip", ["n", "lo", "hi"], ["y"], name="clamp")
    return make_model([node], [_vi("n", I64, [1])], [_vi("y", I64, None)], [_i64("lo", [0]), _i64("hi", [9])])


def topk_k_from_unbounded_input(make_model: MakeModel) -> onnx.ModelProto:
    """::

    x [8] ── TopK(K = k input, no recorded range) ── values, indices
    """
    node = helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="topk")
    outputs = [_vi("values", F, None), _vi("indices", I64, None)]
    return make_model([node], [_vi("x", F, [8]), _vi("k", I64, [1])], outputs)


def topk_k_may_be_zero(make_model: MakeModel) -> onnx.ModelProto:
    """A neighbour count as DPC-KNN once exported it: ``max(min(6, n - 1), 0)``, 0 for one point.

    ::

        x [n, n] ── Shape ── Gather(0) ── Sub(1) ── Min(6) ── Max(0) ── Reshape([1]) ── K
        x ──────────────────────────────────────────────────────────────── TopK(axis=1) ── values
    """
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Sub", ["n", "one"], ["n1"]),
        helper.make_node("Min", ["n1", "six"], ["m"]),
        helper.make_node("Max", ["m", "zero"], ["near"]),
        helper.make_node("Reshape", ["near", "one_dim"], ["k"]),
        helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="topk", largest=0),
    ]
    outputs = [_vi("values", F, None), _vi("indices", I64, None)]
    scalars = [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in (("zero", 0), ("one", 1), ("six", 6))]
    return make_model(nodes, [_vi("x", F, ["n", "n"])], outputs, [*scalars, _i64("one_dim", [1])])


def custom_domain(make_model: MakeModel) -> onnx.ModelProto:
    """An ONNX Runtime contrib op, as its optimizer writes them.

    ::

        a [2, 3], b [3, 4] ── com.microsoft::FusedMatMul ── y
    """
    node = helper.make_node("FusedMatMul", ["a", "b"], ["y"], name="fused", domain="com.microsoft")
    return make_model([node], [_vi("a", F, [2, 3]), _vi("b", F, [3, 4])], [_vi("y", F, None)])


def unsqueeze_runtime_axes(make_model: MakeModel) -> onnx.ModelProto:
    """::

    x [4] ──────────────────┐
    axes [1] (int64 input) ─ Unsqueeze ── y
    """
    node = helper.make_node("Unsqueeze", ["x", "axes"], ["y"], name="unsqueeze")
    return make_model([node], [_vi("x", F, [4]), _vi("axes", I64, [1])], [_vi("y", F, None)])


VIOLATIONS: list[tuple[Callable[..., onnx.ModelProto], str, str]] = [
    (topk_k_4000, "TopK", "K can reach 4000; TensorRT requires K < 3840"),
    (topk_unsorted, "TopK", "sorted=0"),
    (nonzero, "NonZero", "data-dependent output shape"),
    (unique, "Unique", "Unique is listed as not supported (onnx-tensorrt docs/operators.md"),
    (compress, "Compress", "Compress is listed as not supported"),
    (bool_scatter_elements, "ScatterElements", "input 0 ('mask') is BOOL, input 2 ('upd') is BOOL; TensorRT's"),
    (int64_clip, "Clip", "input 0 ('n') is INT64, input 1 ('lo') is INT64, input 2 ('hi') is INT64; TensorRT's Clip"),
    (topk_k_from_unbounded_input, "TopK", "TopK K is not proved >= 1 (nothing bounds it from below)"),
    (topk_k_may_be_zero, "TopK", "TopK K is not proved >= 1 (the graph proves only K >= 0)"),
    (custom_domain, "FusedMatMul", "domain 'com.microsoft'"),
    (scatter_nd_add, "ScatterND", "reduction='add'"),
    (cumsum_runtime_axis, "CumSum", "axis input is computed at run time; TensorRT needs it as an initializer"),
    (unsqueeze_runtime_axes, "Unsqueeze", "axes input is computed at run time"),
    (reshape_from_float_data, "Reshape", "'shape' is data-dependent (derives from FLOAT graph input 'x')"),
    (slice_end_from_argmax, "Slice", "ends input 'end' is data-dependent (derives from ArgMax node"),
]


@pytest.mark.parametrize(("build", "op_type", "reason"), VIOLATIONS, ids=[v[0].__name__ for v in VIOLATIONS])
def test_each_violation_is_caught(
    build: MakeModel, op_type: str, reason: str, make_model: MakeModel, ops: OpTypes
) -> None:
    model = ir.from_proto(build(make_model))
    before = ops(model)

    findings = lint_tensorrt(model)

    assert [f.op_type for f in findings] == [op_type]
    assert reason in findings[0].reason
    with pytest.raises(BuildError, match="1 TensorRT incompatibility") as err:
        TensorRTLintPass()(model)
    assert findings[0].node in str(err.value)
    assert ops(model) == before


def test_all_findings_are_listed_at_once(make_model: MakeModel) -> None:
    """::

    x [8] ── NonZero ── idx
    x ── TopK(K = 2 const, sorted=0) ── values, indices
    """
    nodes = [
        helper.make_node("NonZero", ["x"], ["idx"], name="nz"),
        helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="topk", sorted=0),
    ]
    proto = make_model(
        nodes, [_vi("x", F, [8])], [_vi("idx", I64, None), _vi("values", F, None)], [_i64("k", [2])]
    )
    with pytest.raises(BuildError, match="2 TensorRT incompatibilities") as err:
        TensorRTLintPass()(ir.from_proto(proto))
    assert "nz (NonZero)" in str(err.value) and "topk (TopK)" in str(err.value)


def _clean_topk_graph(make_model: MakeModel) -> onnx.ModelProto:
    """Token selection as the pruned prefill does it: K from an int64 input, lengths from Shape.

    ::

        scores [n] ── TopK(K = k input, sorted=1) ── idx ──┐
        x [n, 4] ───────────────────────────────────────── Gather(axis=0) ── sel [k, 4]
        x ── Shape ── Slice(1:2) ── d ─┐
        minus_one (init) ───────────── Concat ── shp ──┐
        sel ───────────────────────────────────────── Reshape ── y
    """
    nodes = [
        helper.make_node("TopK", ["scores", "k"], ["vals", "idx"], name="topk"),
        helper.make_node("Gather", ["x", "idx"], ["sel"], axis=0),
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Slice", ["xs", "one", "two"], ["d"]),
        helper.make_node("Concat", ["minus_one", "d"], ["shp"], axis=0),
        helper.make_node("Reshape", ["sel", "shp"], ["y"], name="reshape"),
    ]
    return make_model(
        nodes,
        [_vi("scores", F, ["n"]), _vi("x", F, ["n", 4]), _vi("k", I64, [1])],
        [_vi("y", F, None)],
        [_i64("one", [1]), _i64("two", [2]), _i64("minus_one", [-1])],
    )


def test_clean_graph_passes(make_model: MakeModel, run_ort: RunOrt, ops: OpTypes) -> None:
    proto = _clean_topk_graph(make_model)
    rng = np.random.default_rng(0)
    feeds = {
        "scores": rng.standard_normal(6).astype(np.float32),
        "x": rng.standard_normal((6, 4)).astype(np.float32),
        "k": np.array([3], np.int64),
    }
    (expected,) = run_ort(proto, feeds)
    model = ir.from_proto(proto)
    BoundShapesPass({"n": (1, 8), "k": (1, 4)})(model)

    assert lint_tensorrt(model) == []
    result = TensorRTLintPass()(model)

    assert result.modified is False
    assert ops(result.model) == ["TopK", "Gather", "Shape", "Slice", "Concat", "Reshape"]
    (actual,) = run_ort(result.model, feeds)
    np.testing.assert_array_equal(actual, expected)


def test_topk_k_bound_from_recorded_value_range(make_model: MakeModel) -> None:
    """K from an input is fine until its recorded bound reaches 3840."""
    model = ir.from_proto(_clean_topk_graph(make_model))
    BoundShapesPass({"n": (1, 8192), "k": (1, 4096)})(model)

    findings = lint_tensorrt(model)

    assert [(f.node, f.op_type) for f in findings] == [("topk", "TopK")]
    assert "K can reach 4096" in findings[0].reason
