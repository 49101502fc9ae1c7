"""Small ONNX graphs shared by the engine tests (built in code, each with a diagram)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

#: IR version that onnxruntime 1.31 (at most 13) and TensorRT 10's parser both read; onnx 1.23 writes 14.
IR_VERSION = 10


def save_graph(graph: onnx.GraphProto, path: Path) -> Path:
    """Save ``graph`` as an opset-17 model with :data:`IR_VERSION` and return ``path``."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = IR_VERSION
    onnx.save(model, path)
    return path


WEIGHT = np.arange(12, dtype=np.float32).reshape(4, 3) / 10.0
BIAS = np.array([1.0, -2.0, 0.5], dtype=np.float32)


def matmul_add_model(path: Path) -> Path:
    """Write a two-node graph with a dynamic batch dim and return its path.

    ::

        x [n, 4] ──► MatMul ◄── W [4, 3]
                        │
                        ▼
                       Add ◄── b [3]
                        │
                        ▼
                    y [n, 3]
    """
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "matmul_add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [onnx.numpy_helper.from_array(WEIGHT, "W"), onnx.numpy_helper.from_array(BIAS, "b")],
    )
    return save_graph(graph, path)
