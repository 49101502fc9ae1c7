"""TensorRT engine builds.

Three groups: tests that need no TensorRT at all (missing-TensorRT error, lazy import, argument checks,
atomic save); tests that drive :class:`EngineFromOnnx` through a small stand-in ``tensorrt`` module to check
what it asks of the TensorRT API (network flags for TensorRT 10 and 11, profile calls, error reports); and
tests that build real engines, which run only where TensorRT is installed (GPU machines).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
from engine_graphs import IR_VERSION, save_graph
from onnx import TensorProto, helper

from engines.tensorrt import (
    EngineFromOnnx,
    SaveEngine,
    engine_from_onnx,
    require_tensorrt,
    save_engine,
    tensorrt_version,
)
from prune_export.errors import BuildError

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


# ── against a stand-in tensorrt module ────────────────────────────────────────────────────────────────────


class FakeTensor:
    def __init__(self, name: str, shape: Sequence[int], is_shape_tensor: bool = False) -> None:
        self.name, self.shape, self.is_shape_tensor = name, tuple(shape), is_shape_tensor


class FakeParserError:
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


def fake_tensorrt(
    inputs: Sequence[FakeTensor],
    *,
    strongly_typed_flag: bool = True,
    parser_errors: Sequence[FakeParserError] = (),
    engine: bytes | None = b"serialized-plan",
    profile_index: int = 0,
) -> tuple[ModuleType, SimpleNamespace]:
    """A stand-in ``tensorrt`` module with the API names EngineFromOnnx uses; returns it and a call log."""
    log = SimpleNamespace(flags=None, parsed=None, shapes={}, values={}, pools={}, profiles=0, built=False)
    trt = ModuleType("tensorrt")
    trt.__version__ = "10.99.0" if strongly_typed_flag else "11.99.0"

    class Logger:
        WARNING, VERBOSE = 2, 4

        def __init__(self, severity: int) -> None:
            self.min_severity = severity

    class Network:
        num_inputs = len(inputs)

        def get_input(self, index: int) -> FakeTensor:
            return inputs[index]

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.num_errors = len(parser_errors)

        def parse_from_file(self, path: str) -> bool:
            log.parsed = path
            return not parser_errors

        def get_error(self, index: int) -> FakeParserError:
            return parser_errors[index]

    class Profile:
        def set_shape(self, name: str, low: Any, opt: Any, high: Any) -> None:
            log.shapes[name] = (tuple(low), tuple(opt), tuple(high))

        def set_shape_input(self, name: str, low: Any, opt: Any, high: Any) -> None:
            log.values[name] = (tuple(low), tuple(opt), tuple(high))

    class Config:
        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            log.pools[pool] = size

        def add_optimization_profile(self, profile: Profile) -> int:
            log.profiles += 1
            return profile_index

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int = 0) -> Network:
            log.flags = flags
            return Network()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def create_builder_config(self) -> Config:
            return Config()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            log.built = True
            return engine

    trt.Logger, trt.OnnxParser, trt.Builder = Logger, OnnxParser, Builder  # type: ignore[attr-defined]
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")  # type: ignore[attr-defined]
    flag_enum = SimpleNamespace(STRONGLY_TYPED=1) if strongly_typed_flag else SimpleNamespace()
    trt.NetworkDefinitionCreationFlag = flag_enum  # type: ignore[attr-defined]
    return trt, log


@pytest.mark.parametrize(("strongly_typed_flag", "flags"), [(True, 1 << 1), (False, 0)])
def test_fake_build_sets_profile_and_strong_typing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, strongly_typed_flag: bool, flags: int
) -> None:
    path = slice_by_k_model(tmp_path / "slice.onnx")
    inputs = [FakeTensor("x", (-1, 4)), FakeTensor("k", (1,), is_shape_tensor=True), FakeTensor("s", (2, 2))]
    trt, log = fake_tensorrt(inputs, strongly_typed_flag=strongly_typed_flag)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    engine = EngineFromOnnx(
        path,
        profile={"x": ((1, 4), (16, 4), (64, 4))},
        shape_values={"k": ([1], [8], [64])},
        workspace_gb=0.5,
    )()
    assert engine == b"serialized-plan"
    assert log.flags == flags
    assert log.parsed == str(path)
    assert log.shapes == {"x": ((1, 4), (16, 4), (64, 4))}
    assert log.values == {"k": ((1,), (8,), (64,))}
    assert log.pools == {"workspace": 1 << 29}
    assert log.profiles == 1
    assert tensorrt_version() == trt.__version__


def test_fake_build_of_static_network_adds_no_profile(
    monkeypatch: pytest.MonkeyPatch, model_path: Path
) -> None:
    trt, log = fake_tensorrt([FakeTensor("x", (2, 4))])
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    assert EngineFromOnnx(model_path, profile={})() == b"serialized-plan"
    assert log.profiles == 0 and log.shapes == {} and log.pools == {}


def test_fake_build_reports_a_rejected_profile(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    trt, log = fake_tensorrt([FakeTensor("x", (-1, 4))], profile_index=-1)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(BuildError, match="rejected the optimization profile"):
        EngineFromOnnx(model_path, profile={"x": ((1, 4), (2, 4), (3, 4))})()
    assert not log.built


def test_fake_build_names_each_dynamic_input_without_entry(
    monkeypatch: pytest.MonkeyPatch, model_path: Path
) -> None:
    inputs = [
        FakeTensor("x", (-1, 4)),
        FakeTensor("k", (1,), is_shape_tensor=True),
        FakeTensor("fixed", (2, 2)),
    ]
    trt, log = fake_tensorrt(inputs)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(BuildError, match="dynamic input") as info:
        EngineFromOnnx(model_path, profile={})()
    message = str(info.value)
    assert "x (shape [-1, 4]: give min/opt/max shapes in profile)" in message
    assert "k (shape tensor [1]: give min/opt/max values in shape_values)" in message
    assert "fixed" not in message
    assert not log.built


def test_fake_build_rejects_unknown_and_ill_fitting_entries(
    monkeypatch: pytest.MonkeyPatch, model_path: Path
) -> None:
    trt, _ = fake_tensorrt([FakeTensor("x", (-1, 4))])
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(BuildError, match="profile names y are not inputs.*its inputs are x"):
        EngineFromOnnx(model_path, profile={"x": ((1, 4), (2, 4), (3, 4)), "y": ((1,), (1,), (1,))})()
    with pytest.raises(BuildError, match="do not fit its shape \\[-1, 4\\]"):
        EngineFromOnnx(model_path, profile={"x": ((1, 5), (2, 5), (3, 5))})()
    with pytest.raises(BuildError, match="do not fit"):
        EngineFromOnnx(model_path, profile={"x": ((1,), (2,), (3,))})()


def test_fake_build_checks_shape_value_count(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    trt, _ = fake_tensorrt([FakeTensor("k", (2,), is_shape_tensor=True)])
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(BuildError, match="have 1 value\\(s\\), but the input holds 2"):
        EngineFromOnnx(model_path, profile={}, shape_values={"k": (1, 2, 3)})()


def test_fake_build_lists_every_parser_error(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    errors = [
        FakeParserError(3, "NonZero", "mask_nz", "data-dependent shape is not supported here"),
        FakeParserError(-1, "", "", "model has unsupported IR version"),
    ]
    trt, log = fake_tensorrt([FakeTensor("x", (-1, 4))], parser_errors=errors)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(BuildError, match="2 error\\(s\\)") as info:
        EngineFromOnnx(model_path, profile={"x": ((1, 4), (2, 4), (3, 4))})()
    message = str(info.value)
    assert str(model_path) in message
    assert "node 3 (NonZero 'mask_nz'): data-dependent shape is not supported here" in message
    assert "model has unsupported IR version" in message
    assert not log.built


def test_fake_build_failure_says_to_rerun_verbose(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    trt, _ = fake_tensorrt([FakeTensor("x", (-1, 4))], engine=None)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(BuildError, match="failed to build.*verbose"):
        EngineFromOnnx(model_path, profile={"x": ((1, 4), (2, 4), (3, 4))})()


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
