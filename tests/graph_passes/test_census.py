"""census: op counts and matmul FLOPs computed from the graph at concrete inputs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes import census, matmul_flops
from prune_core.errors import BuildError

MakeModel = Callable[..., onnx.ModelProto]


def _weights(*shapes: tuple[int, int]) -> list[onnx.TensorProto]:
    rng = np.random.default_rng(0)
    return [
        numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), f"w{i + 1}")
        for i, s in enumerate(shapes)
    ]


def _mlp_graph(make_model: MakeModel) -> onnx.ModelProto:
    """Two matmuls on a dynamic batch and sequence.

    ::

        x [b, s, 8] ── MatMul(w1 [8, 16]) ── h ── Relu ── r ── MatMul(w2 [16, 4]) ── y [b, s, 4]
    """
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="down"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 4])],
        _weights((8, 16), (16, 4)),
    )


def _topk_graph(make_model: MakeModel) -> onnx.ModelProto:
    """Token pruning: the matmuls see only the K tokens TopK keeps; K is an int64 input.

    ::

        scores [n] ── TopK(K = k) ── idx ──┐
        x [n, 8] ───────────────────────── Gather(axis=0) ── sel [K, 8]
        sel ── MatMul(w1 [8, 16]) ── h [K, 16] ── MatMul(w2 [16, 4]) ── y [K, 4]
    """
    nodes = [
        helper.make_node("TopK", ["scores", "k"], ["vals", "idx"]),
        helper.make_node("Gather", ["x", "idx"], ["sel"], axis=0),
        helper.make_node("MatMul", ["sel", "w1"], ["h"], name="up"),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="down"),
    ]
    return make_model(
        nodes,
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8]),
            helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        _weights((8, 16), (16, 4)),
    )


def test_two_matmuls_static_inference(make_model: MakeModel) -> None:
    model = ir.from_proto(_mlp_graph(make_model))

    result = census(model, input_shapes={"x": (2, 3, 8)})

    assert result.op_counts == {"MatMul": 2, "Relu": 1}
    # 2 * (b*s) * K * N per product: 2*6*8*16 + 2*6*16*4
    assert result.matmul_flops == 1536 + 768
    assert [(c.node, c.flops) for c in result.per_node] == [("up", 1536), ("down", 768)]
    assert result.per_node[0].operand_shapes == ((2, 3, 8), (8, 16))
    assert result.method == "shape_inference"
    assert result.uncounted == []
    # Running the graph gives the same figure.
    assert census(model, {"x": (2, 3, 8)}, method="onnxruntime").matmul_flops == 2304


@pytest.mark.parametrize("method", ["auto", "onnxruntime", "shape_inference", "symbolic"])
@pytest.mark.parametrize("k", [3, 5])
def test_topk_k_from_input_sets_the_flops(make_model: MakeModel, method: str, k: int) -> None:
    model = ir.from_proto(_topk_graph(make_model))

    result = census(model, input_shapes={"scores": (7,), "x": (7, 8)}, input_values={"k": [k]}, method=method)

    # k * (2*8*16 + 2*16*4) = 384 k
    assert result.matmul_flops == 384 * k
    assert [c.operand_shapes for c in result.per_node] == [((k, 8), (8, 16)), ((k, 16), (16, 4))]
    assert result.op_counts == {"Gather": 1, "MatMul": 2, "TopK": 1}
    if method != "auto":
        assert result.method == method


def test_onnxruntime_is_used_when_inference_cannot_resolve(make_model: MakeModel) -> None:
    """A data-dependent length (NonZero) defeats inference; auto falls back to running the graph.

    ::

        mask [n] (bool) ── NonZero ── nz [1, m] ── Squeeze(0) ── idx [m]
        x [n, 8] ── Gather(idx, axis=0) ── sel [m, 8] ── MatMul(w1 [8, 16]) ── y
    """
    nodes = [
        helper.make_node("NonZero", ["mask"], ["nz"]),
        helper.make_node("Squeeze", ["nz", "axis0"], ["idx"]),
        helper.make_node("Gather", ["x", "idx"], ["sel"], axis=0),
        helper.make_node("MatMul", ["sel", "w1"], ["y"]),
    ]
    proto = make_model(
        nodes,
        [
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["n"]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [*_weights((8, 16)), numpy_helper.from_array(np.array([0], np.int64), "axis0")],
    )
    mask = np.array([1, 0, 1, 1, 0, 1], bool)

    result = census(ir.from_proto(proto), {"x": (6, 8)}, {"mask": mask})

    assert result.method == "onnxruntime"
    assert result.matmul_flops == 2 * 4 * 8 * 16
    with pytest.raises(BuildError, match="could not resolve"):
        census(ir.from_proto(proto), {"x": (6, 8)}, {"mask": mask}, method="shape_inference")
    with pytest.raises(BuildError, match="neither ONNX shape inference nor ONNX Runtime's symbolic"):
        census(ir.from_proto(proto), {"x": (6, 8)}, {"mask": mask}, method="static")  # never runs it


def test_missing_inputs_are_reported(make_model: MakeModel) -> None:
    model = ir.from_proto(_topk_graph(make_model))

    with pytest.raises(BuildError) as err:
        census(model, input_shapes={"x": (7, 8)})
    assert "'scores': dynamic shape" in str(err.value)
    with pytest.raises(BuildError, match="does not have"):
        census(model, input_shapes={"nope": (1,)})


def test_gemm_and_einsum_flops() -> None:
    gemm = ir.Node("", "Gemm", [], attributes=[ir.AttrInt64("transB", 1)])
    assert matmul_flops(gemm, [(4, 8), (16, 8)]) == 2 * 4 * 8 * 16
    einsum = ir.Node("", "Einsum", [], attributes=[ir.AttrString("equation", "bij,bjk->bik")])
    assert matmul_flops(einsum, [(2, 3, 5), (2, 5, 7)]) == 2 * 2 * 3 * 5 * 7
    ellipsis = ir.Node("", "Einsum", [], attributes=[ir.AttrString("equation", "...ij,...jk")])
    assert matmul_flops(ellipsis, [(3, 5), (5, 7)]) is None
    matvec = ir.Node("", "MatMul", [])
    assert matmul_flops(matvec, [(4, 8), (8,)]) == 2 * 4 * 8
