"""Saving an optimized graph over its own file: the external data file holds exactly what the graph uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from exporter.onnx_export import save_for_ort, save_ir_for_ort


def _matmul_model(weight: np.ndarray) -> onnx.ModelProto:
    """x [2, 64] @ W [64, 64] -> y (one MatMul, W an initializer)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(weight, "W")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_resaving_a_changed_weight_leaves_no_stale_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    path = tmp_path / "m.onnx"
    data = save_for_ort(_matmul_model(w), path, inline_limit=0)
    assert data is not None and data.stat().st_size == w.nbytes
    # a pass replaces the weight (as the cast pass does), then the graph is saved over itself
    model = ir.load(str(path))
    new = (w * 2).astype(np.float32)
    model.graph.initializers["W"].const_value = ir.tensor(new, name="W")
    assert save_ir_for_ort(model, path, inline_limit=0) == data
    assert data.stat().st_size == new.nbytes  # not old + new
    x = rng.standard_normal((2, 64)).astype(np.float32)
    (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ new, rtol=1e-5, atol=1e-5)
    # unchanged weights are streamed from the old file into the new one
    model = ir.load(str(path))
    save_ir_for_ort(model, path, inline_limit=0)
    assert data.stat().st_size == new.nbytes
    (y2,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(y, y2)
    # and a graph small enough to be inline drops its data file
    save_ir_for_ort(ir.load(str(path)), path)
    assert not data.exists()
    (y3,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(y, y3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no staging folder left


def test_weights_are_streamed_aligned_and_read_back_exactly(tmp_path: Path) -> None:
    """Large weights start on 4 KiB boundaries; kept, replaced and tiny weights all read back bit for bit."""
    rng = np.random.default_rng(1)
    big = rng.standard_normal((640, 640)).astype(np.float32)  # 1.6 MB: aligned
    small = rng.standard_normal((4, 4)).astype(np.float32)  # 64 bytes: stays in the proto
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "S"], ["xs"]), helper.make_node("MatMul", ["x", "B"], ["y1"]),
         helper.make_node("MatMul", ["x", "C"], ["y2"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 640])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("xs", "y1", "y2")],
        [numpy_helper.from_array(np.pad(small, ((0, 0), (0, 636))), "S"), numpy_helper.from_array(big, "B"),
         numpy_helper.from_array(big[::-1].copy(), "C")],
    )  # fmt: skip
    path = tmp_path / "m.onnx"
    save_for_ort(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path, inline_limit=0)
    model = ir.load(str(path))
    changed = (big * 3).astype(np.float32)
    model.graph.initializers["C"].const_value = ir.tensor(changed, name="C")  # in memory now
    data = save_ir_for_ort(model, path, inline_limit=0)
    assert data is not None
    proto = onnx.load(str(path), load_external_data=False)
    offsets = {
        t.name: {e.key: int(e.value) for e in t.external_data if e.key in ("offset", "length")}
        for t in proto.graph.initializer
    }
    assert offsets["B"]["offset"] % 4096 == 0 and offsets["C"]["offset"] % 4096 == 0
    assert offsets["B"]["length"] == offsets["C"]["length"] == big.nbytes
    x = rng.standard_normal((4, 640)).astype(np.float32)
    xs, y1, y2 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(xs, x + np.pad(small, ((0, 0), (0, 636))))
    np.testing.assert_allclose(y1, x @ big, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(y2, x @ changed, rtol=1e-5, atol=1e-4)
    loaded = onnx.load(str(path))
    np.testing.assert_array_equal(numpy_helper.to_array(next(t for t in loaded.graph.initializer if t.name == "B")), big)


def test_an_export_does_not_keep_the_module_weights_alive(tmp_path: Path) -> None:
    """After an export, nothing holds the module's tensors: a 7B build lets go of its model before the passes."""
    import gc
    import weakref

    import torch

    from exporter.onnx_export import _export

    class Module(torch.nn.Module):  # a baked module owns the whole model; its graph uses a part of it
        def __init__(self) -> None:
            super().__init__()
            self.used = torch.nn.Linear(64, 64)
            self.unused = torch.nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.used(x))

    module = Module().eval()
    refs = [weakref.ref(module.used.weight), weakref.ref(module.unused.weight)]
    _export(module, (torch.randn(3, 64),), tmp_path / "m.onnx", ["x"], ["y"], ({0: torch.export.Dim("n", max=64)},),
            opset=20, inline_limit=1 << 30)  # fmt: skip
    del module
    gc.collect()
    assert [r() for r in refs] == [None, None]
