"""Fixtures shared by the graph-pass tests: build tiny ONNX models in code and run them in ORT."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

#: IR version written for onnxruntime (1.31 reads at most 13; onnx 1.23 writes 14 by default).
ORT_IR_VERSION = 10

MakeModel = Callable[..., onnx.ModelProto]
RunOrt = Callable[[onnx.ModelProto | ir.Model, Mapping[str, np.ndarray]], list[np.ndarray]]


def _make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    *,
    opset: int = 17,
    ir_version: int = ORT_IR_VERSION,
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def _run_ort(model: onnx.ModelProto | ir.Model, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    proto.ir_version = min(proto.ir_version, ORT_IR_VERSION)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, dict(feeds))


@pytest.fixture
def make_model() -> MakeModel:
    """``make_model(nodes, inputs, outputs, initializers=(), *, opset=17, ir_version=10)``."""
    return _make_model


@pytest.fixture
def run_ort() -> RunOrt:
    """Run a proto or onnx-ir model on CPU with ORT's own graph optimizations off."""
    return _run_ort


def op_types(model: ir.Model) -> list[str]:
    """Op types of the main graph, in order."""
    return [node.op_type for node in model.graph]


@pytest.fixture
def ops() -> Callable[[ir.Model], list[str]]:
    """``ops(model)``: the op types of the main graph, in order."""
    return op_types
