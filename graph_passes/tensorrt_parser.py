"""What TensorRT's ONNX parser takes: its published operator table, and a check of a graph against it.

The table is onnx-tensorrt's ``docs/operators.md`` ("Supported ONNX Operators") at the ONNX-TensorRT
10.1 GA release (github.com/onnx/onnx-tensorrt, commit 96e7811), which describes TensorRT 10.x: ONNX
opsets 9 to 20 of the default domain, and for each operator whether it is supported and for which
element types of its data. One typo of the source is corrected here (``INF64`` for ``INT64`` in
ConstantOfShape's row). Operators newer than opset 20 are absent from it, so they are refused.

:func:`parser_findings` checks every node of a model (subgraphs too) against that table, with the
restrictions of the table that decide whether this project's graphs parse:

* the model's default-domain opset lies in 9..20; nodes of other domains need a TensorRT plugin;
* the operator is listed as supported; the element type of its data inputs is one the table lists
  (the inputs sharing the first input's type constraint in the ONNX schema, and ``Where``'s two
  branches): an int64 ``Clip`` or a BOOL ``ScatterElements`` does not parse. DOUBLE counts as FP32 (the
  table's note: TensorRT casts it down);
* ``TopK``: ``sorted`` must be 1, ``K`` must be below 3840 and at least 1 (ONNX requires a positive K;
  a K of 0 is proved impossible by :class:`~graph_passes.value_range.ValueRanges`, or reported);
* inputs the table says must be initializers (``axes`` of Reduce*, Slice, Squeeze, Unsqueeze and Pad;
  ``CumSum``'s ``axis``; ``OneHot``'s ``depth``) are constants;
* ``ScatterND`` has no ``reduction``; ``DequantizeLinear``/``QuantizeLinear`` zero points are zero;
  ``LayerNormalization`` and ``MaxPool`` use only their first output; ``Constant`` holds no sparse or
  string value.

What only a real TensorRT decides is not modelled: the restrictions on Resize modes, pooling
dimensions and recurrent layers (this project's graphs have none), kernel availability for a layer on a
given GPU, memory, and every build-time shape check of the optimization profile beyond the inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import onnx
import onnx_ir as ir

from graph_passes.base import constant_array, is_constant, iter_all_nodes, node_label
from graph_passes.value_range import ValueRanges

__all__ = [
    "OPSETS",
    "SOURCE",
    "SUPPORTED_TYPES",
    "TOPK_MAX_K",
    "UNSUPPORTED_OPS",
    "LintFinding",
    "parser_findings",
    "table_type",
]

#: Where the table comes from (named in every message that cites it).
SOURCE = "onnx-tensorrt docs/operators.md, ONNX-TensorRT 10.1 GA (TensorRT 10.x)"

#: The default-domain opsets the table covers (inclusive).
OPSETS = (9, 20)

#: TensorRT's TopK requires K < 3840.
TOPK_MAX_K = 3840

_FLOAT = ("FP32", "FP16", "BF16")
_NUMBER = (*_FLOAT, "INT32", "INT64")
_ANY = (*_NUMBER, "BOOL")


def _rows(types: tuple[str, ...], ops: str) -> dict[str, frozenset[str]]:
    return {op: frozenset(types) for op in ops.split()}


#: Operator -> the element types the table lists for its data (supported operators only).
SUPPORTED_TYPES: dict[str, frozenset[str]] = {
    **_rows(
        _FLOAT,
        "Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv ConvTranspose "
        "Cos Cosh CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool "
        "GroupNormalization GRU HardSigmoid HardSwish Hardmax ImageScaler InstanceNormalization IsInf "
        "LayerNormalization LeakyRelu Log LogSoftmax LRN LSTM LpNormalization LpPool MatMul MaxPool "
        "MeanVarianceNormalization ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike "
        "RandomUniform RandomUniformLike Reciprocal Resize RNN Round ScaledTanh Scan Selu Sigmoid Sin Sinh "
        "Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample",
    ),
    **_rows(
        _NUMBER,
        "Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual Max Min "
        "Mod Mul Neg Pad Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin "
        "ReduceProd ReduceSum ReduceSumSquare Relu Scatter ScatterElements ScatterND Shrink Sign SpaceToDepth "
        "Sub Sum TopK",
    ),
    **_rows(
        _ANY,
        "Concat Constant ConstantOfShape Expand EyeLike Flatten Gather GatherElements GatherND Identity If "
        "Loop OneHot Reshape ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze "
        "Where",
    ),
    **_rows(("FP32", "FP16"), "DeformConv GridSample Mish NonMaxSuppression NonZero RoiAlign"),
    **_rows(("BOOL",), "And Not Or Xor"),
    **_rows((*_ANY, "UINT8"), "Cast CastLike"),
    **_rows(("INT8", "FP8", "INT4"), "DequantizeLinear"),
    **_rows((*_NUMBER, "INT8"), "Gelu"),
    **_rows((*_NUMBER, "FP8"), "Mean"),
}

#: Operators the table lists as not supported.
UNSUPPORTED_OPS = frozenset(
    "AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow Col2Im "
    "CenterCropPad Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear HammingWindow "
    "HannWindow ImageDecoder MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial "
    "NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul "
    "RegexFullMatch STFT SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert "
    "SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer "
    "StringSplit TfIdfVectorizer Unique".split()
)

_TABLE_NAMES = {
    ir.DataType.FLOAT: "FP32",
    ir.DataType.DOUBLE: "FP32",  # "limited support": TensorRT casts DOUBLE down to FLOAT
    ir.DataType.FLOAT16: "FP16",
    ir.DataType.BFLOAT16: "BF16",
    ir.DataType.INT32: "INT32",
    ir.DataType.INT64: "INT64",
    ir.DataType.INT8: "INT8",
    ir.DataType.UINT8: "UINT8",
    ir.DataType.INT4: "INT4",
    ir.DataType.BOOL: "BOOL",
    ir.DataType.FLOAT8E4M3FN: "FP8",
}

#: (op, input index) -> what it is: inputs the table requires to be initializers (constants here).
_CONSTANT_INPUTS = {
    **{(f"Reduce{kind}", 1): "axes" for kind in "L1 L2 LogSum LogSumExp Max Mean Min Prod Sum SumSquare".split()},
    ("Slice", 3): "axes",
    ("Squeeze", 1): "axes",
    ("Unsqueeze", 1): "axes",
    ("Pad", 3): "axes",
    ("CumSum", 1): "axis",
    ("OneHot", 1): "depth",
}

#: (op, input index) -> what it is: zero points the table requires to be zero.
_ZERO_INPUTS = {("DequantizeLinear", 2): "x_zero_point", ("QuantizeLinear", 2): "y_zero_point"}

#: Ops of which TensorRT supports only the first output.
_FIRST_OUTPUT_ONLY = frozenset({"LayerNormalization", "MaxPool"})


@dataclasses.dataclass(frozen=True)
class LintFinding:
    """One TensorRT incompatibility: which node, its op type, and why (with the usual fix)."""

    node: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op_type}): {self.reason}"


def table_type(dtype: ir.DataType | None) -> str | None:
    """The table's name of an element type (FP32, INT64, ...); its ONNX name when the table has none."""
    if dtype is None:
        return None
    return _TABLE_NAMES.get(dtype, dtype.name)


def parser_findings(model: ir.Model) -> list[LintFinding]:
    """Every node of ``model`` TensorRT's ONNX parser refuses by its operator table (see the module doc)."""
    findings: list[LintFinding] = []
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is not None and not OPSETS[0] <= opset <= OPSETS[1]:
        findings.append(
            LintFinding(
                "<model>",
                "",
                f"default-domain opset {opset}; TensorRT 10.x parses opsets {OPSETS[0]} to {OPSETS[1]} "
                f"({SOURCE}); export with an opset in that range",
            )
        )
    ranges = ValueRanges(model)
    for node in iter_all_nodes(model.graph):
        findings.extend(
            LintFinding(node_label(node), node.op_type, reason)
            for reason in _node_reasons(node, opset or OPSETS[1], ranges)
        )
    return findings


def _node_reasons(node: ir.Node, opset: int, ranges: ValueRanges) -> Iterator[str]:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        yield (
            f"operator of domain {node.domain!r}: TensorRT's ONNX parser has no importer for it (it needs "
            "a TensorRT plugin); export it with standard ONNX operators"
        )
        return
    if op in UNSUPPORTED_OPS:
        yield f"{op} is listed as not supported ({SOURCE})"
        return
    allowed = SUPPORTED_TYPES.get(op)
    if allowed is None:
        yield f"{op} is not in TensorRT's operator table ({SOURCE}: opsets {OPSETS[0]} to {OPSETS[1]})"
        return
    refused = [
        (index, value.name, table_type(value.dtype))
        for index, value in _data_inputs(node, opset)
        if table_type(value.dtype) not in (None, *allowed)
    ]
    if refused:
        listed = ", ".join(f"input {index} ({name!r}) is {kind}" for index, name, kind in refused)
        yield f"{listed}; TensorRT's {op} takes {', '.join(sorted(allowed))} ({SOURCE})"
    for (kind, index), role in _CONSTANT_INPUTS.items():
        if kind == op and index < len(node.inputs) and node.inputs[index] is not None:
            if not is_constant(node.inputs[index]):
                yield f"{role} input is computed at run time; TensorRT needs it as an initializer"
    for (kind, index), role in _ZERO_INPUTS.items():
        if kind == op and index < len(node.inputs) and node.inputs[index] is not None:
            array = constant_array(node.inputs[index])
            if array is None or array.any():
                yield f"{role} is not a constant zero; TensorRT takes symmetric quantization only"
    if op in _FIRST_OUTPUT_ONLY and any(_is_used(v) for v in node.outputs[1:]):
        yield f"only the first output of {op} is supported by TensorRT"
    if op == "ScatterND":
        reduction = node.attributes.get("reduction")
        mode = reduction.as_string() if isinstance(reduction, ir.Attr) else "none"
        if mode != "none":
            yield f"ScatterND reduction={mode!r}; TensorRT supports only reduction='none'"
    if op == "Constant" and any(
        key in node.attributes for key in ("sparse_value", "value_string", "value_strings")
    ):
        yield "Constant with a sparse or string value; TensorRT takes dense numeric constants only"
    if op == "TopK":
        yield from _topk_reasons(node, ranges)


def _topk_reasons(node: ir.Node, ranges: ValueRanges) -> Iterator[str]:
    sorted_attr = node.attributes.get("sorted")
    if isinstance(sorted_attr, ir.Attr) and sorted_attr.as_int() == 0:
        yield "TopK sorted=0; TensorRT requires sorted=1"
    k_value = node.inputs[1] if len(node.inputs) > 1 else None
    if k_value is None:  # opset < 10: K is an attribute
        k_attr = node.attributes.get("k")
        low = high = float(k_attr.as_int()) if isinstance(k_attr, ir.Attr) else float("nan")
    else:
        low, high = ranges.of(k_value)
    if high >= TOPK_MAX_K and high != float("inf"):
        yield f"TopK K can reach {int(high)}; TensorRT requires K < {TOPK_MAX_K}"
    if not low >= 1:
        proved = "nothing bounds it from below" if low == float("-inf") else f"the graph proves only K >= {low:g}"
        yield (
            f"TopK K is not proved >= 1 ({proved}); ONNX requires a positive K (OpenVINO refuses K = 0): ask "
            "for K + 1 of the input padded with one element that sorts last, and drop the last"
        )


def _data_inputs(node: ir.Node, opset: int) -> Iterator[tuple[int, ir.Value]]:
    """The inputs whose element type the table describes (see the module doc)."""
    inputs = list(node.inputs)
    if node.op_type == "Where":
        positions = [1, 2]
    else:
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, "")
        except onnx.defs.SchemaError:
            positions = [0]
        else:
            formal = [p.type_str for p in schema.inputs]
            if not formal:
                positions = []
            else:
                lead = formal[0]
                positions = [i for i in range(len(inputs)) if formal[min(i, len(formal) - 1)] == lead]
    for index in positions:
        if index < len(inputs) and inputs[index] is not None:
            yield index, inputs[index]


def _is_used(value: ir.Value) -> bool:
    return bool(value.uses()) or value.is_graph_output()
