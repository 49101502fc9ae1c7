"""trtexec / polygraphy command lines of a ``--target tensorrt`` build, against its manifest and schedule table."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from engines.tensorrt import tensorrt_commands
from prune_core.autoprune import ScheduleTable
from prune_core.manifest import Manifest


def _specs(text: str) -> dict[str, list[int]]:
    return {name: [int(v) for v in dims.split("x")] for name, dims in (p.rsplit(":", 1) for p in text.split(","))}


def test_build_writes_trtexec_commands_with_its_profiles(triton_builds: dict[str, Path]) -> None:
    build = triton_builds["split"]
    manifest = Manifest.load(build)
    script = (build / "tensorrt_commands.sh").read_text()
    assert "tensorrt_commands.sh" in manifest.files  # part of the build, digest recorded
    assert script == tensorrt_commands(manifest)
    commands = [shlex.split(c.replace("\\\n", " ")) for c in re.split(r"\n(?=trtexec)", script) if c.startswith("trtexec --onnx")]
    builds = {}
    for argv in commands:
        opts = dict(a.removeprefix("--").split("=", 1) for a in argv[1:] if "=" in a)
        builds[opts["onnx"]] = opts
        assert "--stronglyTyped" in argv and opts["saveEngine"] == opts["onnx"].replace(".onnx", ".plan")
    assert sorted(builds) == sorted(g.file for g in manifest.graphs.values())
    ranges = manifest.shape_ranges
    decode = builds["decode.onnx"]
    kv_heads, head_dim = manifest.model["num_kv_heads"], manifest.model["head_dim"]
    for i, key in enumerate(("minShapes", "optShapes", "maxShapes")):
        shapes = _specs(decode[key])
        batch = ranges["decode_batch"][i]  # 1, 1, the build's --max-batch
        assert shapes["past.2.key"] == [batch, kv_heads, ranges["past_len_2"][i], head_dim]
        assert shapes["past.2.position"] == [batch, ranges["past_len_2"][i]]
        assert shapes["input_ids"] == [batch, 1]
    assert ranges["decode_batch"] == [1, 1, manifest.generation["max_batch"]] and manifest.generation["max_batch"] == 16
    # the split prefill's shape tensors are given by value: the schedule table's per-layer count ranges
    table = ScheduleTable.from_dict(json.loads((build / "schedule_table.json").read_text()))
    keep, merged = table.count_ranges()
    tail = builds["prefill_tail.onnx"]
    for i, key in enumerate(("minShapes", "optShapes", "maxShapes")):
        shapes = _specs(tail[key])
        assert shapes["keep_counts"] == keep[i] and shapes["merged_counts"] == merged[i]
        assert shapes["tail.text_hidden"][1] == ranges["text_len"][i]
    assert "# polygraphy convert prefill_tail.onnx" in script


def test_onnxruntime_builds_have_no_command_file(triton_builds: dict[str, Path]) -> None:
    assert not (triton_builds["autoprune"] / "tensorrt_commands.sh").exists()
