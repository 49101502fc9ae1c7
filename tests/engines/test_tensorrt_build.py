"""TensorRT engines of a real ``--target tensorrt`` build directory, against the strict stand-in module
(helpers/fake_tensorrt.py: inputs and shape tensors read from the real ONNX files, TensorRT's call order and
its way of failing), and ``build`` / ``prune-export engines`` around it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import pytest
from helpers.cli import assert_clean_error, run
from helpers.fake_tensorrt import fake_tensorrt, shape_tensor_inputs

from engines.tensorrt import EnginesFromBuild, engine_file, profile_for_graph
from prune_core.autoprune import ScheduleTable
from prune_core.errors import BuildError
from prune_core.manifest import Manifest
from prune_core.plan import AutoPruneSection
from prune_export.workflows.build import BuildSettings, build
from prune_export.workflows.selection import PlanChoice

AUTOPRUNE = PlanChoice(frozenset(), AutoPruneSection(tokens=4), {})


@pytest.fixture(scope="module")
def split_build(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checked split AutoPrune build for TensorRT, made where TensorRT is missing (no engines)."""
    out = tmp_path_factory.mktemp("trt") / "split"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "tensorrt", None)
        build(tiny_model, out, AUTOPRUNE, BuildSettings(target="tensorrt"), lambda message: None)
    return out


def test_without_tensorrt_the_build_keeps_its_graphs_and_says_why(split_build: Path) -> None:
    manifest = Manifest.load(split_build)
    assert manifest.check.status == "passed"
    assert manifest.engines is not None and manifest.engines.status == "not_built"
    assert "TensorRT is not installed" in (manifest.engines.reason or "")
    assert not list(split_build.glob("*.plan"))


def test_shape_values_describe_every_layer_from_the_schedule_table(split_build: Path) -> None:
    manifest = Manifest.load(split_build)
    table = ScheduleTable.from_dict(json.loads((split_build / "schedule_table.json").read_text()))
    layers = manifest.model["num_layers"] - 1
    for name, rows in (("keep_counts", [e.keep for e in table.entries]), ("merged_counts", [e.merged for e in table.entries])):
        low, opt, high = manifest.shape_values[name]
        assert len(low) == len(opt) == len(high) == layers
        for layer in range(layers):  # every row the host can feed lies inside the range, and both ends occur
            column = [row[layer] for row in rows]
            assert low[layer] == min(column) and high[layer] == max(column)
            assert low[layer] <= opt[layer] <= high[layer]
        assert name not in manifest.shape_ranges  # shape_ranges holds dimensions only


def test_profile_for_the_tail_graph(split_build: Path) -> None:
    manifest = Manifest.load(split_build)
    profile, values = profile_for_graph(manifest, "prefill_tail")
    sys_low, sys_opt, sys_high = manifest.shape_ranges["sys_len"]
    txt_low, txt_opt, txt_high = manifest.shape_ranges["text_len"]
    hidden = manifest.model["hidden_size"]
    assert profile["tail.sys_hidden"] == ((1, sys_low, hidden), (1, sys_opt, hidden), (1, sys_high, hidden))
    assert profile["tail.text_hidden"] == ((1, txt_low, hidden), (1, txt_opt, hidden), (1, txt_high, hidden))
    assert "tail.visual_hidden" not in profile  # static: N0 rows
    assert values["keep_counts"] == tuple(manifest.shape_values["keep_counts"])
    assert set(values) == {"keep_counts", "merged_counts"}


def test_shape_tensors_found_in_the_real_graph(split_build: Path) -> None:
    """The stand-in decides shape tensors from the graph, as TensorRT's parser does, not from a hand list."""
    tail = onnx.load(str(split_build / "prefill_tail.onnx"), load_external_data=False).graph
    head = onnx.load(str(split_build / "prefill_head.onnx"), load_external_data=False).graph
    assert shape_tensor_inputs(tail) == {"keep_counts", "merged_counts"}
    assert shape_tensor_inputs(head) == set()


def test_engines_from_build_with_the_strict_stand_in(split_build: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    trt, record = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    manifest = Manifest.load(split_build)
    work = tmp_path / "copy"
    work.mkdir()
    for path in split_build.iterdir():
        if path.is_file():
            (work / path.name).write_bytes(path.read_bytes())
    files = EnginesFromBuild(work, manifest)()
    graphs = ("vision", "prefill_head", "prefill_tail", "embed", "decode")
    assert files == {g: engine_file(g) for g in graphs}
    built = {e["graph"]: e for e in record.engines}
    assert set(built) == {f"{g}.onnx" for g in graphs}
    decode = built["decode.onnx"]  # every layer's past length has its own profile range
    assert decode["shapes"]["past.0.key"][2][2] == manifest.shape_ranges["past_len_0"][2]
    tail = built["prefill_tail.onnx"]
    assert tail["shape_tensors"] == ["keep_counts", "merged_counts"]
    assert tail["values"]["keep_counts"] == manifest.shape_values["keep_counts"]
    assert tail["shapes"]["tail.text_hidden"][2][1] == manifest.shape_ranges["text_len"][2]
    assert built["vision.onnx"]["shapes"]["pixel_values"][2][0] == manifest.shape_ranges["batch"][2]
    for graph, name in files.items():
        assert json.loads((work / name).read_bytes())["graph"] == f"{graph}.onnx"
    # TensorRT's order for each engine: network, parse, config, profile entries, add, build.
    calls = record.calls
    for start in [i for i, c in enumerate(calls) if c == "network"]:
        sequence = calls[start : calls.index("build", start) + 1]
        assert sequence[:3] == ["network", "parse", "config"]
        assert sequence.index("add_profile") > max(i for i, c in enumerate(sequence) if c.startswith("set_shape"))
        assert sequence[-2:] == ["add_profile", "build"]


def test_a_value_tensorrt_refuses_is_one_clear_line(split_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trt, record = fake_tensorrt(refuse_values=["merged_counts"])
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(BuildError) as info:
        EnginesFromBuild(split_build, Manifest.load(split_build))()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("graph 'prefill_tail': TensorRT refused the shape values for 'merged_counts'")
    assert "max input provided failure" in message
    assert all(e["graph"] != "prefill_tail.onnx" for e in record.engines)


def test_a_wrong_manifest_range_is_caught_before_tensorrt(split_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trt, record = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    manifest = Manifest.load(split_build)
    scalar = manifest.model_copy(update={"shape_values": {"keep_counts": [[0], [4], [16]],
                                                          "merged_counts": manifest.shape_values["merged_counts"]}})
    with pytest.raises(BuildError, match=r"shape values for 'keep_counts' have 1 value\(s\), but the input holds 3"):
        EnginesFromBuild(split_build, scalar)()
    assert all(e["graph"] != "prefill_tail.onnx" for e in record.engines)  # refused before TensorRT built it


def test_build_with_tensorrt_writes_engines_into_the_build(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trt, _ = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    out = tmp_path / "dense-trt"
    manifest = build(tiny_model, out, PlanChoice(), BuildSettings(target="tensorrt"), lambda message: None)
    assert manifest.engines is not None and manifest.engines.status == "built"
    assert manifest.engines.tensorrt == "10.99.0"
    assert manifest.engines.files == {g: f"{g}.plan" for g in ("vision", "prefill", "embed", "decode")}
    assert all((out / f).is_file() for f in manifest.engines.files.values())
    assert Manifest.load(out).engines == manifest.engines


def test_an_engine_failure_keeps_the_checked_build(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trt, _ = fake_tensorrt(engine_fails=True)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    out = tmp_path / "dense-trt"
    with pytest.raises(BuildError, match=r"holds the checked graphs.*prune-export engines") as info:
        build(tiny_model, out, PlanChoice(), BuildSettings(target="tensorrt"), lambda message: None)
    assert "failed to build an engine" in str(info.value)
    manifest = Manifest.load(out)
    assert manifest.check.status == "passed"
    assert manifest.engines is not None and manifest.engines.status == "failed"


def test_engines_command_builds_later_and_records_them(split_build: Path, tmp_path: Path) -> None:
    code, output = run("engines", split_build)
    assert_clean_error(code, output, "TensorRT is not installed")
    onnxruntime_build = tmp_path / "not-a-trt-build"
    onnxruntime_build.mkdir()
    code, output = run("engines", onnxruntime_build)
    assert_clean_error(code, output, "manifest.json")
