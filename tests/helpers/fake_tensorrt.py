"""A stand-in ``tensorrt`` module that follows TensorRT's builder contract strictly, for machines without it.

What it holds TensorRT's way (TensorRT 10/11 Python API, as documented):

* the network comes from parsing the *real* ONNX file: its inputs, their shapes (``-1`` for named
  dimensions) and which inputs are **shape tensors** are found from the graph. An integer input is a shape
  tensor when its values reach an operand that sets a size (``Reshape`` shape, ``Expand`` shape, ``Slice``
  bounds, ``TopK`` K, ``Range``, ``ConstantOfShape``, ``Tile`` repeats, ...), directly or through integer
  arithmetic, as TensorRT's parser decides;
* calls come in the legal order: network and parser before the config, profile entries before
  ``add_optimization_profile`` (which copies the profile), the profile added before
  ``build_serialized_network``; anything else fails like TensorRT (an invalid profile gives index -1, a build
  without the profile a dynamic network needs gives ``None``), with the reason sent to the logger;
* profile setters raise ``RuntimeError`` on an inconsistent entry, as the Python bindings do
  (rank or static dimension mismatch, ``min > opt > max``, a value count other than the input's size);
* a serialized engine is bytes that name the graph and the profile, so a test can read what was built;
* the network creation flags follow the version's enum: TensorRT 10 has ``STRONGLY_TYPED`` (its bit is the
  only flag accepted), TensorRT 11 networks are always strongly typed and its enum has no such member (any
  flag is refused);
* the network is parsed the way TensorRT's ONNX parser decides, by its published operator table
  (:mod:`graph_passes.tensorrt_parser`, onnx-tensorrt's ``docs/operators.md`` for TensorRT 10.x): every node is
  checked for its opset, domain, operator and data element types, TopK's ``sorted`` and K (below 3840, and
  proved at least 1), axes that must be initializers, ScatterND reductions, quantization zero points; element
  types come from ONNX shape inference, as TensorRT infers them; a shape-tensor input must be a scalar or 1-D
  of static length, as TensorRT requires;
* parser errors come as TensorRT gives them: ``parse_from_file`` returns False and each error has ``node()``
  (its index in the graph, -1 for the whole model or a node of a subgraph), ``node_operator()``,
  ``node_name()`` and ``desc()``, with index and operator read from the graph. A test can add errors of its
  own (``parser_errors``) for what only a real TensorRT would refuse.

What it does not model: which kernels a GPU has for a layer (a build that TensorRT fails with "no
implementation obeys reformatting-free rules" is ``engine_fails``), memory, the restrictions of the table on
Resize modes, pooling and recurrent layers, and the numbers an engine computes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType, SimpleNamespace

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from graph_passes.tensorrt_parser import parser_findings

#: (op type, input indices) that set sizes: an integer value reaching one of them is read as a shape.
SHAPE_OPERANDS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Expand": (1,),
    "Slice": (1, 2, 3, 4),
    "TopK": (1,),
    "Range": (0, 1, 2),
    "ConstantOfShape": (0,),
    "Tile": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Pad": (1,),
    "Resize": (3,),
    "OneHot": (1,),
    "Split": (1,),
}
_INT_TYPES = {onnx.TensorProto.INT32, onnx.TensorProto.INT64}


def shape_tensor_inputs(graph: onnx.GraphProto) -> set[str]:
    """Graph inputs whose values reach a size operand (walking producers of integer values backwards)."""
    producer = {out: node for node in graph.node for out in node.output}
    int_inputs = {v.name for v in graph.input if v.type.tensor_type.elem_type in _INT_TYPES}
    seen: set[str] = set()
    stack = [
        node.input[i]
        for node in graph.node
        for i in SHAPE_OPERANDS.get(node.op_type, ())
        if i < len(node.input) and node.input[i]
    ]
    found: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in int_inputs:
            found.add(name)
        node = producer.get(name)
        if node is None:
            continue
        if node.op_type in ("Shape", "Size"):  # sizes of a tensor, not its values
            continue
        stack.extend(i for i in node.input if i)
    return found


class FakeTensor:
    def __init__(self, name: str, shape: Sequence[int], is_shape_tensor: bool) -> None:
        self.name, self.shape, self.is_shape_tensor = name, tuple(shape), is_shape_tensor


class FakeParserError:
    """One ONNX parser error, with the accessors of TensorRT's ``ParserError``."""

    def __init__(self, node: int, operator: str, name: str, desc: str) -> None:
        self._node, self._operator, self._name, self._desc = node, operator, name, desc

    def node(self) -> int:
        return self._node

    def node_operator(self) -> str:
        return self._operator

    def node_name(self) -> str:
        return self._name

    def desc(self) -> str:
        return self._desc


def _parser_errors(graph: onnx.GraphProto, wanted: Sequence[tuple[str | None, str]]) -> list[FakeParserError]:
    """The errors ``wanted`` as (node name or None for the whole model, description), placed in ``graph``."""
    where = {node.name: (index, node.op_type) for index, node in enumerate(graph.node) if node.name}
    errors: list[FakeParserError] = []
    for name, desc in wanted:
        if name is None:
            errors.append(FakeParserError(-1, "", "", desc))
            continue
        if name not in where:  # a mistake in the test, not a parser error
            raise ValueError(f"parser error for node {name!r}, which {graph.name!r} does not have")
        index, operator = where[name]
        errors.append(FakeParserError(index, operator, name, desc))
    return errors


def _table_errors(path: str, graph: onnx.GraphProto) -> list[FakeParserError]:
    """What TensorRT's operator table refuses in the model at ``path``, as parser errors."""
    model = ir.load(path)
    ShapeInferencePass(strict_mode=False, data_prop=False)(model)
    where = {node.name: (index, node.op_type) for index, node in enumerate(graph.node) if node.name}
    errors = []
    for finding in parser_findings(model):
        index, operator = where.get(finding.node, (-1, finding.op_type))
        errors.append(FakeParserError(index, operator, finding.node, finding.reason))
    return errors


def _shape_tensor_errors(graph: onnx.GraphProto, shapes: set[str]) -> list[FakeParserError]:
    """Shape-tensor inputs TensorRT cannot take: not a scalar or a 1-D tensor of static length."""
    errors = []
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name in shapes and (len(dims) > 1 or (len(dims) == 1 and not dims[0].HasField("dim_value"))):
            errors.append(
                FakeParserError(
                    -1, "", "", f"input {value.name!r} is used as a shape tensor but is not a scalar or 1-D "
                    "tensor of static length"
                )
            )
    return errors


def fake_tensorrt(
    *,
    version: str | None = None,
    strongly_typed_flag: bool = True,
    engine_fails: bool = False,
    profile_fails: bool = False,
    refuse_values: Iterable[str] = (),
    parser_errors: Iterable[tuple[str | None, str]] = (),
) -> tuple[ModuleType, SimpleNamespace]:
    """The module and a record of what it was asked.

    The record holds ``calls`` (in order), ``flags`` (given to each ``create_network``), ``pools`` (memory
    pool limits set), ``errors`` (what was sent to the logger) and ``engines`` (those built).

    ``version``: ``__version__``; by default 10.99.0 with the STRONGLY_TYPED flag, 11.99.0 without.
    ``strongly_typed_flag``: whether ``NetworkDefinitionCreationFlag`` has ``STRONGLY_TYPED`` (TensorRT 10)
    or not (TensorRT 11).
    ``engine_fails``: the builder returns ``None`` (a kernel or memory failure), logging why.
    ``profile_fails``: ``add_optimization_profile`` returns -1, logging why (TensorRT's own checks that this
    project does not repeat, e.g. a limit of the build's GPU).
    ``refuse_values``: inputs whose shape values the profile setter refuses (as above).
    ``parser_errors``: ``(node name, description)`` pairs the parser reports (a node name of None for an
    error about the whole model); the node must be in the parsed graph, which gives its index and operator.
    """
    record = SimpleNamespace(calls=[], flags=[], pools={}, errors=[], engines=[])
    refused = set(refuse_values)
    wanted_errors = list(parser_errors)
    trt = ModuleType("tensorrt")
    trt.__version__ = version or ("10.99.0" if strongly_typed_flag else "11.99.0")
    flag_bits = {"STRONGLY_TYPED": 1} if strongly_typed_flag else {}

    class Logger:
        WARNING, VERBOSE, ERROR = 2, 4, 1

        def __init__(self, severity: int) -> None:
            self.min_severity = severity

        def log(self, severity: int, message: str) -> None:
            record.errors.append(message)

    class Network:
        def __init__(self) -> None:
            self.inputs: list[FakeTensor] = []
            self.graph = ""

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, index: int) -> FakeTensor:
            return self.inputs[index]

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network
            self.errors: list[FakeParserError] = []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def parse_from_file(self, path: str) -> bool:
            record.calls.append("parse")
            model = onnx.load(path, load_external_data=False)
            shapes = shape_tensor_inputs(model.graph)
            self.errors = [
                *_table_errors(path, model.graph),
                *_shape_tensor_errors(model.graph, shapes),
                *_parser_errors(model.graph, wanted_errors),
            ]
            if self.errors:
                for error in self.errors:
                    Logger(0).log(1, f"ONNX parser: node {error.node()}: {error.desc()}")
                return False
            initializers = {t.name for t in model.graph.initializer}
            for value in model.graph.input:
                if value.name in initializers:
                    continue
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
                self.network.inputs.append(FakeTensor(value.name, dims, value.name in shapes))
            self.network.graph = Path(path).name
            return True

        def get_error(self, index: int) -> FakeParserError:
            return self.errors[index]

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple] = {}
            self.values: dict[str, tuple] = {}

        def set_shape(self, name: str, low: Sequence[int], opt: Sequence[int], high: Sequence[int]) -> None:
            record.calls.append(f"set_shape:{name}")
            if not len(low) == len(opt) == len(high) or not all(
                a <= b <= c for a, b, c in zip(low, opt, high, strict=True)
            ):
                raise RuntimeError("min input provided failure")
            self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

        def set_shape_input(self, name: str, low: Sequence[int], opt: Sequence[int], high: Sequence[int]) -> None:
            record.calls.append(f"set_shape_input:{name}")
            if name in refused or not all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
                raise RuntimeError("max input provided failure")
            self.values[name] = (tuple(low), tuple(opt), tuple(high))

    class Config:
        def __init__(self, builder: Builder) -> None:
            self.builder, self.profiles = builder, []

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            record.calls.append("pool")
            record.pools[pool] = size

        def add_optimization_profile(self, profile: Profile) -> int:
            record.calls.append("add_profile")
            if profile_fails:
                Logger(0).log(1, "optimization profile exceeds a limit of this GPU")
                return -1
            network = self.builder.network
            for tensor in network.inputs:
                dynamic = any(dim < 0 for dim in tensor.shape)
                if tensor.is_shape_tensor:
                    entry = profile.values.get(tensor.name)
                    count = 1 if not tensor.shape else tensor.shape[0]
                    if entry is None or len(entry[0]) != count:
                        Logger(0).log(1, f"shape tensor {tensor.name} has no (or a wrong) profile entry")
                        return -1
                if dynamic:
                    entry = profile.shapes.get(tensor.name)
                    if entry is None or any(
                        len(s) != len(tensor.shape) or any(w >= 0 and w != d for w, d in zip(tensor.shape, s, strict=True))
                        for s in entry
                    ):
                        Logger(0).log(1, f"dynamic input {tensor.name} has no (or an ill-fitting) profile entry")
                        return -1
            self.profiles.append(
                SimpleNamespace(shapes=dict(profile.shapes), values=dict(profile.values))  # a copy, as TensorRT
            )
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger: Logger) -> None:
            self.network: Network | None = None

        def create_network(self, flags: int = 0) -> Network:
            record.calls.append("network")
            record.flags.append(flags)
            if flags & ~sum(1 << bit for bit in flag_bits.values()):
                raise RuntimeError(f"network creation flags {flags} hold a flag this TensorRT does not have")
            self.network = Network()
            return self.network

        def create_optimization_profile(self) -> Profile:
            record.calls.append("profile")
            return Profile()

        def create_builder_config(self) -> Config:
            if self.network is None or not self.network.inputs:
                raise RuntimeError("create the network and parse it before the builder config")
            record.calls.append("config")
            return Config(self)

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            record.calls.append("build")
            needs_profile = any(t.is_shape_tensor or any(d < 0 for d in t.shape) for t in network.inputs)
            if needs_profile and not config.profiles:
                Logger(0).log(1, "Network has dynamic or shape inputs, but no optimization profile has been defined.")
                return None
            if engine_fails:
                Logger(0).log(1, "no implementation obeys reformatting-free rules")
                return None
            profile = config.profiles[0] if config.profiles else SimpleNamespace(shapes={}, values={})
            built = {
                "graph": network.graph,
                "shapes": {k: [list(x) for x in v] for k, v in profile.shapes.items()},
                "values": {k: [list(x) for x in v] for k, v in profile.values.items()},
                "shape_tensors": sorted(t.name for t in network.inputs if t.is_shape_tensor),
            }
            record.engines.append(built)
            return json.dumps(built).encode()

    trt.Logger, trt.OnnxParser, trt.Builder = Logger, OnnxParser, Builder  # type: ignore[attr-defined]
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")  # type: ignore[attr-defined]
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(**flag_bits)  # type: ignore[attr-defined]
    return trt, record
