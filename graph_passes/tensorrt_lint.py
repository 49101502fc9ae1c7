"""TensorRT lint: find the ops and patterns TensorRT rejects or builds badly, before building.

An engine build takes minutes on a GPU and fails with one error at a time, often deep inside Myelin
for a data-dependent shape. This lint runs on CPU in milliseconds and lists every offending node at
once, with the reason and the usual fix. It holds two kinds of rule:

* what TensorRT's ONNX parser refuses, by its published operator table
  (:mod:`graph_passes.tensorrt_parser`: op, opset, element types, TopK's K, constant axes, ...);
* what parses but builds badly, this project's rules: ``NonZero`` (a data-dependent output shape) and
  shape inputs computed from data.

docs/build.md, section "TensorRT constraints", explains each of them.
"""

from __future__ import annotations

import onnx_ir as ir

from graph_passes.base import INT_TYPES, GraphPass, is_constant, iter_all_nodes, node_label
from graph_passes.bound_shapes import MAX_SHAPE_TENSOR_VALUES
from graph_passes.tensorrt_parser import TOPK_MAX_K, LintFinding, parser_findings
from prune_core.errors import BuildError

__all__ = [
    "TOPK_MAX_K",
    "LintFinding",
    "TensorRTLintPass",
    "lint_tensorrt",
]

#: Ops the parser takes (for some types) that this project keeps out of TensorRT graphs.
_POLICY = {
    "NonZero": "NonZero has a data-dependent output shape (Myelin build failures); keep pruned "
    "lengths in shape tensors (TopK with K from an int64 input) instead of boolean masks",
}

#: ``(op_type, input index) -> what the input means``: inputs TensorRT needs as shape tensors.
SHAPE_INPUTS: dict[tuple[str, int], str] = {
    ("Reshape", 1): "shape",
    ("Expand", 1): "shape",
    ("Slice", 1): "starts",
    ("Slice", 2): "ends",
    ("Slice", 3): "axes",
    ("Slice", 4): "steps",
    ("TopK", 1): "K",
    ("Range", 0): "start",
    ("Range", 1): "limit",
    ("Range", 2): "delta",
    ("ConstantOfShape", 0): "shape",
    ("Tile", 1): "repeats",
    ("Pad", 1): "pads",
}

#: Ops that compute shape values from shape values (their result is data-dependent only if one of
#: their inputs is).
_SHAPE_ARITHMETIC = frozenset(
    {
        "Abs", "Add", "And", "Cast", "CastLike", "Ceil", "Clip", "Concat", "ConstantOfShape", "Div",
        "Equal", "Expand", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Greater",
        "GreaterOrEqual", "Identity", "Less", "LessOrEqual", "Max", "Min", "Mod", "Mul", "Neg", "Not",
        "Or", "Range", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSum", "Reshape", "Round",
        "Sign", "Slice", "Split", "Squeeze", "Sub", "Sum", "Tile", "Transpose", "Unsqueeze",
        "Where", "Xor",
    }
)  # fmt: skip


def lint_tensorrt(model: ir.Model) -> list[LintFinding]:
    """All TensorRT findings of ``model`` (main graph and subgraphs): the parser's, then this project's.

    The parser's (:func:`~graph_passes.tensorrt_parser.parser_findings`): opset, domain, operator and
    element types against TensorRT's operator table; ``TopK`` with ``sorted=0``, a ``K`` that can reach
    3840 or is not proved to be at least 1 (by :class:`~graph_passes.value_range.ValueRanges`, which
    reads the input value ranges :class:`~graph_passes.bound_shapes.BoundShapesPass` records); axes
    computed at run time; ScatterND reductions; non-zero quantization zero points.

    This project's: ``NonZero``; and data-dependent shapes: a shape-consuming input
    (:data:`SHAPE_INPUTS`: Reshape/Expand shape, Slice starts/ends/axes/steps, TopK K, Range
    start/limit/delta, ConstantOfShape input, Tile repeats, Pad pads) whose value is not a *shape
    computation*. That rule, traced backwards through the producers of the input:

    * allowed sources: constants and initializers; ``Shape``/``Size`` of anything; integer graph
      inputs that can be TensorRT shape tensors (scalars, or 1-D with at most 64 static values,
      such as a keep count K or a per-layer K vector; unknown rank is given the benefit of the
      doubt);
    * allowed steps: arithmetic, comparison, ``Cast``, ``Gather``, ``Concat``, ``(Un)Squeeze``,
      ``Slice``, ``Reshape``, ``Where``, ``Min``/``Max``, reductions, ... (:data:`_SHAPE_ARITHMETIC`)
      whose inputs all trace back to allowed sources; a float value is fine only when computed
      from allowed sources (``Cast(Shape(x), FLOAT) / 2`` is a shape computation);
    * anything else is data: a float or bool graph input, an integer graph input of higher rank
      (``input_ids``, ``attention_mask``: execution tensors in TensorRT), or any other op (MatMul,
      ArgMax, TopK outputs, NonZero, ReduceSum of activations reaches the activation, ...).
    """
    findings = parser_findings(model)
    tracer = _ShapeTracer()
    for node in iter_all_nodes(model.graph):
        if node.domain != "":
            continue
        op = node.op_type
        if op in _POLICY:
            findings.append(LintFinding(node_label(node), op, _POLICY[op]))
        for index, value in enumerate(node.inputs):
            role = SHAPE_INPUTS.get((op, index))
            if role is None or value is None:
                continue
            origin = tracer.data_origin(value)
            if origin is not None:
                findings.append(
                    LintFinding(
                        node_label(node),
                        op,
                        f"{role} input {value.name!r} is data-dependent (derives from {origin}); "
                        "derive it from Shape() of inputs or an int64 shape-tensor input",
                    )
                )
    return findings


class TensorRTLintPass(GraphPass):
    """Fail the build (:class:`BuildError`) when :func:`lint_tensorrt` finds anything.

    Rewrite: none (``modified`` is always ``False``); it only checks. Must not fire on a graph
    with no findings. The error lists every finding, one per line.
    """

    def apply(self, model: ir.Model) -> bool | None:
        findings = lint_tensorrt(model)
        if findings:
            listing = "\n  ".join(str(f) for f in findings)
            raise BuildError(
                f"the graph has {len(findings)} TensorRT incompatibilit"
                f"{'y' if len(findings) == 1 else 'ies'}:\n  {listing}\n"
                "Fix the exporter (see docs/build.md, section \"TensorRT constraints\") or build for "
                "onnxruntime instead (target='onnxruntime')."
            )
        return False


# --------------------------------------------------------------------------------------------------


def _is_shape_tensor_like(value: ir.Value) -> bool:
    shape = value.shape
    if shape is None:
        return True
    if shape.rank() == 0:
        return True
    return shape.rank() == 1 and isinstance(shape[0], int) and shape[0] <= MAX_SHAPE_TENSOR_VALUES


class _ShapeTracer:
    """Memoised backward walk deciding whether a value is a shape computation (see the rule)."""

    def __init__(self) -> None:
        self._origin: dict[ir.Value, str | None] = {}

    def data_origin(self, value: ir.Value) -> str | None:
        """``None`` if ``value`` is a shape computation, else a description of the data it uses."""
        stack = [value]
        while stack:
            current = stack[-1]
            if current in self._origin:
                stack.pop()
                continue
            verdict, inputs = self._local(current)
            if inputs is None:
                self._origin[current] = verdict
                stack.pop()
                continue
            pending = [v for v in inputs if v not in self._origin]
            if pending:
                stack.extend(pending)
                continue
            self._origin[current] = next(
                (self._origin[v] for v in inputs if self._origin[v] is not None), None
            )
            stack.pop()
        return self._origin[value]

    @staticmethod
    def _local(value: ir.Value) -> tuple[str | None, list[ir.Value] | None]:
        """Immediate verdict ``(origin, None)``, or ``(None, inputs)`` to decide from the inputs."""
        if is_constant(value):
            return None, None
        if value.is_graph_input():
            name = value.name
            if value.dtype in INT_TYPES:
                if _is_shape_tensor_like(value):
                    return None, None
                reason = (
                    f"integer data input {name!r} of shape {value.shape} (TensorRT shape "
                    f"tensors are scalars or 1-D with <= {MAX_SHAPE_TENSOR_VALUES} values)"
                )
                return reason, None
            return f"{value.dtype} graph input {name!r}", None
        producer = value.producer()
        if producer is None:
            return f"value {value.name!r} with no producer (subgraph input)", None
        op = producer.op_type
        if producer.domain == "" and op in ("Shape", "Size"):
            return None, None
        if producer.domain == "" and op in _SHAPE_ARITHMETIC:
            return None, [v for v in producer.inputs if v is not None]
        return f"{op} node {node_label(producer)!r}", None
