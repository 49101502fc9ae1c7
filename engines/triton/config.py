"""Triton model configurations for a build's graphs, generated from its manifest and checked twice.

A Triton model repository is ``<repo>/<model>/config.pbtxt`` plus ``<repo>/<model>/1/model.onnx`` (or
``model.plan``). The most common deployment error is a configuration that disagrees with the model it
serves (names, data types, ranks, shape tensors); here configurations are written from the build's own
graph descriptions, never by hand, and every one is

1. parsed with Triton's own schema (``tritonclient``'s ``model_config_pb2.ModelConfig`` through
   ``google.protobuf.text_format``), so a field Triton does not know fails here, not in the server log;
2. compared with the ONNX graph it serves: every input and output by name, element type and rank.

Graphs carry their batch dimension explicitly (batch-1 prefill and decode, a dynamic vision batch), so
``max_batch_size`` is 0 and every dimension is listed, ``-1`` where it is dynamic. TensorRT shape-tensor
inputs (a split AutoPrune prefill's ``keep_counts`` / ``merged_counts``) are marked ``is_shape_tensor``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prune_core.errors import BuildError
from prune_core.manifest import GraphEntry, TensorSpec

Platform = Literal["onnxruntime_onnx", "tensorrt_plan"]
Kind = Literal["cpu", "gpu"]

#: numpy dtype name (as the manifest records it) -> Triton data type.
TRITON_DTYPES: dict[str, str] = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
    "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
}  # fmt: skip
#: ONNX TensorProto element type -> Triton data type (for the check against the graph file).
_ONNX_TO_TRITON: dict[int, str] = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 11: "TYPE_FP64",
                                   7: "TYPE_INT64", 6: "TYPE_INT32", 5: "TYPE_INT16", 3: "TYPE_INT8",
                                   2: "TYPE_UINT8", 9: "TYPE_BOOL"}  # fmt: skip
MODEL_FILES: dict[str, str] = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}


def model_config_schema() -> Any:
    """Triton's ``ModelConfig`` protobuf class (from ``tritonclient``), with a clear error if it is missing."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise BuildError(
            f"Triton's configuration schema is not importable ({exc}); install tritonclient with its grpc "
            'extra: pip install "tritonclient[grpc]"'
        ) from None
    return model_config_pb2.ModelConfig


def _tensor_block(kind: str, specs: Iterable[TensorSpec], shape_tensors: frozenset[str]) -> str:
    items = []
    for spec in specs:
        if spec.dtype not in TRITON_DTYPES:
            raise BuildError(f"{spec.name}: dtype {spec.dtype} has no Triton data type")
        dims = ", ".join("-1" if isinstance(d, str) else str(int(d)) for d in spec.shape)
        lines = [f'    name: "{spec.name}"', f"    data_type: {TRITON_DTYPES[spec.dtype]}", f"    dims: [ {dims} ]"]
        if spec.name in shape_tensors:
            lines.append("    is_shape_tensor: true")
        items.append("  {\n" + "\n".join(lines) + "\n  }")
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


@dataclass(frozen=True)
class GraphModelConfig:
    """The Triton configuration of one graph model (see the module docstring)."""

    name: str
    graph: GraphEntry
    platform: Platform = "onnxruntime_onnx"
    kind: Kind = "cpu"
    instances: int = 1
    shape_tensors: frozenset[str] = frozenset()

    def text(self) -> str:
        if self.instances < 1:
            raise BuildError(f"--instances must be >= 1, got {self.instances}")
        if self.shape_tensors and self.platform != "tensorrt_plan":
            raise BuildError(f"{self.name}: shape tensors {sorted(self.shape_tensors)} are a TensorRT notion")
        return (
            f'name: "{self.name}"\n'
            f'platform: "{self.platform}"\n'
            "max_batch_size: 0\n"
            f'default_model_filename: "{MODEL_FILES[self.platform]}"\n'
            + _tensor_block("input", self.graph.inputs, self.shape_tensors)
            + _tensor_block("output", self.graph.outputs, frozenset())
            + f"instance_group [\n  {{\n    count: {self.instances}\n    kind: KIND_{self.kind.upper()}\n  }}\n]\n"
        )


def parse_config(text: str, source: str) -> Any:
    """``text`` parsed into Triton's ``ModelConfig``; one line naming ``source`` and the position if not."""
    from google.protobuf import text_format

    schema = model_config_schema()
    try:
        return text_format.Parse(text, schema())
    except text_format.ParseError as exc:
        raise BuildError(f"{source} is not a valid Triton model configuration: {exc}") from None


def check_against_onnx(config: Any, onnx_path: Path, source: str) -> None:
    """Every input and output of ``config`` against the ONNX graph: names, element types and ranks.

    Raises one :class:`BuildError` listing each disagreement.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    problems: list[str] = []
    from tritonclient.grpc import model_config_pb2

    def values(items: Any) -> dict[str, tuple[str, int]]:
        out = {}
        for v in items:
            t = v.type.tensor_type
            out[v.name] = (_ONNX_TO_TRITON.get(t.elem_type, f"onnx type {t.elem_type}"), len(t.shape.dim))
        return out

    for kind, declared, actual in (("input", config.input, values(model.graph.input)),
                                   ("output", config.output, values(model.graph.output))):  # fmt: skip
        names = [t.name for t in declared]
        for missing in sorted(set(actual) - set(names)):
            problems.append(f"graph {kind} {missing} is not in the configuration")
        for t in declared:
            if t.name not in actual:
                problems.append(f"{kind} {t.name} is not a graph {kind}")
                continue
            dtype = model_config_pb2.DataType.Name(t.data_type)
            want, rank = actual[t.name]
            if dtype != want:
                problems.append(f"{kind} {t.name} is {dtype} in the configuration, {want} in the graph")
            if len(t.dims) != rank:
                problems.append(f"{kind} {t.name} has {len(t.dims)} dims in the configuration, rank {rank} in the graph")
    if problems:
        raise BuildError(f"{source} disagrees with {onnx_path.name}: " + "; ".join(problems))
