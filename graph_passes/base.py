"""Pass base class, structural fingerprint and small IR helpers shared by the passes.

Every pass in :mod:`graph_passes` is an :class:`onnx_ir.passes.InPlacePass`: it takes an
:class:`onnx_ir.Model`, edits it in place and returns ``PassResult(model, modified)``. The
``modified`` flag is the contract that pipelines and reports rely on, so it must never lie.
:class:`GraphPass` enforces that: it fingerprints the model's structure before and after the
rewrite and

* trusts the fingerprint when the rewrite does not know (wrapped library passes whose own flag
  under-reports, e.g. a shape annotation added during folding), and
* raises :class:`~prune_core.errors.InternalError` when a rewrite's own claim disagrees with the
  fingerprint (a bug in the pass, never the user's fault).

Pre- and postconditions use onnx-ir's hooks: override ``requires(model)`` / ``ensures(model)``;
onnx-ir wraps failures in ``PreconditionError`` / ``PostconditionError``.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Iterable, Iterator

import numpy as np
import onnx_ir as ir

from prune_core.errors import InternalError

#: Every integer element type: values of these types are shapes, indices and counts, never precision.
INT_TYPES = frozenset(
    {
        ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
        ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64,
    }
)  # fmt: skip

__all__ = [
    "GraphPass",
    "constant_array",
    "is_constant",
    "iter_all_nodes",
    "node_label",
    "structural_fingerprint",
]


class GraphPass(ir.passes.InPlacePass):
    """An in-place rewrite of an ONNX model whose ``modified`` flag is checked against the graph.

    Subclasses implement :meth:`apply`, returning ``True``/``False`` when they know whether they
    changed the model, or ``None`` to let the structural fingerprint decide.
    """

    @property
    def name(self) -> str:
        """Short name used in pipeline reports (the class name)."""
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{self.name}()"

    @abc.abstractmethod
    def apply(self, model: ir.Model) -> bool | None:
        """Rewrite ``model`` in place; return whether it changed, or ``None`` if unknown."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Run :meth:`apply` and report the truthful ``modified`` flag."""
        before = structural_fingerprint(model)
        claimed = self.apply(model)
        changed = structural_fingerprint(model) != before
        if claimed is not None and claimed != changed:
            raise InternalError(
                f"pass {self.name} reported modified={claimed}, but the graph fingerprint says "
                f"modified={changed}"
            )
        return ir.passes.PassResult(model, changed)


# --------------------------------------------------------------------------------------------------
# Fingerprint


def _value_signature(value: ir.Value | None) -> str:
    if value is None:
        return "<none>"
    return f"{value.name or f'<anon:{id(value)}>'}:{value.type}:{value.shape}"


def _attribute_signature(attr: ir.Attr) -> str:
    if attr.is_ref():
        return repr(attr)
    if attr.type == ir.AttributeType.GRAPH:
        return f"{attr.name}=graph[{''.join(_graph_lines(attr.as_graph()))}]"
    if attr.type == ir.AttributeType.GRAPHS:
        inner = "|".join("".join(_graph_lines(g)) for g in attr.as_graphs())
        return f"{attr.name}=graphs[{inner}]"
    return repr(attr)


def _graph_lines(graph: ir.Graph | ir.Function) -> Iterator[str]:
    yield f"opsets={sorted(graph.opset_imports.items())}\n"
    yield "inputs=" + ",".join(_value_signature(v) for v in graph.inputs) + "\n"
    yield "outputs=" + ",".join(_value_signature(v) for v in graph.outputs) + "\n"
    if isinstance(graph, ir.Graph):
        for name, init in sorted(graph.initializers.items()):
            tensor = init.const_value
            tensor_sig = "none" if tensor is None else f"{tensor.dtype}{list(tensor.shape)}"
            yield f"init {name}:{init.type}:{init.shape}:{tensor_sig}\n"
    for node in graph:
        attrs = ";".join(_attribute_signature(a) for _, a in sorted(node.attributes.items()))
        ins = ",".join(_value_signature(v) for v in node.inputs)
        outs = ",".join(_value_signature(v) for v in node.outputs)
        yield f"node {node.domain}::{node.op_type}#{node.name}({ins})->({outs}){{{attrs}}}\n"


def structural_fingerprint(model: ir.Model) -> str:
    """A digest of everything a pass may change, except tensor contents.

    Covers IR version, opsets, metadata, functions, graph inputs/outputs, initializers (name,
    dtype, shape), nodes (op, name, attributes, connections) and every value's type and shape
    annotation (the ``value_info`` of the serialized file). Tensor bytes are left out to keep it
    cheap on multi-gigabyte models; a pass that only rewrites tensor bytes in place must report
    that itself.
    """
    digest = hashlib.sha256()
    digest.update(f"ir={model.ir_version}\n".encode())
    digest.update(f"meta={sorted(model.metadata_props.items())}\n".encode())
    for line in _graph_lines(model.graph):
        digest.update(line.encode())
    for identifier, function in sorted(model.functions.items()):
        digest.update(f"function {identifier}\n".encode())
        for line in _graph_lines(function):
            digest.update(line.encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Small helpers


def is_constant(value: ir.Value | None) -> bool:
    """Whether the value is an initializer (not overridable as an input) or a ``Constant`` output.

    Cheaper than :func:`constant_array`: it never reads tensor data.
    """
    if value is None:
        return False
    if value.const_value is not None:
        return not value.is_graph_input()
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain == ""


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents (initializer or ``Constant`` node), else ``None``."""
    if value is None:
        return None
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError:
        return None
    if tensor is None:
        return None
    return tensor.numpy()


def node_label(node: ir.Node) -> str:
    """A human-readable name for a node: its name, or its first output's name."""
    if node.name:
        return node.name
    named = [out.name for out in node.outputs if out.name]
    return f"<unnamed {node.op_type} -> {named[0]}>" if named else f"<unnamed {node.op_type}>"


def iter_all_nodes(graph: ir.Graph) -> Iterable[ir.Node]:
    """All nodes of ``graph`` and of its subgraphs (If/Loop/Scan bodies)."""
    return ir.traversal.RecursiveGraphIterator(graph)
