"""Bounds for dynamic input shapes, recorded in the model for TensorRT optimization profiles.

ONNX has no place for the range of a symbolic dimension, yet TensorRT cannot build an engine for a
dynamic input without a (min, opt, max) profile. Recording the bounds in the model itself keeps the
engine build reproducible from the file alone, and checking them here fails early, on CPU, with the
list of every dimension that still lacks one, instead of deep inside an engine build.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import onnx_ir as ir

from graph_passes.base import INT_TYPES, GraphPass
from prune_core.errors import BuildError

__all__ = [
    "SHAPE_BOUNDS_KEY",
    "BoundShapesPass",
    "Bound",
    "read_shape_bounds",
]

#: ``metadata_props`` key holding the JSON document written by :class:`BoundShapesPass`.
SHAPE_BOUNDS_KEY = "prune_export.shape_bounds"
_FORMAT_VERSION = 1

#: A bound: ``(min, max)`` or ``(min, opt, max)``; ``opt`` defaults to ``max``.
Bound = Sequence[int]


#: TensorRT accepts at most this many values in a shape tensor.
MAX_SHAPE_TENSOR_VALUES = 64


class BoundShapesPass(GraphPass):
    """Check every dynamic graph-input dimension has a bound and record the bounds in the model.

    Rewrite: ``metadata_props[SHAPE_BOUNDS_KEY] = JSON`` with, for each graph input, its dims
    (``int`` for static ones, ``{"name", "min", "opt", "max"}`` for bounded symbolic ones) and, for
    integer *shape-tensor* inputs (rank 0, or rank 1 with at most 64 static values) named in
    ``bounds``, the range of their values (TensorRT needs those in the profile too).

    Refuses (:class:`BuildError`, listing every offender at once) a graph input with unknown rank,
    a dimension with no name (``?``: it cannot be bounded by name; name it at export) or a
    symbolic dimension with no bound, malformed bounds (non-integers, ``min > opt``, ``opt > max``,
    ``min < 0``), and, with ``require_value_bounds``, shape-tensor inputs without a value range.

    Must not fire when the recorded document is already identical (a second run). ``bounds`` keys
    that match neither a dim name nor a shape-tensor input are ignored unless ``strict``, so one
    dict can serve the vision, prefill and decode graphs.

    Args:
        bounds: dim name (or shape-tensor input name) -> ``(min, max)`` or ``(min, opt, max)``.
        require_value_bounds: also require a value range for every shape-tensor input.
        strict: fail on bound names that the graph does not use (catches typos).
    """

    def __init__(
        self,
        bounds: Mapping[str, Bound] | None = None,
        *,
        require_value_bounds: bool = False,
        strict: bool = False,
    ) -> None:
        super().__init__()
        self.bounds = {name: _check_bound(name, b) for name, b in (bounds or {}).items()}
        self.require_value_bounds = require_value_bounds
        self.strict = strict

    def __repr__(self) -> str:
        return f"{self.name}({sorted(self.bounds)})"

    def apply(self, model: ir.Model) -> bool | None:
        graph = model.graph
        problems: list[str] = []
        used: set[str] = set()
        inputs_doc: dict[str, list[object]] = {}
        values_doc: dict[str, dict[str, int]] = {}
        known_dims: set[str] = set()

        for value in graph.inputs:
            if value.is_initializer():
                continue  # overridable initializers (IR < 4) are not runtime inputs
            name = value.name or "<anonymous>"
            if value.shape is None:
                problems.append(f"input {name!r}: unknown rank (no shape in the graph)")
                continue
            dims: list[object] = []
            for axis, dim in enumerate(value.shape):
                if isinstance(dim, int):
                    dims.append(dim)
                    continue
                dim_name = dim.value
                if dim_name is None:
                    problems.append(f"input {name!r} dim {axis}: unknown size with no name")
                    dims.append(None)
                    continue
                known_dims.add(dim_name)
                if dim_name not in self.bounds:
                    problems.append(f"input {name!r} dim {axis} ({dim_name!r}): no bound")
                    dims.append({"name": dim_name})
                    continue
                used.add(dim_name)
                dims.append({"name": dim_name, **self.bounds[dim_name]})
            inputs_doc[name] = dims
            if _is_shape_tensor_input(value):
                known_dims.add(name)
                if name in self.bounds:
                    used.add(name)
                    values_doc[name] = self.bounds[name]
                elif self.require_value_bounds:
                    problems.append(f"input {name!r}: integer shape-tensor input with no value range")

        unused = sorted(set(self.bounds) - used)
        if self.strict and unused:
            problems.append(
                f"bounds given for names the graph does not use: {unused} (known: {sorted(known_dims)})"
            )
        if problems:
            listing = "\n  ".join(problems)
            raise BuildError(
                f"{len(problems)} dynamic input dimension(s)/value(s) cannot be bounded:\n  {listing}\n"
                f"Bounds given: {sorted(self.bounds) or 'none'}. Give each symbolic dim a "
                "(min, max) or (min, opt, max) bound by its name in shape_bounds, and name every "
                "dynamic dim at export."
            )

        document = json.dumps(
            {"version": _FORMAT_VERSION, "inputs": inputs_doc, "values": values_doc},
            sort_keys=True,
        )
        if model.metadata_props.get(SHAPE_BOUNDS_KEY) == document:
            return False
        model.metadata_props[SHAPE_BOUNDS_KEY] = document
        return True

    def ensures(self, model: ir.Model) -> None:
        """Postcondition: the bounds document is present and parses."""
        read_shape_bounds(model)


def read_shape_bounds(model: ir.Model) -> dict[str, object]:
    """The bounds document recorded by :class:`BoundShapesPass` (raises if absent)."""
    raw = model.metadata_props.get(SHAPE_BOUNDS_KEY)
    if raw is None:
        raise BuildError(
            f"the model carries no shape bounds (metadata key {SHAPE_BOUNDS_KEY!r}); run "
            "BoundShapesPass (graph_passes) before building a TensorRT engine"
        )
    return json.loads(raw)


def _check_bound(name: str, bound: Bound) -> dict[str, int]:
    values = list(bound)
    if len(values) == 2:
        low, high = values
        opt = high
    elif len(values) == 3:
        low, opt, high = values
    else:
        raise BuildError(f"bound for {name!r} must be (min, max) or (min, opt, max); got {bound!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, opt, high)):
        raise BuildError(f"bound for {name!r} must hold integers; got {bound!r}")
    if not 0 <= low <= opt <= high:
        raise BuildError(f"bound for {name!r} must satisfy 0 <= min <= opt <= max; got {bound!r}")
    return {"min": low, "opt": opt, "max": high}


def _is_shape_tensor_input(value: ir.Value) -> bool:
    """Integer scalar, or integer 1-D of static length <= 64: a candidate TensorRT shape tensor."""
    if value.dtype not in INT_TYPES or value.shape is None:
        return False
    if value.shape.rank() == 0:
        return True
    if value.shape.rank() == 1:
        length = value.shape[0]
        return isinstance(length, int) and length <= MAX_SHAPE_TENSOR_VALUES
    return False
