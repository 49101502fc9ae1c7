"""Census of a graph: op counts and matrix-multiply FLOPs at concrete input shapes and values.

FLOPs reported for a pruned graph must be computed from the graph that will run, not typed in or
taken from the cost model that produced the plan: this is the independent check that an exported
graph really does the work the plan promised. Pruned prefill graphs pick tokens with ``TopK`` whose
``K`` is a graph input, so shapes depend on input *values*; the census therefore takes concrete
values for integer inputs and resolves shapes either by ONNX shape inference with those values
folded in as constants, or, where inference cannot resolve a shape, by running the graph once in
ONNX Runtime with every matmul operand exposed as an extra output.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir

from graph_passes.base import node_label
from prune_core.errors import BuildError

__all__ = ["GraphCensus", "MatMulCost", "census", "matmul_flops"]

_MATMUL_OPS = ("MatMul", "Gemm", "Einsum")
#: Initializers up to this many elements are kept as constants during shape inference (shape
#: arithmetic needs their values); larger ones become typed inputs so the proto stays small.
_INFERENCE_CONST_LIMIT = 4096
#: onnxruntime 1.31 reads at most this IR version.
_ORT_MAX_IR_VERSION = 13

Method = Literal["auto", "shape_inference", "symbolic", "static", "onnxruntime"]


@dataclasses.dataclass(frozen=True)
class MatMulCost:
    """FLOPs of one matrix product: ``2 * batch * M * K * N`` at the operand shapes seen."""

    node: str
    op_type: str
    operand_shapes: tuple[tuple[int, ...], ...]
    flops: int


@dataclasses.dataclass(frozen=True)
class GraphCensus:
    """What a graph contains and what its matrix products cost at the given inputs.

    Attributes:
        op_counts: node count per op type in the main graph (``domain::op`` outside ai.onnx).
        matmul_flops: sum of :attr:`MatMulCost.flops` over ``per_node``.
        per_node: one entry per MatMul/Gemm/Einsum of the main graph, in graph order.
        method: how shapes were resolved: ``"shape_inference"`` or ``"onnxruntime"``.
        uncounted: products whose FLOPs this census cannot express (e.g. Einsum with ``...``).
    """

    op_counts: dict[str, int]
    matmul_flops: int
    per_node: list[MatMulCost]
    method: str
    uncounted: list[str] = dataclasses.field(default_factory=list)


def census(
    model: ir.Model | onnx.ModelProto | str | os.PathLike[str],
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    input_values: Mapping[str, np.ndarray | int | Sequence[int]] | None = None,
    *,
    method: Method = "auto",
) -> GraphCensus:
    """Count ops and matmul FLOPs of ``model`` for concrete inputs.

    Args:
        model: an onnx-ir model, an ONNX proto, or a path (external data is resolved).
        input_shapes: concrete shape for each graph input with dynamic dims (those given values
            take their shape from the value).
        input_values: values for inputs whose *values* steer shapes (keep counts K, spans);
            required for integer scalar inputs.
        method: ``"shape_inference"`` (fast, no weights needed; fails if a shape stays
            unresolved), ``"symbolic"`` (ONNX Runtime's symbolic shape inference, which follows shape
            arithmetic further: a GSOP graph's per-group row counts; no weights needed either),
            ``"static"`` (shape inference, then symbolic: never runs the graph), ``"onnxruntime"`` (runs
            the graph once on CPU; zeros for inputs without values), or ``"auto"`` (inference first,
            onnxruntime when it leaves shapes unresolved).

    Raises:
        BuildError: an input is missing a shape or value, a shape conflicts with the graph, or
            the requested method cannot resolve the operand shapes.
    """
    if method not in ("auto", "shape_inference", "symbolic", "static", "onnxruntime"):
        raise BuildError(
            f"unknown census method {method!r}; expected 'auto', 'shape_inference', 'symbolic', 'static' or "
            "'onnxruntime'"
        )
    ir_model = _as_ir_model(model)
    feeds = _concrete_inputs(ir_model.graph, input_shapes or {}, input_values or {})
    nodes = [n for n in ir_model.graph if n.domain == "" and n.op_type in _MATMUL_OPS]

    operand_shapes: dict[str, tuple[int, ...]] | None = None
    used = "shape_inference"
    if method in ("auto", "shape_inference", "static"):
        operand_shapes = _shapes_by_inference(ir_model, feeds, nodes)
        if operand_shapes is None and method == "shape_inference":
            raise BuildError(
                "ONNX shape inference could not resolve every matmul operand shape; use "
                "method='onnxruntime' (runs the graph once) or 'auto'"
            )
    if operand_shapes is None and method in ("symbolic", "static"):
        operand_shapes = _shapes_by_symbolic_inference(ir_model, feeds, nodes)
        used = "symbolic"
        if operand_shapes is None:
            raise BuildError(
                "neither ONNX shape inference nor ONNX Runtime's symbolic shape inference could resolve every "
                "matmul operand shape (a shape depends on the inputs' values); use method='onnxruntime' "
                "(runs the graph once) or 'auto'"
            )
    if operand_shapes is None:
        operand_shapes = _shapes_by_onnxruntime(ir_model, feeds, nodes)
        used = "onnxruntime"

    per_node: list[MatMulCost] = []
    uncounted: list[str] = []
    for node in nodes:
        shapes = tuple(operand_shapes[_key(v)] for v in _product_operands(node))
        flops = matmul_flops(node, shapes)
        if flops is None:
            uncounted.append(f"{node_label(node)} ({node.op_type})")
            continue
        per_node.append(MatMulCost(node_label(node), node.op_type, shapes, flops))

    counts = collections.Counter(
        n.op_type if n.domain == "" else f"{n.domain}::{n.op_type}" for n in ir_model.graph
    )
    return GraphCensus(
        op_counts=dict(sorted(counts.items())),
        matmul_flops=sum(c.flops for c in per_node),
        per_node=per_node,
        method=used,
        uncounted=uncounted,
    )


def matmul_flops(node: ir.Node, shapes: Sequence[Sequence[int]]) -> int | None:
    """FLOPs (2 per multiply-add) of a MatMul/Gemm/Einsum with these operand shapes.

    Bias additions, ``alpha``/``beta`` scaling and broadcasting copies are not counted: the
    figure is the multiply-accumulate work, the part that dominates prefill time. Returns
    ``None`` for products it cannot express (Einsum with ``...`` or other than two operands).
    """
    if node.op_type == "MatMul":
        a, b = (list(s) for s in shapes[:2])
        if len(a) == 1:
            a = [1, *a]
        if len(b) == 1:
            b = [*b, 1]
        batch = math.prod(np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])))
        return 2 * batch * a[-2] * a[-1] * b[-1]
    if node.op_type == "Gemm":
        a, b = shapes[:2]
        trans_a = node.attributes.get("transA")
        trans_b = node.attributes.get("transB")
        m, k = (a[1], a[0]) if isinstance(trans_a, ir.Attr) and trans_a.as_int() else (a[0], a[1])
        n = b[0] if isinstance(trans_b, ir.Attr) and trans_b.as_int() else b[1]
        return 2 * m * k * n
    if node.op_type == "Einsum":
        equation_attr = node.attributes.get("equation")
        if not isinstance(equation_attr, ir.Attr) or len(shapes) != 2:
            return None
        equation = equation_attr.as_string().replace(" ", "")
        if "..." in equation:
            return None
        operands = equation.split("->")[0].split(",")
        sizes: dict[str, int] = {}
        for letters, shape in zip(operands, shapes, strict=True):
            if len(letters) != len(shape):
                return None
            for letter, size in zip(letters, shape, strict=True):
                sizes[letter] = max(sizes.get(letter, 1), size)
        return 2 * math.prod(sizes.values())
    return None


# --------------------------------------------------------------------------------------------------


def _as_ir_model(model: ir.Model | onnx.ModelProto | str | os.PathLike[str]) -> ir.Model:
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.from_proto(model)
    return ir.load(os.fspath(model))


def _key(value: ir.Value) -> str:
    return value.name or f"<anon:{id(value)}>"


def _concrete_inputs(
    graph: ir.Graph,
    shapes: Mapping[str, Sequence[int]],
    values: Mapping[str, np.ndarray | int | Sequence[int]],
) -> dict[str, np.ndarray]:
    """A concrete array for every graph input: the given value, else zeros of the given shape."""
    known = [v.name for v in graph.inputs if not v.is_initializer()]
    unknown = sorted((set(shapes) | set(values)) - set(known))
    if unknown:
        raise BuildError(f"census got inputs the graph does not have: {unknown} (inputs: {known})")
    feeds: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for value in graph.inputs:
        if value.is_initializer():
            continue
        name = value.name
        assert name is not None
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        if name in values:
            array = np.asarray(values[name], dtype=dtype)
        else:
            if value.dtype in _INTEGER and value.shape is not None and value.shape.rank() == 0:
                problems.append(f"{name!r}: integer scalar input needs a value (input_values)")
                continue
            if name in shapes:
                shape = tuple(int(d) for d in shapes[name])
            elif value.shape is not None and value.shape.is_static():
                shape = tuple(int(d) for d in value.shape)  # type: ignore[arg-type]
            else:
                problems.append(f"{name!r}: dynamic shape {value.shape} needs input_shapes")
                continue
            array = np.zeros(shape, dtype=dtype)
        if value.shape is not None:
            declared = list(value.shape)
            if len(declared) != array.ndim or any(
                isinstance(d, int) and d != s for d, s in zip(declared, array.shape, strict=True)
            ):
                problems.append(f"{name!r}: shape {array.shape} conflicts with the graph's {value.shape}")
                continue
        feeds[name] = array
    if problems:
        raise BuildError("census inputs are incomplete:\n  " + "\n  ".join(problems))
    return feeds


_INTEGER = frozenset(
    {
        ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
        ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64,
    }
)  # fmt: skip


def _product_operands(node: ir.Node) -> list[ir.Value]:
    """The multiplied operands: A and B (not Gemm's bias C), or every Einsum operand."""
    inputs = node.inputs if node.op_type == "Einsum" else node.inputs[:2]
    return [v for v in inputs if v is not None]


def _operands(nodes: Sequence[ir.Node]) -> list[ir.Value]:
    seen: dict[str, ir.Value] = {}
    for node in nodes:
        for value in _product_operands(node):
            seen.setdefault(_key(value), value)
    return list(seen.values())


def _inference_proto(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The graph without weights for shape inference: integer feeds folded in as constants, float inputs
    typed with their feeds' shapes, small initializers kept (shape arithmetic reads them), large ones typed
    inputs (their data is never read)."""
    proto = ir.to_proto(model)
    graph = proto.graph
    del graph.value_info[:]
    for output in graph.output:
        output.type.tensor_type.ClearField("shape")
    del graph.initializer[:]
    for init in model.graph.initializers.values():
        tensor = init.const_value
        if tensor is None or init.is_graph_input():
            continue
        if tensor.size <= _INFERENCE_CONST_LIMIT:
            graph.initializer.append(onnx.numpy_helper.from_array(tensor.numpy(), init.name))
        else:
            graph.input.append(
                onnx.helper.make_tensor_value_info(init.name, int(tensor.dtype), list(tensor.shape))
            )
    inputs = list(graph.input)
    del graph.input[:]
    for inp in inputs:
        array = feeds.get(inp.name)
        if array is None:
            graph.input.append(inp)
        elif np.issubdtype(array.dtype, np.integer):
            graph.initializer.append(onnx.numpy_helper.from_array(array, inp.name))
        else:
            graph.input.append(
                onnx.helper.make_tensor_value_info(
                    inp.name, inp.type.tensor_type.elem_type, list(array.shape)
                )
            )
    return proto


def _known_shapes(inferred: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    known: dict[str, tuple[int, ...]] = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
            continue
        dims = info.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            known[info.name] = tuple(int(d.dim_value) for d in dims)
    for init in inferred.graph.initializer:
        known[init.name] = tuple(int(d) for d in init.dims)
    return known


def _operand_shapes(
    known: Mapping[str, tuple[int, ...]], nodes: Sequence[ir.Node]
) -> dict[str, tuple[int, ...]] | None:
    shapes: dict[str, tuple[int, ...]] = {}
    for value in _operands(nodes):
        shape = known.get(_key(value))
        if shape is None:
            return None
        shapes[_key(value)] = shape
    return shapes


def _shapes_by_inference(
    model: ir.Model, feeds: Mapping[str, np.ndarray], nodes: Sequence[ir.Node]
) -> dict[str, tuple[int, ...]] | None:
    """Operand shapes from ONNX shape inference with integer feeds folded in as constants."""
    proto = _inference_proto(model, feeds)
    try:
        inferred = onnx.shape_inference.infer_shapes(
            proto, check_type=False, strict_mode=False, data_prop=True
        )
    except Exception:  # noqa: BLE001 - any inference failure means "unresolved", not an error
        return None
    return _operand_shapes(_known_shapes(inferred), nodes)


def _shapes_by_symbolic_inference(
    model: ir.Model, feeds: Mapping[str, np.ndarray], nodes: Sequence[ir.Node]
) -> dict[str, tuple[int, ...]] | None:
    """Operand shapes from ONNX Runtime's symbolic shape inference (no weights read, nothing run)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference  # lazy: only this path

    proto = _inference_proto(model, feeds)
    try:
        inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
    except Exception:  # noqa: BLE001 - any inference failure means "unresolved", not an error
        return None
    if inferred is None:
        return None
    return _operand_shapes(_known_shapes(inferred), nodes)


def _shapes_by_onnxruntime(
    model: ir.Model, feeds: Mapping[str, np.ndarray], nodes: Sequence[ir.Node]
) -> dict[str, tuple[int, ...]]:
    """Operand shapes read from one onnxruntime run with every operand exposed as an output."""
    import onnxruntime as ort  # lazy: heavy import, only this path needs it

    shapes: dict[str, tuple[int, ...]] = {}
    wanted: list[str] = []
    for value in _operands(nodes):
        if value.const_value is not None:
            shapes[_key(value)] = tuple(int(d) for d in value.const_value.shape)
        elif value.is_graph_input():
            shapes[_key(value)] = tuple(feeds[_key(value)].shape)
        else:
            wanted.append(_key(value))
    if not wanted:
        return shapes

    copy = model.clone()
    by_name = {v.name: v for v in copy.graph.inputs}
    by_name.update({out.name: out for node in copy.graph for out in node.outputs})
    present = {v.name for v in copy.graph.outputs}
    for name in wanted:
        if name not in present:
            copy.graph.outputs.append(by_name[name])
    copy.ir_version = min(copy.ir_version, _ORT_MAX_IR_VERSION)

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="census-") as tmp:
        path = os.path.join(tmp, "census.onnx")
        ir.save(copy, path, external_data="census.onnx.data")
        try:
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            results = session.run(names, dict(feeds))
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise BuildError(f"onnxruntime could not run the graph for the census: {err}") from err
    by_output = dict(zip(names, results, strict=True))
    for name in wanted:
        shapes[name] = tuple(int(d) for d in np.shape(by_output[name]))
    return shapes
