"""TensorRT engine builds.

Three groups: tests that need no TensorRT at all (missing-TensorRT error, lazy import, argument checks,
atomic save); tests that drive :class:`EngineFromOnnx` on small real ONNX graphs through the strict stand-in
``tensorrt`` module of helpers/fake_tensorrt.py (which reads inputs and shape tensors from the graph and
holds TensorRT's call order) to check what it asks of the TensorRT API (network flags for TensorRT 10 and
11, profile calls, error reports); and tests that build real engines, which run only where TensorRT is
installed (GPU machines).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
from helpers.engine_graphs import IR_VERSION, matmul_add_model, save_graph
from helpers.fake_tensorrt import fake_tensorrt, shape_tensor_inputs
from onnx import TensorProto, helper

from engines.tensorrt import (
    EngineFromOnnx,
    SaveEngine,
    engine_from_onnx,
    require_tensorrt,
    save_engine,
    tensorrt_version,
)
from prune_core.errors import BuildError

REPO_ROOT = Path(__file__).resolve().parents[2]


def slice_by_k_model(path: Path) -> Path:
    """Write a graph keeping the first ``k`` rows of ``x`` (``k`` an int64 shape tensor) and return its path.

    ::

        x [n, 4] ──► Slice ◄── starts [0], axes [0]
        k [1] (int64) ─┘ (ends)
                        │
                        ▼
                    y [m, 4]
    """
    graph = helper.make_graph(
        [helper.make_node("Slice", ["x", "starts", "k", "axes"], ["y"])],
        "slice_by_k",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 4])],
        [
            onnx.numpy_helper.from_array(np.array([0], np.int64), "starts"),
            onnx.numpy_helper.from_array(np.array([0], np.int64), "axes"),
        ],
    )
    return save_graph(graph, path)


# ── without TensorRT ──────────────────────────────────────────────────────────────────────────────────────


def test_require_tensorrt_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BuildError) as info:
        require_tensorrt()
    message = str(info.value)
    assert message.startswith("TensorRT is not installed")
    assert "pip install 'prune-export[tensorrt]'" in message
    assert "--target onnxruntime" in message
    assert tensorrt_version() is None


def test_building_without_tensorrt_raises_the_install_hint(
    monkeypatch: pytest.MonkeyPatch, model_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BuildError, match="TensorRT is not installed"):
        engine_from_onnx(model_path, profile={"x": ((1, 4), (8, 4), (64, 4))})


def test_importing_engines_does_not_import_tensorrt() -> None:
    code = "import sys, engines, engines.tensorrt; print('tensorrt' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "False"


def test_missing_onnx_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "absent.onnx"
    with pytest.raises(BuildError, match="not found") as info:
        EngineFromOnnx(missing, profile={})()
    assert str(missing) in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"profile": {"x": ((1, 4), (8, 4))}}, "must be a \\(min, opt, max\\) triple"),
        ({"profile": {"x": ((1, 4), (8,), (64, 4))}}, "equal lengths"),
        ({"profile": {"x": ((8, 4), (1, 4), (64, 4))}}, "min <= opt <= max"),
        ({"profile": {"x": ((-1, 4), (1, 4), (64, 4))}}, "negative"),
        ({"profile": {"x": ((1, 4.5), (8, 4), (64, 4))}}, "sequences of integers"),
        ({"profile": {}, "shape_values": {"k": (8, 4, 16)}}, "min <= opt <= max"),
        ({"profile": {}, "workspace_gb": 0}, "workspace_gb must be positive"),
    ],
)
def test_bad_profiles_are_rejected_before_building(
    model_path: Path, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(BuildError, match=match):
        EngineFromOnnx(model_path, **kwargs)


def test_scalar_shape_values_become_one_value_lists(model_path: Path) -> None:
    loader = EngineFromOnnx(model_path, profile={}, shape_values={"k": (1, 4, 8)})
    assert loader.shape_values == {"k": ((1,), (4,), (8,))}


def test_save_engine_writes_atomically(tmp_path: Path) -> None:
    target = tmp_path / "engines" / "model.plan"
    assert save_engine(b"\x01engine", target) == target
    assert target.read_bytes() == b"\x01engine"
    assert SaveEngine(lambda: b"second", target)() == b"second"
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.plan"]
    with pytest.raises(BuildError, match="empty"):
        save_engine(b"", target)
    assert target.read_bytes() == b"second"


# ── against the strict stand-in tensorrt module (helpers/fake_tensorrt.py) ──────────────────────────────


def slice_by_k_and_fixed_model(path: Path) -> Path:
    """Write :func:`slice_by_k_model` with a second, static input beside it and return its path.

    ::

        x [n, 4] ──► Slice ◄── starts [0], axes [0]
        k [1] (int64) ─┘ (ends)
                        │
                        ▼
                    y [m, 4]

        fixed [2, 2] ──► Relu ──► z [2, 2]
    """
    graph = helper.make_graph(
        [
            helper.make_node("Slice", ["x", "starts", "k", "axes"], ["y"]),
            helper.make_node("Relu", ["fixed"], ["z"]),
        ],
        "slice_by_k_and_fixed",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("fixed", TensorProto.FLOAT, [2, 2]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 4]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 2]),
        ],
        [
            onnx.numpy_helper.from_array(np.array([0], np.int64), "starts"),
            onnx.numpy_helper.from_array(np.array([0], np.int64), "axes"),
        ],
    )
    return save_graph(graph, path)


def static_model(path: Path) -> Path:
    """Write a graph with static shapes only and return its path.

    ::

        x [2, 4] ──► Relu ──► y [2, 4]
    """
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "static_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    return save_graph(graph, path)


def reshape_by_shape_model(path: Path) -> Path:
    """Write a graph reshaping ``x`` to a two-value int64 shape tensor ``shape`` and return its path.

    ::

        x [n, 4] ──► Reshape ◄── shape [2] (int64)
                        │
                        ▼
                    y [a, b]
    """
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape_by_shape",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
    )
    return save_graph(graph, path)


def nonzero_model(path: Path, dtype: int = TensorProto.FLOAT16) -> Path:
    """Write a graph whose node 3 is a NonZero named ``mask_nz`` (a data-dependent shape) and return its path.

    ::

        x [n, 4] ──► Abs ──► Sign ──► Cast (dtype) ──► NonZero 'mask_nz' (node 3) ──► y [2, nnz] (int64)

    TensorRT's operator table lists NonZero for FP32 and FP16 only: with ``dtype`` BOOL the graph does not parse.
    """
    graph = helper.make_graph(
        [
            helper.make_node("Abs", ["x"], ["a"], name="abs"),
            helper.make_node("Sign", ["a"], ["s"], name="sign"),
            helper.make_node("Cast", ["s"], ["m"], name="mask", to=dtype),
            helper.make_node("NonZero", ["m"], ["y"], name="mask_nz"),
        ],
        "nonzero",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [2, "nnz"])],
    )
    return save_graph(graph, path)


@pytest.mark.parametrize(
    "write",
    [slice_by_k_model, slice_by_k_and_fixed_model, static_model, reshape_by_shape_model, nonzero_model],
)
def test_stand_in_graphs_are_valid_onnx(tmp_path: Path, write: Any) -> None:
    onnx.checker.check_model(str(write(tmp_path / "graph.onnx")), full_check=True)


def test_stand_in_finds_shape_tensors_in_the_graph(tmp_path: Path) -> None:
    def shape_tensors(path: Path) -> set[str]:
        return shape_tensor_inputs(onnx.load(str(path)).graph)

    assert shape_tensors(slice_by_k_model(tmp_path / "slice.onnx")) == {"k"}
    assert shape_tensors(slice_by_k_and_fixed_model(tmp_path / "fixed.onnx")) == {"k"}
    assert shape_tensors(reshape_by_shape_model(tmp_path / "reshape.onnx")) == {"shape"}
    assert shape_tensors(matmul_add_model(tmp_path / "matmul_add.onnx")) == set()


def use(monkeypatch: pytest.MonkeyPatch, **options: Any) -> SimpleNamespace:
    """Install the strict stand-in as ``tensorrt`` for one test; returns its record of calls."""
    trt, record = fake_tensorrt(**options)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return record


@pytest.mark.parametrize(("strongly_typed_flag", "flags"), [(True, 1 << 1), (False, 0)])
def test_fake_build_sets_profile_and_strong_typing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, strongly_typed_flag: bool, flags: int
) -> None:
    """TensorRT 10 gets the STRONGLY_TYPED bit, TensorRT 11 (no such flag) 0; entries in TensorRT's order."""
    path = slice_by_k_and_fixed_model(tmp_path / "slice.onnx")
    record = use(monkeypatch, strongly_typed_flag=strongly_typed_flag)
    engine = EngineFromOnnx(
        path,
        profile={"x": ((1, 4), (16, 4), (64, 4))},
        shape_values={"k": ([1], [8], [64])},
        workspace_gb=0.5,
    )()
    assert record.flags == [flags]
    assert tensorrt_version() == ("10.99.0" if strongly_typed_flag else "11.99.0")
    assert record.pools == {"workspace": 1 << 29}
    # No entry for the static input; k was found to be a shape tensor by parsing the graph.
    assert record.calls == [
        "network",
        "parse",
        "config",
        "pool",
        "profile",
        "set_shape:x",
        "set_shape_input:k",
        "add_profile",
        "build",
    ]
    assert record.engines == [json.loads(engine)]
    assert json.loads(engine) == {
        "graph": "slice.onnx",
        "shapes": {"x": [[1, 4], [16, 4], [64, 4]]},
        "values": {"k": [[1], [8], [64]]},
        "shape_tensors": ["k"],
    }


def test_fake_build_of_static_network_adds_no_profile(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = static_model(tmp_path / "static.onnx")
    record = use(monkeypatch)
    engine = EngineFromOnnx(path, profile={})()
    assert json.loads(engine) == {"graph": "static.onnx", "shapes": {}, "values": {}, "shape_tensors": []}
    assert "add_profile" not in record.calls
    assert not any(call.startswith("set_shape") for call in record.calls)
    assert record.pools == {} and "pool" not in record.calls  # no workspace_gb: TensorRT's default


def test_fake_build_reports_a_rejected_profile(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    record = use(monkeypatch, profile_fails=True)
    with pytest.raises(BuildError, match="rejected the optimization profile"):
        EngineFromOnnx(model_path, profile={"x": ((1, 4), (2, 4), (3, 4))})()
    assert record.calls[-2:] == ["set_shape:x", "add_profile"]
    assert record.engines == [] and "build" not in record.calls
    assert record.errors == ["optimization profile exceeds a limit of this GPU"]


def test_fake_build_names_each_dynamic_input_without_entry(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = slice_by_k_and_fixed_model(tmp_path / "slice.onnx")
    record = use(monkeypatch)
    with pytest.raises(BuildError, match="dynamic input") as info:
        EngineFromOnnx(path, profile={})()
    message = str(info.value)
    assert "x (shape [-1, 4]: give min/opt/max shapes in profile)" in message
    assert "k (shape tensor [1]: give min/opt/max values in shape_values)" in message
    assert "fixed" not in message
    assert "add_profile" not in record.calls and record.engines == []


def test_fake_build_rejects_unknown_and_ill_fitting_entries(
    monkeypatch: pytest.MonkeyPatch, model_path: Path
) -> None:
    record = use(monkeypatch)
    with pytest.raises(BuildError, match="profile names y are not inputs.*its inputs are x"):
        EngineFromOnnx(model_path, profile={"x": ((1, 4), (2, 4), (3, 4)), "y": ((1,), (1,), (1,))})()
    with pytest.raises(BuildError, match="do not fit its shape \\[-1, 4\\]"):
        EngineFromOnnx(model_path, profile={"x": ((1, 5), (2, 5), (3, 5))})()
    with pytest.raises(BuildError, match="do not fit"):
        EngineFromOnnx(model_path, profile={"x": ((1,), (2,), (3,))})()
    # Caught before any entry reached TensorRT's setters.
    assert not any(call.startswith("set_shape") for call in record.calls)
    assert record.engines == []


def test_fake_build_checks_shape_value_count(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = reshape_by_shape_model(tmp_path / "reshape.onnx")
    record = use(monkeypatch)
    with pytest.raises(BuildError, match="have 1 value\\(s\\), but the input holds 2"):
        EngineFromOnnx(path, profile={"x": ((1, 4), (2, 4), (3, 4))}, shape_values={"shape": (1, 2, 3)})()
    assert "set_shape_input:shape" not in record.calls and record.engines == []


def test_fake_build_lists_every_parser_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = nonzero_model(tmp_path / "nonzero.onnx")
    record = use(
        monkeypatch,
        parser_errors=[
            ("mask_nz", "data-dependent shape is not supported here"),
            (None, "model has unsupported IR version"),
        ],
    )
    with pytest.raises(BuildError, match="2 error\\(s\\)") as info:
        EngineFromOnnx(path, profile={"x": ((1, 4), (2, 4), (3, 4))})()
    message = str(info.value)
    assert str(path) in message
    assert "node 3 (NonZero 'mask_nz'): data-dependent shape is not supported here" in message
    assert "model has unsupported IR version" in message
    assert record.calls == ["network", "parse"]  # nothing configured or built after the parser failed


def _graph_with(path: Path, node: onnx.NodeProto, inputs: list[onnx.ValueInfoProto], opset: int = 17) -> Path:
    """``x [2, 3] (float) -> Relu 'relu' (node 0) -> node (node 1) -> y``: one node under test after a good one."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), node],
        "one_node",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]), *inputs],
        [helper.make_tensor_value_info("y", TensorProto.UNDEFINED, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("bool_nonzero", "node 3 (NonZero 'mask_nz'): input 0 ('m') is BOOL; TensorRT's NonZero takes FP16, FP32"),
        ("int64_clip", "node 1 (Clip 'clamp'): input 0 ('n') is INT64; TensorRT's Clip takes BF16, FP16, FP32"),
        ("unique", "node 1 (Unique 'uniq'): Unique is listed as not supported"),
        ("bitshift", "node 1 (BitShift 'shift'): BitShift is listed as not supported"),
        ("contrib", "node 1 (Gelu 'gelu'): operator of domain 'com.microsoft'"),
        ("topk_k0", "node 1 (TopK 'topk'): TopK K is not proved >= 1 (the graph proves only K >= 0)"),
        ("opset_21", "opset 21; TensorRT 10.x parses opsets 9 to 20"),
    ],
)
def test_the_stand_in_refuses_what_tensorrts_operator_table_refuses(
    case: str, error: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / f"{case}.onnx"
    zero = onnx.numpy_helper.from_array(np.array([0], np.int64), "k")
    n = helper.make_tensor_value_info("n", TensorProto.INT64, [4])
    u8 = helper.make_tensor_value_info("u", TensorProto.UINT8, [4])
    if case == "bool_nonzero":
        nonzero_model(path, TensorProto.BOOL)
    elif case == "int64_clip":
        _graph_with(path, helper.make_node("Clip", ["n"], ["y"], name="clamp"), [n])
    elif case == "unique":
        _graph_with(path, helper.make_node("Unique", ["r"], ["y"], name="uniq"), [])
    elif case == "bitshift":
        node = helper.make_node("BitShift", ["u", "u"], ["y"], name="shift", direction="LEFT")
        _graph_with(path, node, [u8])
    elif case == "contrib":
        _graph_with(path, helper.make_node("Gelu", ["r"], ["y"], name="gelu", domain="com.microsoft"), [])
    elif case == "topk_k0":
        node = helper.make_node("TopK", ["r", "k"], ["y", "i"], name="topk")
        path = _graph_with(path, node, [])
        model = onnx.load(str(path))
        model.graph.initializer.append(zero)
        onnx.save(model, str(path))
    else:
        _graph_with(path, helper.make_node("Relu", ["r"], ["y"], name="relu2"), [], opset=21)
    record = use(monkeypatch)
    profile = {"x": ((1, 4), (2, 4), (3, 4))} if case == "bool_nonzero" else {}

    with pytest.raises(BuildError, match="TensorRT's ONNX parser rejected") as info:
        EngineFromOnnx(path, profile=profile)()

    assert error in str(info.value)
    assert record.calls == ["network", "parse"] and record.engines == []


def test_fake_build_failure_says_to_rerun_verbose(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    record = use(monkeypatch, engine_fails=True)
    with pytest.raises(BuildError, match="failed to build.*verbose"):
        EngineFromOnnx(model_path, profile={"x": ((1, 4), (2, 4), (3, 4))})()
    assert record.calls[-2:] == ["add_profile", "build"] and record.engines == []
    assert record.errors == ["no implementation obeys reformatting-free rules"]


# ── with TensorRT (GPU machines) ──────────────────────────────────────────────────────────────────────────


@pytest.fixture
def trt() -> ModuleType:
    return pytest.importorskip(
        "tensorrt", reason="TensorRT is not installed on this machine; the engine build runs on GPU machines"
    )


def test_build_and_save_engine(trt: ModuleType, model_path: Path, tmp_path: Path) -> None:
    loader = EngineFromOnnx(model_path, profile={"x": ((1, 4), (8, 4), (64, 4))}, workspace_gb=0.25)
    engine = SaveEngine(loader, tmp_path / "matmul_add.plan")()
    assert len(engine) > 0
    assert (tmp_path / "matmul_add.plan").read_bytes() == engine
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    deserialized = runtime.deserialize_cuda_engine(engine)
    assert deserialized is not None
    assert deserialized.num_io_tensors == 2
    assert [tuple(dims) for dims in deserialized.get_tensor_profile_shape("x", 0)] == [
        (1, 4),
        (8, 4),
        (64, 4),
    ]


def test_build_with_shape_tensor_input(trt: ModuleType, tmp_path: Path) -> None:
    path = slice_by_k_model(tmp_path / "slice.onnx")
    engine = engine_from_onnx(
        path, profile={"x": ((1, 4), (16, 4), (64, 4))}, shape_values={"k": ([1], [8], [64])}
    )
    assert len(engine) > 0


def test_real_build_names_dynamic_input_without_entry(trt: ModuleType, model_path: Path) -> None:
    with pytest.raises(BuildError, match="x \\(shape \\[-1, 4\\]"):
        engine_from_onnx(model_path, profile={})


def test_real_parser_errors_are_reported(trt: ModuleType, tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], domain="example.unknown")],
        "unknown_op",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.unknown", 1)]
    )
    model.ir_version = IR_VERSION
    path = tmp_path / "unknown_op.onnx"
    onnx.save(model, path)
    with pytest.raises(BuildError, match="ONNX parser rejected") as info:
        engine_from_onnx(path, profile={})
    assert "NoSuchOp" in str(info.value)
