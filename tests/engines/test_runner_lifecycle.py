"""The one runner lifecycle (engines.runner.Runner) as the ONNX Runtime runner and the build runners use it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from engines.generate import GenerationRunner
from engines.onnxruntime import OrtRunner
from engines.prefill import PrefillRunner
from engines.runner import Runner


class Counting(Runner):
    def __init__(self) -> None:
        self.active = False
        self.calls: list[str] = []

    @property
    def is_active(self) -> bool:
        return self.active

    def _activate(self) -> None:
        self.calls.append("activate")
        self.active = True

    def _deactivate(self) -> None:
        self.calls.append("deactivate")
        self.active = False


def test_activate_and_deactivate_happen_once_each() -> None:
    runner = Counting()
    runner.deactivate()  # inactive: nothing to let go
    assert runner.activate() is runner
    runner.activate()
    runner.deactivate()
    runner.deactivate()
    assert runner.calls == ["activate", "deactivate"]


def test_with_block_activates_and_deactivates_even_on_error() -> None:
    runner = Counting()
    with pytest.raises(RuntimeError), runner as entered:
        assert entered is runner and runner.is_active
        raise RuntimeError("boom")
    assert not runner.is_active and runner.calls == ["activate", "deactivate"]


def _identity_model(path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))


def test_ort_runner_makes_its_session_on_entry_and_drops_it_on_exit(tmp_path) -> None:
    path = tmp_path / "identity.onnx"
    _identity_model(path)
    made: list[int] = []

    def loader():
        import onnxruntime as ort

        made.append(1)
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    runner = OrtRunner(loader)
    assert not runner.is_active and made == []
    with runner:
        assert runner.is_active and made == [1]
        np.testing.assert_array_equal(runner.infer({"x": np.array([1.0, 2.0], np.float32)})["y"], [1.0, 2.0])
    assert not runner.is_active
    runner.infer({"x": np.zeros(2, np.float32)})  # first use after the block activates again
    assert runner.is_active and made == [1, 1]


def test_every_runner_shares_the_lifecycle() -> None:
    for cls in (OrtRunner, PrefillRunner, GenerationRunner):
        assert issubclass(cls, Runner)
        assert cls.__enter__ is Runner.__enter__ and cls.__exit__ is Runner.__exit__
