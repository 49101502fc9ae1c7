"""CastPrecisionPass: fp16/bf16 written into the file, fp32 islands where half precision breaks."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from graph_passes import CastPrecisionPass
from prune_core.errors import BuildError

MakeModel = Callable[..., onnx.ModelProto]
RunOrt = Callable[..., list[np.ndarray]]
OpTypes = Callable[[ir.Model], list[str]]

F32, F16, BF16, I64 = (
    ir.DataType.FLOAT,
    ir.DataType.FLOAT16,
    ir.DataType.BFLOAT16,
    ir.DataType.INT64,
)


def _linear_graph(make_model: MakeModel) -> onnx.ModelProto:
    """A linear layer and an integer shape constant.

    ::

        x [2, 4] ── MatMul(w [4, 6]) ── m ── Add(b [6]) ── a ── Reshape(shape: int64 [3, 4]) ── y
    """
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b"),
        numpy_helper.from_array(np.array([3, 4], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["a"]),
        helper.make_node("Reshape", ["a", "shape"], ["y"]),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        inits,
    )


def _softmax_graph(make_model: MakeModel) -> onnx.ModelProto:
    """Attention-like: scale, softmax, product with values.

    ::

        x [2, 5] ── Mul(scale) ── s ── Softmax ── p ── MatMul(v [5, 3]) ── y
    """
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(np.array(0.5, np.float32), "scale"),
        numpy_helper.from_array(rng.standard_normal((5, 3)).astype(np.float32), "v"),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["y"]),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        inits,
    )


def _rmsnorm_graph(make_model: MakeModel) -> onnx.ModelProto:
    """RMSNorm as torch decomposes it; ``x**2`` overflows fp16 once ``|x| > 256``.

    ::

        x ── Pow(2) ── ReduceMean ── Add(eps) ── Sqrt ── Reciprocal ── r ──┐
        x ────────────────────────────────────────────────────────────── Mul ── y
    """
    inits = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["var"]),
        helper.make_node("Sqrt", ["var"], ["rms"]),
        helper.make_node("Reciprocal", ["rms"], ["r"]),
        helper.make_node("Mul", ["x", "r"], ["y"]),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        inits,
    )


def _rotary_graph(make_model: MakeModel) -> onnx.ModelProto:
    """Rotary angles from integer positions: fp16 cannot even hold position 3001.

    ::

        pos (int64) ── Cast(FLOAT) ── p ── Mul(inv_freq [4]) ── ang ── Cos ── c ──┐
        x [n, 4] ─────────────────────────────────────────────────────────────── Mul ── y
    """
    inv_freq = 1.0 / (10000 ** (np.arange(0, 8, 2, dtype=np.float32) / 8))
    nodes = [
        helper.make_node("Cast", ["pos"], ["p"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["p", "inv_freq"], ["ang"]),
        helper.make_node("Cos", ["ang"], ["c"]),
        helper.make_node("Mul", ["x", "c"], ["y"]),
    ]
    return make_model(
        nodes,
        [
            helper.make_tensor_value_info("pos", TensorProto.INT64, ["n", 1]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(inv_freq.astype(np.float32), "inv_freq")],
    )


def _dtype_of(model: ir.Model, name: str) -> ir.DataType | None:
    values = {v.name: v for v in [*model.graph.inputs, *model.graph.initializers.values()]}
    values.update({out.name: out for node in model.graph for out in node.outputs})
    return values[name].dtype


def test_fp16_lowers_floats_and_keeps_integers(make_model: MakeModel, run_ort: RunOrt, ops: OpTypes) -> None:
    proto = _linear_graph(make_model)
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    (expected,) = run_ort(proto, {"x": x})

    cast = CastPrecisionPass("fp16")
    result = cast(ir.from_proto(proto))

    assert result.modified is True
    assert ops(result.model) == ["MatMul", "Add", "Reshape"]
    model = result.model
    assert [_dtype_of(model, n) for n in ("x", "w", "b", "m", "a", "y")] == [F16] * 6
    assert _dtype_of(model, "shape") == I64
    assert model.graph.initializers["w"].const_value.dtype == F16
    assert cast.stats.inserted_casts == 0 and cast.stats.fp32_nodes == []
    (actual,) = run_ort(model, {"x": x.astype(np.float16)})
    assert actual.dtype == np.float16
    np.testing.assert_allclose(actual.astype(np.float32), expected, rtol=1e-2, atol=1e-2)

    assert CastPrecisionPass("fp16")(model).modified is False


def test_fp32_does_not_fire(make_model: MakeModel, run_ort: RunOrt, ops: OpTypes) -> None:
    proto = _linear_graph(make_model)
    x = np.ones((2, 4), np.float32)
    (expected,) = run_ort(proto, {"x": x})

    result = CastPrecisionPass("fp32")(ir.from_proto(proto))

    assert result.modified is False
    assert ops(result.model) == ["MatMul", "Add", "Reshape"]
    assert _dtype_of(result.model, "x") == F32
    (actual,) = run_ort(result.model, {"x": x})
    np.testing.assert_array_equal(actual, expected)


def test_softmax_stays_fp32_between_casts(make_model: MakeModel, run_ort: RunOrt, ops: OpTypes) -> None:
    proto = _softmax_graph(make_model)
    x = np.random.default_rng(3).standard_normal((2, 5)).astype(np.float32) * 4
    (expected,) = run_ort(proto, {"x": x})

    cast = CastPrecisionPass("fp16")
    result = cast(ir.from_proto(proto))

    assert result.modified is True
    assert ops(result.model) == ["Mul", "Cast", "Softmax", "Cast", "MatMul"]
    assert _dtype_of(result.model, "p") == F32
    assert _dtype_of(result.model, "s") == F16
    (actual,) = run_ort(result.model, {"x": x.astype(np.float16)})
    np.testing.assert_allclose(actual.astype(np.float32), expected, rtol=1e-2, atol=1e-2)

    again = CastPrecisionPass("fp16")(result.model)
    assert again.modified is False
    assert ops(again.model) == ["Mul", "Cast", "Softmax", "Cast", "MatMul"]


def test_rmsnorm_island_avoids_fp16_overflow(make_model: MakeModel, run_ort: RunOrt, ops: OpTypes) -> None:
    proto = _rmsnorm_graph(make_model)
    x = np.random.default_rng(4).uniform(-600, 600, (3, 8)).astype(np.float32)  # x**2 > 65504
    (expected,) = run_ort(proto, {"x": x})

    result = CastPrecisionPass("fp16")(ir.from_proto(proto))

    assert result.modified is True
    island = ["Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal"]
    assert ops(result.model) == ["Cast", *island, "Cast", "Mul"]
    assert result.model.graph.initializers["eps"].const_value.dtype == F32  # used only in fp32
    (actual,) = run_ort(result.model, {"x": x.astype(np.float16)})
    np.testing.assert_allclose(actual.astype(np.float32), expected, rtol=1e-2, atol=1e-2)
    assert CastPrecisionPass("fp16")(result.model).modified is False

    # Without the island, strict fp16 arithmetic (the ONNX reference evaluator; ORT's CPU provider
    # quietly computes Pow/ReduceMean in fp32, a GPU does not) overflows the mean of squares and
    # the output collapses to zero. The island keeps it right under the same arithmetic.
    naive = CastPrecisionPass("fp16", keep_fp32_ops=frozenset())(ir.from_proto(proto))
    assert "Cast" not in ops(naive.model)
    (collapsed,) = ReferenceEvaluator(ir.to_proto(naive.model)).run(None, {"x": x.astype(np.float16)})
    np.testing.assert_array_equal(collapsed, np.zeros_like(collapsed))
    (strict,) = ReferenceEvaluator(ir.to_proto(result.model)).run(None, {"x": x.astype(np.float16)})
    np.testing.assert_allclose(strict.astype(np.float32), expected, rtol=1e-2, atol=1e-2)


def test_integer_positions_stay_fp32(make_model: MakeModel, run_ort: RunOrt, ops: OpTypes) -> None:
    proto = _rotary_graph(make_model)
    pos = np.array([[5], [2049], [3001], [4095]], np.int64)
    x = np.ones((4, 4), np.float32)
    (expected,) = run_ort(proto, {"pos": pos, "x": x})

    cast = CastPrecisionPass("fp16")
    result = cast(ir.from_proto(proto))

    assert result.modified is True
    assert ops(result.model) == ["Cast", "Mul", "Cos", "Cast", "Mul"]
    assert result.model.graph.initializers["inv_freq"].const_value.dtype == F32
    assert _dtype_of(result.model, "pos") == I64
    (actual,) = run_ort(result.model, {"pos": pos, "x": x.astype(np.float16)})
    np.testing.assert_allclose(actual.astype(np.float32), expected, atol=2e-3)
    assert CastPrecisionPass("fp16")(result.model).modified is False

    naive = CastPrecisionPass("fp16", keep_int_casts_fp32=False)(ir.from_proto(proto))
    (wrong,) = run_ort(naive.model, {"pos": pos, "x": x.astype(np.float16)})
    assert np.abs(wrong.astype(np.float32) - expected).max() > 0.05


def test_bf16_lowers_and_matches_reference(make_model: MakeModel, run_ort: RunOrt, ops: OpTypes) -> None:
    proto = _linear_graph(make_model)
    x = np.random.default_rng(5).standard_normal((2, 4)).astype(np.float32)
    (expected,) = run_ort(proto, {"x": x})

    result = CastPrecisionPass("bf16")(ir.from_proto(proto))

    assert result.modified is True
    assert ops(result.model) == ["MatMul", "Add", "Reshape"]
    assert _dtype_of(result.model, "w") == BF16 and _dtype_of(result.model, "y") == BF16
    # ORT's CPU provider has no bf16 MatMul kernel; the ONNX reference evaluator does.
    (actual,) = ReferenceEvaluator(ir.to_proto(result.model)).run(None, {"x": x.astype(BF16.numpy())})
    np.testing.assert_allclose(actual.astype(np.float32), expected, rtol=3e-2, atol=3e-2)
    assert CastPrecisionPass("bf16")(result.model).modified is False


def test_fp16_clamps_out_of_range_constants(make_model: MakeModel, run_ort: RunOrt) -> None:
    """``finfo(float32).min`` masks become -65504, not -inf (no NaN rows after softmax).

    ::

        x ── Add(mask) ── y
    """
    mask = np.array([0.0, np.finfo(np.float32).min, 1e5], np.float32)
    proto = make_model(
        [helper.make_node("Add", ["x", "mask"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [numpy_helper.from_array(mask, "mask")],
    )
    cast = CastPrecisionPass("fp16")
    result = cast(ir.from_proto(proto))

    assert cast.stats.clamped_values == 2
    lowered = result.model.graph.initializers["mask"].const_value.numpy()
    np.testing.assert_array_equal(lowered, np.array([0.0, -65504.0, 65504.0], np.float16))
    (actual,) = run_ort(result.model, {"x": np.zeros(3, np.float16)})
    assert np.isfinite(actual).all()


def test_unknown_dtype_is_refused() -> None:
    with pytest.raises(BuildError, match="unknown dtype 'int8'"):
        CastPrecisionPass("int8")


def _embedding_norm_graph(make_model: MakeModel) -> onnx.ModelProto:
    """An embedding lookup feeding RMSNorm and a projection (layer 0 of a decoder).

    ::

        ids (int64) ── Gather(table [16, 8]) ── e ── Pow(2) ── ReduceMean ── Sqrt ── Reciprocal ── r ──┐
        e ──────────────────────────────────────────────────────────────────────────────────────── Mul ── n
        n ── MatMul(w [8, 4]) ── y
    """
    rng = np.random.default_rng(6)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "table"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], axis=0),
        helper.make_node("Pow", ["e", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1),
        helper.make_node("Sqrt", ["ms"], ["rms"]),
        helper.make_node("Reciprocal", ["rms"], ["r"]),
        helper.make_node("Mul", ["e", "r"], ["n"]),
        helper.make_node("MatMul", ["n", "w"], ["y"]),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["s", 4])],
        inits,
    )


def test_embedding_lookup_is_data_not_a_constant(
    make_model: MakeModel, run_ort: RunOrt, ops: OpTypes
) -> None:
    """``Gather(table, ids)`` reads runtime indices: the layer after it must not join the island."""
    proto = _embedding_norm_graph(make_model)
    ids = np.array([0, 5, 9, 15], np.int64)
    (expected,) = run_ort(proto, {"ids": ids})

    result = CastPrecisionPass("fp16")(ir.from_proto(proto))

    island = ["Pow", "ReduceMean", "Sqrt", "Reciprocal"]
    assert ops(result.model) == ["Gather", "Cast", *island, "Cast", "Mul", "MatMul"]
    assert [_dtype_of(result.model, n) for n in ("table", "e", "n", "w", "y")] == [F16] * 5
    (actual,) = run_ort(result.model, {"ids": ids})
    np.testing.assert_allclose(actual.astype(np.float32), expected, rtol=1e-2, atol=1e-2)
    assert CastPrecisionPass("fp16")(result.model).modified is False
