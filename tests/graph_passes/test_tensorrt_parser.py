"""TensorRT's operator table in the repository: what it says, and a graph checked against it.

The reference is onnx-tensorrt's docs/operators.md at the ONNX-TensorRT 10.1 GA release, read by hand: 150
operators marked supported, 46 marked not supported, and the rows quoted below.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes.tensorrt_parser import OPSETS, SUPPORTED_TYPES, UNSUPPORTED_OPS, parser_findings

MakeModel = Callable[..., onnx.ModelProto]
F, I64 = TensorProto.FLOAT, TensorProto.INT64

#: Operators of the table that ONNX itself no longer (or never) defined: experimental ones of older opsets.
NOT_IN_ONNX = {"ImageScaler", "ParametricSoftplus", "ScaledTanh"}


def test_the_table_has_every_row_of_the_source() -> None:
    assert len(SUPPORTED_TYPES) == 150
    assert len(UNSUPPORTED_OPS) == 46
    assert not set(SUPPORTED_TYPES) & UNSUPPORTED_OPS
    assert OPSETS == (9, 20)


def test_every_operator_name_is_an_onnx_operator() -> None:
    """A misspelt row would let a real operator through as "not in the table" or refuse a supported one."""
    unknown = {op for op in [*SUPPORTED_TYPES, *UNSUPPORTED_OPS] if not onnx.defs.has(op)}
    assert unknown == NOT_IN_ONNX


@pytest.mark.parametrize(
    ("op", "types"),
    [
        ("Clip", {"FP32", "FP16", "BF16"}),  # no integers: an int64 clamp of a count does not parse
        ("TopK", {"FP32", "FP16", "BF16", "INT32", "INT64"}),
        ("Where", {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"}),
        ("NonZero", {"FP32", "FP16"}),
        ("ConstantOfShape", {"FP32", "FP16", "BF16", "INT32", "INT64", "BOOL"}),  # the source's INF64 typo
        ("Cast", {"FP32", "FP16", "BF16", "INT32", "INT64", "UINT8", "BOOL"}),
        ("DequantizeLinear", {"INT8", "FP8", "INT4"}),
        ("And", {"BOOL"}),
        ("Gelu", {"FP32", "FP16", "BF16", "INT8", "INT32", "INT64"}),
    ],
)
def test_rows_as_the_source_lists_them(op: str, types: set[str]) -> None:
    assert SUPPORTED_TYPES[op] == types


@pytest.mark.parametrize("op", ["Unique", "Compress", "BitShift", "MatMulInteger", "SequenceAt", "STFT"])
def test_rows_the_source_marks_unsupported(op: str) -> None:
    assert op in UNSUPPORTED_OPS


def test_an_opset_outside_the_table_is_one_finding_for_the_model(make_model: MakeModel) -> None:
    node = helper.make_node("Relu", ["x"], ["y"])
    proto = make_model([node], [helper.make_tensor_value_info("x", F, [2])], [helper.make_tensor_value_info("y", F, None)], opset=21)  # fmt: skip

    findings = parser_findings(ir.from_proto(proto))

    assert [(f.node, f.reason.split(";")[0]) for f in findings] == [("<model>", "default-domain opset 21")]


def test_where_is_checked_on_its_branches_not_its_condition(make_model: MakeModel) -> None:
    """``Where(cond BOOL, a UINT8, b UINT8)``: BOOL is listed for Where, UINT8 is not."""
    node = helper.make_node("Where", ["c", "a", "b"], ["y"], name="where")
    inputs = [helper.make_tensor_value_info("c", TensorProto.BOOL, [4]),
              *(helper.make_tensor_value_info(n, TensorProto.UINT8, [4]) for n in "ab")]  # fmt: skip
    proto = make_model([node], inputs, [helper.make_tensor_value_info("y", TensorProto.UINT8, None)])

    findings = parser_findings(ir.from_proto(proto))

    assert [f.reason.split(";")[0] for f in findings] == ["input 1 ('a') is UINT8, input 2 ('b') is UINT8"]


def _neighbour_topk(make_model: MakeModel, pad: bool) -> onnx.ModelProto:
    """DPC-KNN's nearest-neighbour TopK, ``near = max(min(6, n - 1), 0)``: 0 for a single point.

    ``pad``: as exported now, the distances get one +inf column and TopK asks for ``near + 1``.

    ::

        x [n, n] ── Shape ── Gather(0) ── Sub(1) ── Min(6) ── Max(0) ──(pad: Add(1))── Reshape([1]) ── K
        x (pad: Concat with +inf [n, 1]) ───────────────────────────────────────────── TopK(axis=1, smallest)
    """
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Sub", ["n", "one"], ["n1"]),
        helper.make_node("Min", ["n1", "six"], ["m"]),
        helper.make_node("Max", ["m", "zero"], ["near"]),
    ]
    if pad:
        nodes += [
            helper.make_node("Add", ["near", "one"], ["k0"]),
            helper.make_node("Slice", ["shape", "zero_1", "one_1"], ["rows"]),
            helper.make_node("Concat", ["rows", "one_1"], ["pad_shape"], axis=0),
            helper.make_node("ConstantOfShape", ["pad_shape"], ["pad"], value=numpy_helper.from_array(np.array([np.inf], np.float32))),
            helper.make_node("Concat", ["x", "pad"], ["scores"], axis=1),
        ]  # fmt: skip
    nodes += [
        helper.make_node("Reshape", ["k0" if pad else "near", "one_1"], ["k"]),
        helper.make_node("TopK", ["scores" if pad else "x", "k"], ["values", "indices"], name="topk", largest=0),
    ]
    scalars = [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in (("zero", 0), ("one", 1), ("six", 6))]
    vectors = [numpy_helper.from_array(np.array([v], np.int64), f"{name}_1") for name, v in (("zero", 0), ("one", 1))]
    outputs = [helper.make_tensor_value_info("values", F, None), helper.make_tensor_value_info("indices", I64, None)]
    return make_model(nodes, [helper.make_tensor_value_info("x", F, ["n", "n"])], outputs, [*scalars, *vectors])


def test_a_count_that_can_be_0_is_found_and_the_padded_topk_is_proved_positive(
    make_model: MakeModel, run_ort: Callable[..., list[np.ndarray]]
) -> None:
    bare, padded = _neighbour_topk(make_model, pad=False), _neighbour_topk(make_model, pad=True)

    assert [f.node for f in parser_findings(ir.from_proto(bare))] == ["topk"]
    assert parser_findings(ir.from_proto(padded)) == []
    # The padded TopK gives the same values for every n, one point (K = 0 before padding) included.
    for n in (1, 2, 5, 9):
        x = np.random.default_rng(n).random((n, n), dtype=np.float32)
        want = np.sort(np.where(np.eye(n, dtype=bool), np.inf, x), axis=1)[:, : max(min(6, n - 1), 0)]
        got = run_ort(padded, {"x": np.where(np.eye(n, dtype=bool), np.inf, x).astype(np.float32)})[0]
        np.testing.assert_array_equal(got[:, : want.shape[1]], want)
