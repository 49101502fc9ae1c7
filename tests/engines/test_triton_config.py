"""Triton model configurations from graph descriptions: parsed by Triton's own schema, checked against ONNX.

Expected values are written by hand from Triton's model_config.proto (data types, dims with -1, shape
tensors, instance groups); the graphs are 1-node ONNX models built here.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from engines.triton.config import GraphModelConfig, check_against_onnx, parse_config
from prune_core.errors import BuildError
from prune_core.manifest import GraphEntry, TensorSpec

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is a dependency")
from tritonclient.grpc import model_config_pb2 as pb  # noqa: E402

ENTRY = GraphEntry(
    file="g.onnx",
    inputs=[TensorSpec(name="x", dtype="float16", shape=[1, "n", 4]),
            TensorSpec(name="keep_counts", dtype="int64", shape=[3])],  # fmt: skip
    outputs=[TensorSpec(name="y", dtype="float32", shape=["n"])],
)


def _graph(path: Path, x_type: int = TensorProto.FLOAT16, y_rank: int = 1) -> Path:
    """``x [1, n, 4] (fp16), keep_counts [3] (int64) -> y`` through Identity/ReduceSum nodes."""
    x = helper.make_tensor_value_info("x", x_type, [1, "n", 4])
    k = helper.make_tensor_value_info("keep_counts", TensorProto.INT64, [3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"] * y_rank)
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["xf"], ["y"], keepdims=0),
             helper.make_node("Identity", ["keep_counts"], ["unused"])]  # fmt: skip
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x, k], [y])), str(path))
    return path


def test_a_generated_configuration_says_what_triton_expects() -> None:
    text = GraphModelConfig("prefill_tail", ENTRY, platform="tensorrt_plan", kind="gpu", instances=2,
                            shape_tensors=frozenset({"keep_counts"})).text()  # fmt: skip
    cfg = parse_config(text, "prefill_tail/config.pbtxt")
    assert (cfg.name, cfg.platform, cfg.max_batch_size, cfg.default_model_filename) == (
        "prefill_tail", "tensorrt_plan", 0, "model.plan")
    x, keep = cfg.input
    assert (x.name, x.data_type, list(x.dims), x.is_shape_tensor) == ("x", pb.TYPE_FP16, [1, -1, 4], False)
    assert (keep.name, keep.data_type, list(keep.dims), keep.is_shape_tensor) == ("keep_counts", pb.TYPE_INT64, [3], True)
    (y,) = cfg.output
    assert (y.name, y.data_type, list(y.dims)) == ("y", pb.TYPE_FP32, [-1])
    (group,) = cfg.instance_group
    assert (group.count, group.kind) == (2, pb.ModelInstanceGroup.KIND_GPU)


def test_onnxruntime_configurations_have_no_shape_tensors_and_run_on_cpu() -> None:
    cfg = parse_config(GraphModelConfig("g", ENTRY).text(), "g/config.pbtxt")
    assert cfg.platform == "onnxruntime_onnx" and cfg.default_model_filename == "model.onnx"
    assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    with pytest.raises(BuildError, match="TensorRT notion"):
        GraphModelConfig("g", ENTRY, shape_tensors=frozenset({"keep_counts"})).text()
    with pytest.raises(BuildError, match="--instances must be >= 1"):
        GraphModelConfig("g", ENTRY, instances=0).text()


def test_the_schema_rejects_a_field_triton_does_not_know() -> None:
    text = GraphModelConfig("g", ENTRY).text().replace("max_batch_size", "max_batch_sise")
    with pytest.raises(BuildError, match=r"g/config.pbtxt is not a valid Triton model configuration: .*max_batch_sise"):
        parse_config(text, "g/config.pbtxt")


def test_a_configuration_is_checked_against_its_graph(tmp_path: Path) -> None:
    cfg = parse_config(GraphModelConfig("g", ENTRY).text(), "g/config.pbtxt")
    check_against_onnx(cfg, _graph(tmp_path / "ok.onnx"), "g/config.pbtxt")  # agrees: no error
    with pytest.raises(BuildError) as err:
        check_against_onnx(cfg, _graph(tmp_path / "bad.onnx", x_type=TensorProto.FLOAT, y_rank=2), "g/config.pbtxt")
    message = str(err.value)
    assert "input x is TYPE_FP16 in the configuration, TYPE_FP32 in the graph" in message
    assert "output y has 1 dims in the configuration, rank 2 in the graph" in message
    renamed = GraphEntry(file="g.onnx", inputs=[*ENTRY.inputs[:1], TensorSpec(name="k", dtype="int64", shape=[3])],
                         outputs=ENTRY.outputs)  # fmt: skip
    cfg = parse_config(GraphModelConfig("g", renamed).text(), "g/config.pbtxt")
    with pytest.raises(BuildError, match="graph input keep_counts is not in the configuration; input k is not a graph input"):
        check_against_onnx(cfg, tmp_path / "ok.onnx", "g/config.pbtxt")
