"""Float precision: write fp16/bf16 into the file, keeping a few numerically fragile islands in fp32.

TensorRT 11 networks are strongly typed: there is no ``--fp16`` builder flag any more, the ONNX file
itself must say which tensors are half precision. Exporting an fp32 graph and lowering it here keeps
one exported artifact per plan and puts the precision policy in one documented place.

Blindly lowering every float32 tensor is not what PyTorch runs in half precision either: Hugging
Face models upcast RMSNorm variance, attention softmax and rotary angles to fp32. In an fp32 export
those upcasts are invisible, so this pass re-creates them as fp32 islands (see
:class:`CastPrecisionPass`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from graph_passes.base import INT_TYPES, GraphPass, node_label
from prune_core.errors import BuildError
from prune_core.precision import check_dtype, in_fp32_region

__all__ = [
    "DEFAULT_KEEP_FP32_OPS",
    "FLOAT_DTYPES",
    "CastPrecisionPass",
    "CastStats",
]

#: ``dtype`` names accepted by the pass and pipeline, mapped to the ONNX type they write
#: (``None``: leave the graph in fp32).
FLOAT_DTYPES: dict[str, ir.DataType | None] = {
    "fp32": None,
    "fp16": ir.DataType.FLOAT16,
    "bf16": ir.DataType.BFLOAT16,
}

#: Ops computed in fp32 by default: reductions whose sums overflow or lose precision in half
#: precision (mean of squares in RMSNorm, softmax normalisation) and the square before them.
DEFAULT_KEEP_FP32_OPS: frozenset[str] = frozenset(
    {
        "Softmax",
        "LogSoftmax",
        "ReduceMean",
        "ReduceSumSquare",
        "ReduceL2",
        "Pow",
        "LayerNormalization",
        "RMSNormalization",
    }
)

#: Cheap elementwise/layout ops that stay inside an fp32 island when all their float inputs come
#: from the island or from constants (``Add(eps)``, ``Sqrt``, ``Reciprocal`` after a mean of
#: squares; ``Concat``/``Cos``/``Sin`` of rotary angles).
_FOLLOW_OPS: frozenset[str] = frozenset(
    {
        "Abs", "Add", "Concat", "Cos", "Div", "Exp", "Expand", "Flatten", "Gather", "Identity",
        "Log", "Max", "Min", "Mul", "Neg", "Reciprocal", "Reshape", "Sin", "Slice", "Sqrt",
        "Squeeze", "Sub", "Tile", "Transpose", "Unsqueeze",
        # Selections: ranking fp32 scores in fp16 turns near-equal scores into ties that pick other tokens.
        "TopK", "ArgMax", "ArgMin",
    }
)  # fmt: skip

#: Matrix products join an island only when it started at an integer-to-float Cast (rotary
#: ``inv_freq @ positions``), never after a normalisation (that would pull the next linear layer,
#: weights included, into fp32).
_POSITION_ONLY_FOLLOW_OPS: frozenset[str] = frozenset({"MatMul", "Gemm", "Einsum"})

#: Ops whose outputs depend on no tensor data: constants, and shapes of anything.
_CONSTANT_SOURCES: frozenset[str] = frozenset({"Constant", "ConstantOfShape", "Shape", "Size"})

#: Ops that read their float input at whatever precision it has.
_ANY_PRECISION_INPUT_OPS: frozenset[str] = frozenset({"Cast", "Shape", "Size"})


_FP32 = ir.DataType.FLOAT
_FP16_MAX = float(np.finfo(np.float16).max)
_TYPE_STRINGS = {ir.DataType.FLOAT16: "tensor(float16)", ir.DataType.BFLOAT16: "tensor(bfloat16)"}
_NUMPY_TYPES = {t: t.numpy() for t in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)}
_LOW, _HIGH, _ANY = "low", "fp32", "any"


@dataclasses.dataclass
class CastStats:
    """What the last run of :class:`CastPrecisionPass` did (for reports and tests)."""

    lowered_values: int = 0
    lowered_initializers: int = 0
    fp32_nodes: list[str] = dataclasses.field(default_factory=list)
    inserted_casts: int = 0
    clamped_values: int = 0


class CastPrecisionPass(GraphPass):
    """Lower float32 tensors to fp16/bf16, keeping small fp32 islands where half precision breaks.

    Rewrites (``L`` is the target type, fp16 or bf16):

    * float32 initializer / ``Constant`` ``-> L`` (fp16: finite values beyond +-65504 are clamped
      to +-65504, so ``finfo(float32).min`` masks stay finite);
    * float32 graph input / output ``-> L`` (the signature changes: callers feed L);
    * ``Cast(x, to=FLOAT) -> Cast(x, to=L)``; ``ConstantOfShape``/``dtype`` attributes likewise;
    * every other float32 value annotation ``-> L``.

    fp32 islands (nodes computed in fp32, with ``Cast`` inserted at their edges):

    * ops in ``keep_fp32_ops`` (default :data:`DEFAULT_KEEP_FP32_OPS`):
      ``Softmax(x) -> Cast(Softmax(Cast(x, FLOAT)), L)``;
    * every float op the exporter traced inside a float32 region (node metadata names the class
      :data:`prune_core.precision.FP32_REGION_CLASS`): AutoPrune's scores and DPC-KNN recycling;
    * ``Cast(int, to=FLOAT)`` (positions, counts): fp16 holds integers exactly only up to 2048,
      bf16 up to 256, so rotary angles computed from them would be off by radians;
    * an island grows through cheap elementwise/layout ops and selections (``TopK``, ``ArgMin``,
      ``ArgMax``) whose float inputs all come from the island, from float32-kept graph inputs or from
      constants (``Pow -> ReduceMean -> Add(eps) -> Sqrt -> Reciprocal`` stays fp32
      as one island, no casts inside), and through ``MatMul`` only after an integer cast;
    * constants (and constant-only subgraphs such as ``Expand(inv_freq, shape)``) used only inside
      islands stay fp32; ``Cast(.., to=FLOAT)`` feeding only an island stays an fp32 entry;
    * an op whose ONNX schema does not accept L for an input/output (e.g. ``Resize`` scales) keeps
      that input/output in fp32.

    Values leaving an island are cast, not clamped: an island result beyond +-65504 becomes inf
    in fp16, as it would have without the island. ``Cast(bool -> FLOAT)`` (0/1 masks) is exact in
    any float type and is lowered like any other op.

    Integer, bool and float64 tensors are never touched. Must not fire when ``dtype="fp32"``, nor
    on a graph this pass already lowered (islands and their casts are recognised, so a second run
    reports ``modified=False``). Refuses (:class:`BuildError`) control-flow subgraphs and model
    functions (inline them first), and values whose type cannot be inferred.

    Args:
        dtype: ``"fp16"``, ``"bf16"`` or ``"fp32"`` (no-op).
        keep_fp32_ops: op types computed in fp32; pass ``frozenset()`` to lower everything
            except integer casts and schema-forced inputs.
        keep_int_casts_fp32: keep ``Cast(int -> float)`` and what follows it in fp32.
        keep_fp32_io: names of graph inputs/outputs that stay float32 (a split prefill's token scores
            and complexity signal cross from one graph to the next without rounding to fp16; names a
            graph does not have are ignored, so one set serves every graph of a build).
    """

    def __init__(
        self,
        dtype: str,
        *,
        keep_fp32_ops: Iterable[str] = DEFAULT_KEEP_FP32_OPS,
        keep_int_casts_fp32: bool = True,
        keep_fp32_io: Iterable[str] = (),
    ) -> None:
        super().__init__()
        check_dtype(dtype)
        self.dtype = dtype
        self.target = FLOAT_DTYPES[dtype]
        self.keep_fp32_ops = frozenset(keep_fp32_ops)
        self.keep_int_casts_fp32 = keep_int_casts_fp32
        self.keep_fp32_io = frozenset(keep_fp32_io)
        self.stats = CastStats()

    def __repr__(self) -> str:
        return f"{self.name}(dtype={self.dtype!r})"

    # ----------------------------------------------------------------------------------------------

    def apply(self, model: ir.Model) -> bool | None:
        self.stats = CastStats()
        if self.target is None:
            return False
        graph = model.graph
        self._refuse_unsupported(model)
        modified = self._ensure_types(model)
        opset = graph.opset_imports.get("", 0)

        nodes = list(graph)
        island, const_derived = self._grow_islands(nodes)
        self._absorb_into_islands(graph, nodes, island, const_derived)
        self.stats.fp32_nodes = [node_label(n) for n in nodes if n in island]

        precision = self._assign_precision(graph, nodes, island, opset)
        modified |= self._lower(nodes, precision)
        modified |= self._insert_boundary_casts(graph, nodes, island, precision, opset)
        return modified

    # ----------------------------------------------------------------------------------------------
    # Preconditions

    @staticmethod
    def _refuse_unsupported(model: ir.Model) -> None:
        if model.functions:
            names = ", ".join(sorted(f"{d}::{n}" for d, n, _ in model.functions))
            raise BuildError(
                f"cannot lower precision inside model-local functions ({names}); inline them "
                "first (onnx_ir.passes.common.InlinePass) or export with inlining on"
            )
        for node in model.graph:
            for attr in node.attributes.values():
                if isinstance(attr, ir.Attr) and attr.type in (
                    ir.AttributeType.GRAPH,
                    ir.AttributeType.GRAPHS,
                ):
                    raise BuildError(
                        f"cannot lower precision through control flow: node {node_label(node)} "
                        f"({node.op_type}) has a subgraph; export without If/Loop/Scan"
                    )

    @staticmethod
    def _ensure_types(model: ir.Model) -> bool:
        """Every value must have a known type to decide its precision; infer missing ones."""

        def untyped() -> list[str]:
            missing = [v for v in model.graph.inputs if v.type is None]
            missing += [out for node in model.graph for out in node.outputs if out.type is None]
            return [v.name or "<anonymous>" for v in missing]

        if not untyped():
            return False
        result = common_passes.ShapeInferencePass(strict_mode=False, data_prop=False)(model)
        still = untyped()
        if still:
            raise BuildError(
                f"cannot decide the precision of {len(still)} value(s) with unknown type "
                f"(first: {still[:5]}); ONNX shape inference could not type them. Run the cleanup "
                "pass first or export with type annotations."
            )
        return result.modified

    # ----------------------------------------------------------------------------------------------
    # Islands

    def _grow_islands(self, nodes: list[ir.Node]) -> tuple[set[ir.Node], set[ir.Value]]:
        """Forward walk: anchors, then followers whose float inputs are island-or-constant.

        Also returns the values computed from constants and shapes only (never from a graph input
        or a runtime index: ``Gather(embedding_table, input_ids)`` is data), which may later be
        absorbed into an island.
        """
        island: set[ir.Node] = set()
        labels: dict[ir.Node, str] = {}
        const_derived: set[ir.Value] = set()
        for node in nodes:
            present = [v for v in node.inputs if v is not None]
            if node.domain == "" and node.op_type in _CONSTANT_SOURCES:
                const_derived.update(node.outputs)
            elif present and all(_is_const_derived(v, const_derived) for v in present):
                const_derived.update(node.outputs)
            float_ins = [v for v in node.inputs if _is_fp32(v)]
            if node.domain != "":
                continue
            if self.keep_int_casts_fp32 and _is_int_to_fp32_cast(node):
                island.add(node)
                labels[node] = "position"
                continue
            if float_ins and (node.op_type in self.keep_fp32_ops or in_fp32_region(node.metadata_props)):
                island.add(node)
                labels[node] = "numeric"
                continue
            if not float_ins or node.op_type not in _FOLLOW_OPS | _POSITION_ONLY_FOLLOW_OPS:
                continue
            from_island = [v.producer() for v in float_ins if v.producer() in island]
            kept_inputs = [v for v in float_ins if v.is_graph_input() and v.name in self.keep_fp32_io]
            if not from_island and not kept_inputs:
                continue
            if not all(
                v.producer() in island or v in kept_inputs or _is_const_derived(v, const_derived)
                for v in float_ins
            ):
                continue
            label = "position" if any(labels.get(p) == "position" for p in from_island) else "numeric"
            if node.op_type in _POSITION_ONLY_FOLLOW_OPS and label != "position":
                continue
            island.add(node)
            labels[node] = label
        return island, const_derived

    @staticmethod
    def _absorb_into_islands(
        graph: ir.Graph, nodes: list[ir.Node], island: set[ir.Node], const_derived: set[ir.Value]
    ) -> None:
        """Backward walk: constant-only producers and fp32 Casts that feed only islands join them."""
        outputs = set(graph.outputs)
        for node in reversed(nodes):
            if node in island or node.domain != "":
                continue
            float_outs = [v for v in node.outputs if _is_fp32(v)]
            if not float_outs or any(v in outputs for v in float_outs):
                continue
            is_fp32_cast = node.op_type == "Cast" and _cast_target(node) == _FP32
            constant_only = all(v in const_derived for v in float_outs)
            if not (is_fp32_cast or constant_only):
                continue
            consumers = [use.node for v in float_outs for use in v.uses()]
            if consumers and all(c in island for c in consumers):
                island.add(node)

    # ----------------------------------------------------------------------------------------------
    # Precision assignment

    def _preference(self, node: ir.Node, index: int, island: set[ir.Node], opset: int) -> str:
        """Which precision input ``index`` of ``node`` wants: fp32, target, or any."""
        if node in island:
            return _HIGH
        if node.op_type in _ANY_PRECISION_INPUT_OPS and node.domain == "":
            return _ANY
        if not _schema_allows(node, index, is_output=False, target=self.target, opset=opset):
            return _HIGH
        return _LOW

    def _requirement(self, node: ir.Node, index: int, island: set[ir.Node], opset: int) -> str:
        """Like :meth:`_preference`, but Casts/Shape read anything (no cast inserted before them)."""
        if node.op_type in _ANY_PRECISION_INPUT_OPS and node.domain == "":
            return _ANY
        return self._preference(node, index, island, opset)

    def _assign_precision(
        self, graph: ir.Graph, nodes: list[ir.Node], island: set[ir.Node], opset: int
    ) -> dict[ir.Value, str]:
        """Target precision of every float32 value (graph inputs, initializers, node outputs)."""
        precision: dict[ir.Value, str] = {}
        io = set(graph.inputs) | set(graph.outputs)
        for value in graph.inputs:
            if _is_fp32(value):
                precision[value] = _HIGH if value.name in self.keep_fp32_io else _LOW
        for value in graph.initializers.values():
            if not _is_fp32(value) or value in precision:
                continue
            prefs = {self._preference(u.node, u.idx, island, opset) for u in value.uses()} - {_ANY}
            keep = value not in io and prefs == {_HIGH}
            precision[value] = _HIGH if keep else _LOW
        for node in nodes:
            for index, value in enumerate(node.outputs):
                if not _is_fp32(value):
                    continue
                if node in island or not _schema_allows(
                    node, index, is_output=True, target=self.target, opset=opset
                ):
                    precision[value] = _HIGH
                else:
                    precision[value] = _LOW
        return precision

    # ----------------------------------------------------------------------------------------------
    # Rewrites

    def _lower(self, nodes: list[ir.Node], precision: dict[ir.Value, str]) -> bool:
        """Retype values, convert constant data and dtype attributes of the lowered values."""
        assert self.target is not None
        target = self.target
        modified = False
        for value, prec in precision.items():
            if prec != _LOW:
                continue
            value.dtype = target
            self.stats.lowered_values += 1
            modified = True
            if value.is_initializer() and value.const_value is not None:
                value.const_value = self._convert_tensor(value.const_value, value.name)
                self.stats.lowered_initializers += 1
        for node in nodes:
            low_outputs = [v for v in node.outputs if precision.get(v) == _LOW]
            if not low_outputs or node.domain != "":
                continue
            modified |= self._retarget_attributes(node)
        return modified

    def _retarget_attributes(self, node: ir.Node) -> bool:
        """Point a node's own float32 type attributes at the target type."""
        assert self.target is not None
        attrs = node.attributes
        changed = False
        if node.op_type == "Cast" and _cast_target(node) == _FP32:
            attrs["to"] = ir.AttrInt64("to", int(self.target))
            changed = True
        elif node.op_type == "Constant":
            if "value" in attrs:
                tensor = attrs["value"].as_tensor()
                if tensor.dtype == _FP32:
                    attrs["value"] = ir.AttrTensor("value", self._convert_tensor(tensor, None))
                    changed = True
            elif "value_float" in attrs or "value_floats" in attrs:
                key = "value_float" if "value_float" in attrs else "value_floats"
                raw = attrs.pop(key)
                array = np.asarray(
                    raw.as_float() if key == "value_float" else list(raw.as_floats()),
                    dtype=np.float32,
                )
                attrs["value"] = ir.AttrTensor("value", self._convert_tensor(ir.tensor(array), None))
                changed = True
            output = node.outputs[0]
            if changed and output.const_value is not None:  # keep folders from reading stale fp32
                output.const_value = attrs["value"].as_tensor()
        elif node.op_type == "ConstantOfShape":
            if "value" in attrs:
                tensor = attrs["value"].as_tensor()
                if tensor.dtype == _FP32:
                    attrs["value"] = ir.AttrTensor("value", self._convert_tensor(tensor, None))
                    changed = True
            else:  # default: a float32 zero
                zero = ir.tensor(np.zeros((1,), dtype=_NUMPY_TYPES[self.target]))
                attrs["value"] = ir.AttrTensor("value", zero)
                changed = True
        elif "dtype" in attrs and attrs["dtype"].as_int() == int(_FP32):
            attrs["dtype"] = ir.AttrInt64("dtype", int(self.target))
            changed = True
        elif node.op_type in ("RandomNormal", "RandomUniform") and "dtype" not in attrs:
            attrs["dtype"] = ir.AttrInt64("dtype", int(self.target))
            changed = True
        return changed

    def _convert_tensor(self, tensor: ir.TensorProtocol, name: str | None) -> ir.TensorProtocol:
        """float32 tensor -> target tensor; fp16 clamps finite out-of-range values."""
        assert self.target is not None
        array = tensor.numpy().astype(np.float32, copy=False)
        if self.target == ir.DataType.FLOAT16:
            out_of_range = np.isfinite(array) & (np.abs(array) > _FP16_MAX)
            if out_of_range.any():
                self.stats.clamped_values += int(out_of_range.sum())
                array = np.where(out_of_range, np.sign(array) * _FP16_MAX, array)
        converted = array.astype(_NUMPY_TYPES[self.target])
        return ir.tensor(converted, dtype=self.target, name=name if name else tensor.name)

    def _insert_boundary_casts(
        self,
        graph: ir.Graph,
        nodes: list[ir.Node],
        island: set[ir.Node],
        precision: dict[ir.Value, str],
        opset: int,
    ) -> bool:
        """Insert ``Cast`` where a value's precision differs from what its consumer needs."""
        assert self.target is not None
        casts: dict[tuple[ir.Value, str], ir.Value] = {}
        inserted = 0
        taken = {v.name for v in graph.inputs} | set(graph.initializers)
        taken |= {out.name for node in nodes for out in node.outputs}

        def fresh(base: str) -> str:
            name, counter = base, 1
            while name in taken:
                name, counter = f"{base}_{counter}", counter + 1
            taken.add(name)
            return name

        def cast_of(value: ir.Value, want: str, before: ir.Node) -> ir.Value:
            nonlocal inserted
            key = (value, want)
            if key not in casts:
                to = _FP32 if want == _HIGH else self.target
                suffix = "fp32" if want == _HIGH else self.dtype
                cast = ir.Node(
                    "",
                    "Cast",
                    [value],
                    attributes=[ir.AttrInt64("to", int(to))],
                    name=fresh(f"{value.name}_to_{suffix}"),
                )
                out = cast.outputs[0]
                out.name = fresh(f"{value.name}_{suffix}")
                out.dtype = to
                out.shape = value.shape
                graph.insert_before(before, cast)
                casts[key] = out
                inserted += 1
            return casts[key]

        for node in nodes:
            for index, value in enumerate(node.inputs):
                if value is None or value not in precision:
                    continue
                want = self._requirement(node, index, island, opset)
                if want != _ANY and want != precision[value]:
                    node.replace_input_with(index, cast_of(value, want, node))

        for position, value in enumerate(graph.outputs):
            if value not in precision:
                continue
            # The output keeps its name and gets its I/O type (float32 where kept, else the target)
            # through a final Cast, where the value's precision differs from it.
            io_high = value.name in self.keep_fp32_io
            if precision[value] == (_HIGH if io_high else _LOW):
                continue
            to, suffix = (_FP32, "fp32") if io_high else (self.target, self.dtype)
            name = value.name
            value.name = fresh(f"{name}_{'low' if io_high else 'fp32'}")
            cast = ir.Node(
                "",
                "Cast",
                [value],
                attributes=[ir.AttrInt64("to", int(to))],
                name=fresh(f"{name}_to_{suffix}"),
            )
            out = cast.outputs[0]
            out.name = name
            out.dtype = to
            out.shape = value.shape
            graph.append(cast)
            graph.outputs[position] = out
            inserted += 1

        self.stats.inserted_casts = inserted
        return inserted > 0

    # ----------------------------------------------------------------------------------------------
    # Postcondition

    def ensures(self, model: ir.Model) -> None:
        """Postcondition: no float32 graph input/output is left when lowering."""
        if self.target is None:
            return
        for value in [*model.graph.inputs, *model.graph.outputs]:
            if _is_fp32(value) and value.name not in self.keep_fp32_io:
                raise ir.passes.PostconditionError(f"float32 graph input/output left: {value}")


# --------------------------------------------------------------------------------------------------
# Helpers


def _is_fp32(value: ir.Value | None) -> bool:
    return value is not None and isinstance(value.type, ir.TensorType) and value.dtype == _FP32


def _is_const_derived(value: ir.Value, const_derived: set[ir.Value]) -> bool:
    """An initializer that is not also a graph input, or a value computed from constants/shapes."""
    if value in const_derived:
        return True
    return value.is_initializer() and not value.is_graph_input()


def _cast_target(node: ir.Node) -> ir.DataType | None:
    attr = node.attributes.get("to")
    return ir.DataType(attr.as_int()) if isinstance(attr, ir.Attr) else None


def _is_int_to_fp32_cast(node: ir.Node) -> bool:
    if node.op_type != "Cast" or _cast_target(node) != _FP32 or not node.inputs:
        return False
    source = node.inputs[0]
    return source is not None and source.dtype in INT_TYPES


def _schema_allows(node: ir.Node, index: int, *, is_output: bool, target: ir.DataType, opset: int) -> bool:
    """Whether the ONNX schema lets this input/output carry ``target`` (unknown ops: yes)."""
    if node.domain != "":
        return True
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return True
    params = schema.outputs if is_output else schema.inputs
    if not params:
        return True
    if index < len(params):
        param = params[index]
    elif params[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        param = params[-1]
    else:
        return True
    constraints = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    allowed = constraints.get(param.type_str, [param.type_str])
    return _TYPE_STRINGS[target] in allowed
