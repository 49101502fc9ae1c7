"""Value ranges: the interval every element of a value lies in, proved from the graph alone.

A sound over-approximation, computed backwards from a value through its producers: constants and
initializers give their own minimum and maximum, an integer graph input the range recorded by
:class:`~graph_passes.bound_shapes.BoundShapesPass` (unbounded without one), ``Shape`` and ``Size``
are never negative, and arithmetic (``Add``, ``Sub``, ``Mul``, ``Div``, ``Min``, ``Max``, ``Clip``,
``Floor``, ...) combines its operands' intervals. Anything the rules do not cover (a ``MatMul``, a
``Softmax``) is unbounded, so a bound stated here always holds, and a bound that does not follow
from the graph is never claimed.

One refinement reads a relation the intervals alone lose: ``Where(a > b, b, a)`` is ``min(a, b)``
(and the three other spellings of ``min``/``max`` by a comparison), which the exporter writes for
``torch.where(k > n, n, k)``.

Used to prove a ``TopK``'s ``K`` is at least 1 (the ONNX spec; OpenVINO refuses ``K = 0``) and below
TensorRT's limit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from graph_passes.base import INT_TYPES, constant_array
from graph_passes.bound_shapes import SHAPE_BOUNDS_KEY

__all__ = ["UNBOUNDED", "Interval", "ValueRanges"]

#: ``(low, high)``, both inclusive; ``-inf``/``inf`` where nothing is known.
Interval = tuple[float, float]

UNBOUNDED: Interval = (-math.inf, math.inf)

#: Ops whose output holds values of their first input only (moved, repeated or selected).
_MOVES_FIRST = frozenset(
    {
        "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Tile", "Slice", "Gather",
        "GatherElements", "GatherND", "Transpose", "Split", "ReduceMin", "ReduceMax", "Sort",
    }
)  # fmt: skip

#: Ops whose output is a truth value (0 or 1 when read as a number).
_BOOLEAN = frozenset(
    {"Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor", "Not", "IsNaN", "IsInf"}
)

#: Ops whose output is an index: never negative.
_NON_NEGATIVE = frozenset({"ArgMax", "ArgMin", "NonZero"})


def _safe(value: float, fallback: float) -> float:
    return fallback if math.isnan(value) else value


def _floor(value: float) -> float:
    return value if math.isinf(value) else float(math.floor(value))


def _ceil(value: float) -> float:
    return value if math.isinf(value) else float(math.ceil(value))


def _add(a: Interval, b: Interval) -> Interval:
    return _safe(a[0] + b[0], -math.inf), _safe(a[1] + b[1], math.inf)


def _neg(a: Interval) -> Interval:
    return -a[1], -a[0]


def _mul(a: Interval, b: Interval) -> Interval:
    products = [x * y for x in a for y in b]
    if any(math.isnan(p) for p in products):  # 0 * inf: nothing is known
        return UNBOUNDED
    return min(products), max(products)


def _div(a: Interval, b: Interval) -> Interval:
    if b[0] <= 0 <= b[1]:
        return UNBOUNDED
    return _mul(a, (1 / b[1], 1 / b[0]))


def _truncated(a: Interval) -> Interval:
    """An integer division's result: the real quotient rounded toward zero stays within these."""
    return _floor(a[0]), _ceil(a[1])


def _hull(intervals: list[Interval]) -> Interval:
    if not intervals:
        return UNBOUNDED
    return min(i[0] for i in intervals), max(i[1] for i in intervals)


def _minimum(intervals: list[Interval]) -> Interval:
    return min(i[0] for i in intervals), min(i[1] for i in intervals)


def _maximum(intervals: list[Interval]) -> Interval:
    return max(i[0] for i in intervals), max(i[1] for i in intervals)


def _array_interval(array: np.ndarray) -> Interval:
    if array.size == 0 or array.dtype.kind not in "biuf":
        return UNBOUNDED
    values = array.astype(np.float64)
    if np.isnan(values).any():
        return UNBOUNDED
    return float(values.min()), float(values.max())


class ValueRanges:
    """Memoised intervals of the values of one model (see the module docstring for the rules)."""

    def __init__(self, model: ir.Model) -> None:
        self._recorded, self._dims = _recorded_bounds(model)
        self._known: dict[ir.Value, Interval] = {}

    def of(self, value: ir.Value) -> Interval:
        """The interval every element of ``value`` lies in (``UNBOUNDED`` when nothing is known)."""
        stack = [value]
        while stack:
            current = stack[-1]
            if current in self._known:
                stack.pop()
                continue
            leaf, inputs, combine = self._rule(current)
            if leaf is not None:
                self._known[current] = leaf
                stack.pop()
                continue
            pending = [v for v in inputs if v not in self._known]
            if pending:
                stack.extend(pending)
                continue
            low, high = combine([self._known[v] for v in inputs])
            self._known[current] = (_safe(low, -math.inf), _safe(high, math.inf))
            stack.pop()
        return self._known[value]

    def _rule(
        self, value: ir.Value
    ) -> tuple[Interval | None, list[ir.Value], Callable[[list[Interval]], Interval]]:
        """``(interval, [], _)`` when known at once, else the inputs to wait for and how to combine them."""
        array = constant_array(value)
        if array is not None:
            return _array_interval(array), [], _hull
        if value.is_graph_input():
            if value.dtype == ir.DataType.BOOL:
                return (0.0, 1.0), [], _hull
            return self._recorded.get(value.name, UNBOUNDED), [], _hull
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            return UNBOUNDED, [], _hull
        op = node.op_type
        ins = list(node.inputs)
        first = ins[0] if ins else None
        if op in _BOOLEAN:
            return (0.0, 1.0), [], _hull
        if op in ("Shape", "Size"):
            return self._shape(node), [], _hull
        if op in _NON_NEGATIVE:
            return (0.0, math.inf), [], _hull
        if op == "Gather" and first is not None:
            dim = self._gathered_dim(node)
            if dim is not None:
                return dim, [], _hull
        if op == "TopK":
            if value is node.outputs[1]:
                return (0.0, math.inf), [], _hull
            return None, [first], _hull
        if op in ("Cast", "CastLike"):
            to = value.dtype
            if to == ir.DataType.BOOL:
                return (0.0, 1.0), [], _hull
            if to in INT_TYPES:  # truncation toward zero stays within the floor/ceil of the bounds
                return None, [first], lambda r: (_floor(r[0][0]), _ceil(r[0][1]))
            return None, [first], _hull
        if op in _MOVES_FIRST and first is not None:
            return None, [first], lambda r: r[0]
        operands = [v for v in ins if v is not None]
        if not operands:
            return UNBOUNDED, [], _hull
        simple: dict[str, Callable[[list[Interval]], Interval]] = {
            "Concat": _hull,
            "Add": lambda r: _add(r[0], r[1]),
            "Sum": lambda r: (sum(i[0] for i in r), sum(i[1] for i in r)),
            "Sub": lambda r: _add(r[0], _neg(r[1])),
            "Mul": lambda r: _mul(r[0], r[1]),
            "Div": lambda r: _truncated(_div(r[0], r[1])) if value.dtype in INT_TYPES else _div(r[0], r[1]),
            "Neg": lambda r: _neg(r[0]),
            "Abs": lambda r: (max(r[0][0], -r[0][1], 0.0), max(abs(r[0][0]), abs(r[0][1]))),
            "Relu": lambda r: (max(r[0][0], 0.0), max(r[0][1], 0.0)),
            "Floor": lambda r: (_floor(r[0][0]), _floor(r[0][1])),
            "Ceil": lambda r: (_ceil(r[0][0]), _ceil(r[0][1])),
            "Round": lambda r: (_floor(r[0][0]), _ceil(r[0][1])),
            "Min": _minimum,
            "Max": _maximum,
            "Clip": lambda r: _clip(r, node),
            "Range": lambda r: _hull(r[:2]),
        }
        if op == "Where" and len(ins) == 3:
            chosen = _min_max_spelling(node)
            if chosen is not None:
                kind, a, b = chosen
                return None, [a, b], _minimum if kind == "min" else _maximum
            return None, [ins[1], ins[2]], _hull
        if op in simple:
            return None, operands, simple[op]
        return UNBOUNDED, [], _hull

    def _dim(self, dim: object) -> Interval:
        """One dimension: its value when static, its recorded bounds when named, else ``[0, inf)``."""
        if isinstance(dim, int):
            return float(dim), float(dim)
        name = getattr(dim, "value", None)
        return self._dims.get(name, (0.0, math.inf)) if isinstance(name, str) else (0.0, math.inf)

    def _picked_dims(self, node: ir.Node) -> list[object] | None:
        """The dims a ``Shape`` node returns (its ``start``/``end``), or None when its input has no shape."""
        source = node.inputs[0] if node.inputs else None
        if source is None or source.shape is None:
            return None
        start, end = node.attributes.get("start"), node.attributes.get("end")
        return list(source.shape)[
            (start.as_int() if isinstance(start, ir.Attr) else 0) : (end.as_int() if isinstance(end, ir.Attr) else None)
        ]

    def _shape(self, node: ir.Node) -> Interval:
        """``Shape``: the hull of its dims; ``Size``: their product when all are static; never negative."""
        if node.op_type == "Size":
            source = node.inputs[0] if node.inputs else None
            if source is not None and source.shape is not None and all(isinstance(d, int) for d in source.shape):
                size = float(np.prod([int(d) for d in source.shape]))
                return size, size
            return 0.0, math.inf
        dims = self._picked_dims(node)
        if not dims:
            return 0.0, math.inf
        return _hull([self._dim(d) for d in dims])

    def _gathered_dim(self, node: ir.Node) -> Interval | None:
        """``Gather(Shape(x), i)`` with a constant scalar ``i``: that one dimension."""
        data, index = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
        shape_node = data.producer() if data is not None else None
        if shape_node is None or shape_node.op_type != "Shape" or index is None:
            return None
        picked = self._picked_dims(shape_node)
        array = constant_array(index)
        if picked is None or array is None or array.size != 1:
            return None
        position = int(array.reshape(-1)[0])
        if not -len(picked) <= position < len(picked):
            return None
        return self._dim(picked[position])


def _clip(intervals: list[Interval], node: ir.Node) -> Interval:
    """``Clip(x, min, max)``; an absent bound leaves that side as it is."""
    low, high = intervals[0]
    ins = list(node.inputs)
    given = [v is not None for v in ins[1:3]] + [False, False]
    index = 1
    if given[0]:
        low, high = max(low, intervals[index][0]), max(high, intervals[index][0])
        index += 1
    if given[1]:
        low, high = min(low, intervals[index][1]), min(high, intervals[index][1])
    return low, high


def _min_max_spelling(node: ir.Node) -> tuple[str, ir.Value, ir.Value] | None:
    """``Where(a > b, b, a)`` and its kin as ``("min" | "max", a, b)``; None for any other Where."""
    cond, x, y = node.inputs
    test = cond.producer() if cond is not None else None
    if test is None or test.op_type not in ("Greater", "GreaterOrEqual", "Less", "LessOrEqual"):
        return None
    a, b = test.inputs[0], test.inputs[1]
    if {x, y} != {a, b} or a is b:
        return None
    a_wins = x is a  # the value taken where the comparison holds is its left operand
    if test.op_type in ("Greater", "GreaterOrEqual"):
        return ("max" if a_wins else "min"), a, b
    return ("min" if a_wins else "max"), a, b


def _recorded_bounds(model: ir.Model) -> tuple[dict[str, Interval], dict[str, Interval]]:
    """The ranges BoundShapesPass recorded: of each shape-tensor input's values, and of each named dim."""
    raw = model.metadata_props.get(SHAPE_BOUNDS_KEY)
    if raw is None:
        return {}, {}
    document = json.loads(raw)
    values = {name: (float(b["min"]), float(b["max"])) for name, b in document.get("values", {}).items()}
    dims = {
        dim["name"]: (float(dim["min"]), float(dim["max"]))
        for shape in document.get("inputs", {}).values()
        for dim in shape
        if isinstance(dim, dict) and "name" in dim
    }
    return values, dims
