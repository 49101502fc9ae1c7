"""Every documented ``--dtype`` x ``--target`` x plan kind on the tiny model: it passes its parity check
against the PyTorch executor (fp32 reference, ONNX Runtime CPU), or it is refused before any export.

fp32 ONNX Runtime builds of every kind are covered by test_build.py; here are the fp16 builds of both
targets, the fp32 TensorRT-target builds, and the bf16 refusals.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from helpers import tiny_plan_kinds

from exporter.baked import BakedPrefill
from prune_core.errors import BuildError
from prune_core.manifest import Manifest
from prune_export.workflows.build import BuildSettings, build

KINDS = tiny_plan_kinds()  # dense, gsop, fixed, autoprune
CASES = [("fp16", target, kind) for target in ("onnxruntime", "tensorrt") for kind in KINDS] + [
    ("fp32", "tensorrt", kind) for kind in ("dense", "gsop", "fixed")
]
ONNX_FP16, ONNX_FP32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "target", "kind"), CASES, ids=["-".join(c) for c in CASES])
def test_build_passes_its_check(tiny_model: Path, tmp_path: Path, dtype: str, target: str, kind: str) -> None:
    out = tmp_path / "build"
    settings = BuildSettings(target=target, dtype=dtype, overwrite=True)
    manifest = build(tiny_model, out, KINDS[kind], settings, lambda message: None)
    assert manifest.check.status == "passed", [o for o in manifest.check.outputs if not o.ok]
    assert manifest.check.same_next_token is True
    assert all(o.ok for o in manifest.check.outputs)
    loaded = Manifest.load(out)
    assert (loaded.dtype, loaded.target) == (dtype, target)
    split = kind == "autoprune" and target == "tensorrt"
    assert loaded.prefill_layout == ("split" if split else "single")
    # The precision is in the files: float inputs and outputs are fp16 in an fp16 build, except the scores
    # and the complexity signal, which stay float32 (they decide which tokens survive).
    want = ONNX_FP16 if dtype == "fp16" else ONNX_FP32
    for name in loaded.graphs:
        graph = onnx.load(str(loaded.graph_path(out, name)), load_external_data=False).graph
        for value in [*graph.input, *graph.output]:
            elem = value.type.tensor_type.elem_type
            if elem not in (ONNX_FP16, ONNX_FP32):
                continue
            expected = ONNX_FP32 if value.name in BakedPrefill.FLOAT32_IO else want
            assert elem == expected, (name, value.name, onnx.TensorProto.DataType.Name(elem))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bf16_for_onnxruntime_is_refused_before_any_export(tiny_model: Path, tmp_path: Path, kind: str) -> None:
    out = tmp_path / "build"
    with pytest.raises(BuildError, match=r"--dtype bf16 is not available for --target onnxruntime.*--dtype fp16"):
        build(tiny_model, out, KINDS[kind], BuildSettings(dtype="bf16"), pytest.fail)  # no log line: no work
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bf16_for_tensorrt_needs_skip_check(tiny_model: Path, tmp_path: Path, kind: str) -> None:
    out = tmp_path / "build"
    with pytest.raises(BuildError, match=r"cannot be checked here.*--skip-check.*--dtype fp16"):
        build(tiny_model, out, KINDS[kind], BuildSettings(dtype="bf16", target="tensorrt"), pytest.fail)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_bf16_for_tensorrt_with_skip_check_writes_bf16_graphs(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "build"
    settings = BuildSettings(dtype="bf16", target="tensorrt", check=False)
    manifest = build(tiny_model, out, KINDS["autoprune"], settings, lambda message: None)
    assert manifest.check.status == "skipped" and manifest.dtype == "bf16"
    head = onnx.load(str(out / "prefill_head.onnx"), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*head.input, *head.output]}
    assert types["sys_embeds"] == onnx.TensorProto.BFLOAT16
    assert types["tail.visual_hidden"] == onnx.TensorProto.BFLOAT16
    assert types["tail.visual_scores"] == ONNX_FP32 and types["cls_attention"] == ONNX_FP32
