"""Value ranges: every value ONNX Runtime computes lies in its interval; hand-computed intervals are exact."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes import BoundShapesPass
from graph_passes.value_range import UNBOUNDED, ValueRanges

MakeModel = Callable[..., onnx.ModelProto]
RunOrt = Callable[..., list[np.ndarray]]
I64, F = TensorProto.INT64, TensorProto.FLOAT


def _scalar(name: str, value: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array([value], np.int64), name)


def _ranges(model: onnx.ModelProto, bounds: dict[str, tuple[int, int]]) -> tuple[ir.Model, ValueRanges]:
    ir_model = ir.from_proto(model)
    BoundShapesPass(bounds)(ir_model)
    return ir_model, ValueRanges(ir_model)


def _value(model: ir.Model, name: str) -> ir.Value:
    return next(out for node in model.graph for out in node.outputs if out.name == name)


def _random_graph(rng: np.random.Generator, make_model: MakeModel) -> tuple[onnx.ModelProto, dict[str, tuple[int, int]]]:
    """Integer arithmetic over three bounded count inputs, as the keep/merge counts are computed."""
    bounds = {}
    for name in ("a", "b", "c"):
        low = int(rng.integers(0, 6))  # recorded bounds are counts; Sub and Neg reach below 0
        bounds[name] = (low, low + int(rng.integers(0, 8)))
    names = list(bounds)
    nodes, inits = [], []
    for i in range(10):
        out = f"v{i}"
        x, y = (names[j] for j in rng.integers(0, len(names), 2))
        kind = rng.choice(["Add", "Sub", "Mul", "Min", "Max", "Neg", "Abs", "Div", "MinWhere", "MaxWhere", "Clip", "Float"])
        if kind in ("Add", "Sub", "Mul", "Min", "Max"):
            nodes.append(helper.make_node(kind, [x, y], [out]))
        elif kind in ("Neg", "Abs"):
            nodes.append(helper.make_node(kind, [x], [out]))
        elif kind == "Div":  # by a positive constant (the exporter's floor division of counts)
            inits.append(_scalar(f"d{i}", int(rng.integers(1, 11))))
            nodes.append(helper.make_node("Div", [x, f"d{i}"], [out]))
        elif kind in ("MinWhere", "MaxWhere"):  # torch.where(x > y, y, x) and its max twin
            nodes.append(helper.make_node("Greater", [x, y], [f"g{i}"]))
            branches = [y, x] if kind == "MinWhere" else [x, y]
            nodes.append(helper.make_node("Where", [f"g{i}", *branches], [out]))
        elif kind == "Clip":
            low = int(rng.integers(-3, 3))
            inits += [numpy_helper.from_array(np.array(v, np.int64), f"{k}{i}") for k, v in (("lo", low), ("hi", low + 4))]
            nodes.append(helper.make_node("Clip", [x, f"lo{i}", f"hi{i}"], [out]))
        else:  # floor(0.3 * x) + 1 in float, back to int64, as the candidate count
            inits += [numpy_helper.from_array(np.array([0.3], np.float32), f"r{i}"), _scalar(f"one{i}", 1)]
            nodes += [
                helper.make_node("Cast", [x], [f"f{i}"], to=F),
                helper.make_node("Mul", [f"f{i}", f"r{i}"], [f"m{i}"]),
                helper.make_node("Floor", [f"m{i}"], [f"fl{i}"]),
                helper.make_node("Cast", [f"fl{i}"], [f"n{i}"], to=I64),
                helper.make_node("Add", [f"n{i}", f"one{i}"], [out]),
            ]
        names.append(out)
    outputs = [helper.make_tensor_value_info(n, I64, None) for n in names[3:]]
    inputs = [helper.make_tensor_value_info(n, I64, [1]) for n in bounds]
    return make_model(nodes, inputs, outputs, inits), bounds


@pytest.mark.parametrize("seed", range(12))
def test_every_computed_value_lies_in_its_interval(seed: int, make_model: MakeModel, run_ort: RunOrt) -> None:
    rng = np.random.default_rng(seed)
    proto, bounds = _random_graph(rng, make_model)
    model, ranges = _ranges(proto, bounds)
    names = [o.name for o in proto.graph.output]
    intervals = {name: ranges.of(_value(model, name)) for name in names}
    corners = [{k: b[j] for k, b in bounds.items()} for j in (0, 1)]
    samples = corners + [{k: int(rng.integers(b[0], b[1] + 1)) for k, b in bounds.items()} for _ in range(30)]
    for sample in samples:
        feeds = {k: np.array([v], np.int64) for k, v in sample.items()}
        for name, got in zip(names, run_ort(proto, feeds), strict=True):
            low, high = intervals[name]
            assert low <= int(got[0]) <= high, (name, sample, int(got[0]), (low, high))


def test_hand_computed_intervals(make_model: MakeModel) -> None:
    """::

    n [1] in [2, 9], keep [1] in [0, 12], x [3, m] (float)
    kept    = Where(keep > n, n, keep)          -> [0, 9]   (min of the two, not their hull [0, 12])
    dropped = n - kept                          -> [-7, 9]  (intervals forget that kept <= n)
    half    = dropped / 2 (int64)               -> [-4, 5]  (truncation stays within floor/ceil)
    rows    = Gather(Shape(x), 0)               -> [3, 3]
    cols    = Gather(Shape(x), 1)               -> [1, 64]  (m's recorded bounds)
    size    = Size(x)                           -> [0, inf)
    score   = Softmax(x)                        -> unbounded
    """
    nodes = [
        helper.make_node("Greater", ["keep", "n"], ["gt"]),
        helper.make_node("Where", ["gt", "n", "keep"], ["kept"]),
        helper.make_node("Sub", ["n", "kept"], ["dropped"]),
        helper.make_node("Div", ["dropped", "two"], ["half"]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["rows"], axis=0),
        helper.make_node("Gather", ["shape", "one"], ["cols"], axis=0),
        helper.make_node("Softmax", ["x"], ["score"]),
        helper.make_node("Size", ["x"], ["size"]),
    ]
    consts = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in (("two", 2), ("zero", 0), ("one", 1))]
    inputs = [helper.make_tensor_value_info("n", I64, [1]), helper.make_tensor_value_info("keep", I64, [1]),
              helper.make_tensor_value_info("x", F, [3, "m"])]  # fmt: skip
    outputs = [helper.make_tensor_value_info(n, I64, None) for n in ("half", "rows", "cols", "size")]
    proto = make_model(nodes, inputs, [*outputs, helper.make_tensor_value_info("score", F, None)], consts)
    model, ranges = _ranges(proto, {"n": (2, 9), "keep": (0, 12), "m": (1, 64)})

    got = {name: ranges.of(_value(model, name)) for name in ("kept", "dropped", "half", "rows", "cols", "size", "score")}

    assert got == {
        "kept": (0, 9),
        "dropped": (-7, 9),
        "half": (-4, 5),
        "rows": (3, 3),
        "cols": (1, 64),
        "size": (0, math.inf),
        "score": UNBOUNDED,
    }
