"""ONNX Runtime loader and runner: provider reporting, session options, and feed checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from helpers.engine_graphs import BIAS, WEIGHT, save_graph
from onnx import TensorProto, helper

from engines.onnxruntime import CUDA_PROVIDER, OrtRunner, SessionFromOnnx, active_provider, session_from_onnx
from prune_core.errors import BuildError


def two_input_model(path: Path) -> Path:
    """Write a one-node graph with a float input and an int64 input and return its path.

    ::

        x [n, 4] (float) ──► Mul ◄── s [] (float, from Cast of k)
        k [] (int64)  ──► Cast ─┘
                          │
                          ▼
                      y [n, 4]
    """
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["k"], ["s"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["x", "s"], ["y"]),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("k", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    return save_graph(graph, path)


def test_cpu_session_matches_numpy(model_path: Path) -> None:
    session = session_from_onnx(model_path, provider="cpu", threads=1)
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, x @ WEIGHT + BIAS, rtol=1e-5, atol=1e-6)
    assert active_provider(session) == "CPUExecutionProvider"


def test_session_options_disable_spinning_and_set_threads(model_path: Path) -> None:
    session = SessionFromOnnx(model_path, provider="cpu", threads=2, optimization="disabled")()
    options = session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == 2


def _machine_has_an_nvidia_gpu() -> bool:
    """Asked of the machine, not of ONNX Runtime: the NVIDIA driver's device node or ``nvidia-smi``."""
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


no_gpu_only = pytest.mark.skipif(_machine_has_an_nvidia_gpu(), reason="this machine has an NVIDIA GPU")


def test_a_cpu_only_session_reports_cpu(model_path: Path) -> None:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    assert active_provider(session) == "CPUExecutionProvider"


@no_gpu_only
def test_a_cuda_request_without_a_gpu_reports_the_cpu_fallback(model_path: Path) -> None:
    # Asked for first, CUDA cannot come up without a GPU (onnxruntime-gpu still lists it as available).
    session = ort.InferenceSession(str(model_path), providers=[CUDA_PROVIDER, "CPUExecutionProvider"])
    assert active_provider(session) == "CPUExecutionProvider"
    auto = session_from_onnx(model_path, provider="auto", threads=1)
    assert active_provider(auto) == "CPUExecutionProvider"
    assert OrtRunner(SessionFromOnnx(model_path, provider="auto", threads=1)).provider == "CPUExecutionProvider"
    assert auto.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


@no_gpu_only
def test_cuda_raises_when_cuda_is_not_active(model_path: Path) -> None:
    with pytest.raises(BuildError, match="provider 'cuda'") as info:
        session_from_onnx(model_path, provider="cuda", threads=1)
    assert str(model_path) in str(info.value)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.onnx"
    with pytest.raises(BuildError, match="not found") as info:
        session_from_onnx(missing, provider="cpu")
    assert str(missing) in str(info.value)


def test_invalid_model_names_the_path(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not a protobuf")
    with pytest.raises(BuildError, match="could not load") as info:
        session_from_onnx(broken, provider="cpu")
    assert str(broken) in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"provider": "tpu"}, "unknown provider 'tpu'"),
        ({"optimization": "extreme"}, "unknown optimization 'extreme'"),
        ({"threads": 0}, "threads must be a positive integer"),
    ],
)
def test_bad_settings_are_rejected(model_path: Path, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(BuildError, match=match):
        SessionFromOnnx(model_path, **kwargs)  # type: ignore[arg-type]


def test_runner_metadata_and_infer(model_path: Path) -> None:
    runner = OrtRunner(SessionFromOnnx(model_path, provider="cpu", threads=1))
    with runner:
        assert runner.input_metadata() == {"x": (np.dtype(np.float32), ("n", 4))}
        assert runner.provider == "CPUExecutionProvider"
        x = np.ones((2, 4), dtype=np.float32)
        outputs = runner.infer({"x": x})
        assert list(outputs) == ["y"]
        np.testing.assert_allclose(outputs["y"], x @ WEIGHT + BIAS, rtol=1e-5)


def test_runner_accepts_a_session(tmp_path: Path) -> None:
    session = session_from_onnx(two_input_model(tmp_path / "two.onnx"), provider="cpu", threads=1)
    runner = OrtRunner(session)
    assert runner.input_metadata() == {
        "x": (np.dtype(np.float32), ("n", 4)),
        "k": (np.dtype(np.int64), ()),
    }
    outputs = runner.infer({"x": np.ones((3, 4), np.float32), "k": np.array(3, dtype=np.int64)})
    np.testing.assert_allclose(outputs["y"], np.full((3, 4), 3.0, np.float32))


def test_runner_missing_feed_lists_expected_names(tmp_path: Path) -> None:
    runner = OrtRunner(session_from_onnx(two_input_model(tmp_path / "two.onnx"), provider="cpu", threads=1))
    with pytest.raises(BuildError, match=r"missing k.*expected exactly x, k"):
        runner.infer({"x": np.ones((3, 4), np.float32)})


def test_runner_unknown_feed_lists_expected_names(model_path: Path) -> None:
    runner = OrtRunner(session_from_onnx(model_path, provider="cpu", threads=1))
    with pytest.raises(BuildError, match=r"unknown z.*expected exactly x"):
        runner.infer({"x": np.ones((3, 4), np.float32), "z": np.ones(1, np.float32)})


def test_runner_dtype_mismatch_names_input_and_dtypes(model_path: Path) -> None:
    runner = OrtRunner(session_from_onnx(model_path, provider="cpu", threads=1))
    with pytest.raises(BuildError, match=r"input 'x' expects dtype float32, received float64"):
        runner.infer({"x": np.ones((3, 4), np.float64)})


def test_runner_shape_mismatch_names_input_and_shapes(model_path: Path) -> None:
    runner = OrtRunner(session_from_onnx(model_path, provider="cpu", threads=1))
    with pytest.raises(BuildError, match=r"input 'x' expects shape \[n, 4\], received \[3, 5\]"):
        runner.infer({"x": np.ones((3, 5), np.float32)})
