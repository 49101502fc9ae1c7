"""File digests of a build directory: recorded in manifest.json, checked on load, one-line errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from prune_core.errors import BuildDirError, BuildError, PruneExportError
from prune_core.manifest import (
    MANIFEST_NAME,
    FileDigest,
    GraphEntry,
    Manifest,
    TensorSpec,
    build_files,
    compute_file_digests,
    digest_file,
    verify_files,
)

GRAPH = "decode.onnx"
DATA = "decode.onnx.data"
TOKENIZER = "processor/tokenizer.json"


def _tiny_graph(folder: Path) -> None:
    """A real ONNX file whose weight lives in an external ``.data`` file (as the exported graphs do)."""
    weight = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node], "decode",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
        initializer=[weight],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.save_model(model, str(folder / GRAPH), save_as_external_data=True, location=DATA, size_threshold=0)
    onnx.checker.check_model(str(folder / GRAPH))


def _manifest() -> Manifest:
    spec = [TensorSpec(name="x", dtype="float32", shape=["n", 64])]
    return Manifest(
        created="2024-01-01T00:00:00+00:00", model={"fingerprint": "test"}, plan={}, dtype="fp32",
        target="onnxruntime", prefill_layout="single",
        graphs={"decode": GraphEntry(file=GRAPH, inputs=spec, outputs=spec, external_data=DATA)},
        shape_ranges={"n": [1, 1, 8]}, flops={}, check={"status": "skipped"}, versions={},
    )  # fmt: skip


@pytest.fixture
def build(tmp_path: Path) -> Path:
    """A fake build: graph + external data, a file in a subfolder, a check-inputs file, and manifest.json."""
    folder = tmp_path / "build"
    (folder / "processor").mkdir(parents=True)
    _tiny_graph(folder)
    (folder / TOKENIZER).write_text('{"model": {"vocab": {"a": 0, "b": 1}}}\n')
    (folder / "check_inputs.npz").write_bytes(b"\x00\x01" * 300)
    _manifest().save(folder)  # a provisional manifest first, as the build writes one
    _manifest().with_file_digests(folder).save(folder)
    return folder


def _expected(folder: Path) -> dict[str, dict[str, object]]:
    """The record, computed here independently of prune_export: hashlib over each file's bytes."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        data = path.read_bytes()
        out[path.relative_to(folder).as_posix()] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
    return out


def _error(folder: Path, verify: str = "full") -> str:
    with pytest.raises(BuildDirError) as info:
        Manifest.load(folder, verify=verify)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    assert isinstance(info.value, BuildError) and isinstance(info.value, PruneExportError)
    return message


def test_the_record_matches_an_independent_sha256(build: Path) -> None:
    doc = json.loads((build / MANIFEST_NAME).read_text())
    expected = _expected(build)
    assert set(expected) == {GRAPH, DATA, TOKENIZER, "check_inputs.npz"}
    assert doc["files"] == expected
    assert (build / DATA).stat().st_size == 4096 * 4  # the weights really are in the data file
    loaded = Manifest.load(build, verify="full")
    assert {k: v.model_dump() for k, v in loaded.files.items()} == expected
    assert verify_files(build, loaded, mode="full") is True
    assert verify_files(build, loaded, mode="size") is True


def test_progress_reports_every_byte_and_prints_nothing(
    build: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[int, int]] = []
    digests = compute_file_digests(build, progress=lambda done, total: calls.append((done, total)))
    total = sum(v["bytes"] for v in _expected(build).values())  # type: ignore[misc]
    assert calls and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert capsys.readouterr() == ("", "")
    calls.clear()
    verify_files(
        build, _manifest().model_copy(update={"files": digests}), progress=lambda d, t: calls.append((d, t))
    )
    assert calls[-1] == (total, total)


def test_digest_file_streams_files_larger_than_a_chunk(tmp_path: Path) -> None:
    data = bytes(range(256)) * (3 * 4096 + 17)  # ~3 MiB: several 1 MiB chunks and a partial one
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert digest_file(path) == FileDigest(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


def test_files_added_later_join_the_record(build: Path) -> None:
    (build / "decode.plan").write_bytes(b"engine" * 100)
    manifest = Manifest.load(build, verify="full")
    assert "decode.plan" not in manifest.files  # not recorded: ignored by the check
    manifest.with_file_digests(build, only=["decode.plan"]).save(build)
    assert json.loads((build / MANIFEST_NAME).read_text())["files"] == _expected(build)
    # the full rescan gives the same record
    assert Manifest.load(build).with_file_digests(build).files == Manifest.load(build).files
    # a named file that is gone leaves the record
    (build / "decode.plan").unlink()
    Manifest.load(build, verify="none").with_file_digests(build, only=["decode.plan"]).save(build)
    assert json.loads((build / MANIFEST_NAME).read_text())["files"] == _expected(build)
    Manifest.load(build, verify="full")


def test_build_files_skip_the_manifest_and_temporary_files(build: Path) -> None:
    (build / ".manifest.json.abc123.tmp").write_text("{}")
    (build / "processor" / ".vocab.json.x.tmp").write_text("{}")
    assert build_files(build) == sorted([GRAPH, DATA, TOKENIZER, "check_inputs.npz"])


def test_a_deleted_file_is_named(build: Path) -> None:
    (build / DATA).unlink()
    message = _error(build, verify="size")
    assert f"graph data file {DATA} is missing" in message
    assert "incomplete" in message and "prune-export build" in message and str(build) in message


def test_a_deleted_file_in_a_subfolder_is_named(build: Path) -> None:
    (build / TOKENIZER).unlink()
    (build / "check_inputs.npz").unlink()
    message = _error(build)
    assert f"file check_inputs.npz is missing (and 1 more: {TOKENIZER})" in message


def test_a_truncated_file_is_named(build: Path) -> None:
    data = (build / DATA).read_bytes()
    (build / DATA).write_bytes(data[:100])
    message = _error(build, verify="size")
    assert DATA in message and "truncated" in message and f"100 of {len(data)} bytes" in message
    assert "damaged" in message


def test_a_grown_file_is_named(build: Path) -> None:
    with (build / TOKENIZER).open("ab") as fh:
        fh.write(b" ")
    message = _error(build, verify="size")
    assert TOKENIZER in message and "truncated" not in message


def test_a_flipped_byte_of_the_same_size_is_named_by_the_full_check(build: Path) -> None:
    data = bytearray((build / DATA).read_bytes())
    data[len(data) // 2] ^= 0x01
    (build / DATA).write_bytes(bytes(data))
    Manifest.load(build, verify="size")  # the cheap check cannot see it
    message = _error(build, verify="full")
    assert f"graph data file {DATA} has sha256 {hashlib.sha256(bytes(data)).hexdigest()[:16]}" in message
    recorded = json.loads((build / MANIFEST_NAME).read_text())["files"][DATA]["sha256"]
    assert recorded[:16] in message and f"same size, {len(data)} bytes" in message


def test_a_modified_graph_file_is_named_as_a_graph(build: Path) -> None:
    data = bytearray((build / GRAPH).read_bytes())
    data[-1] ^= 0xFF
    (build / GRAPH).write_bytes(bytes(data))
    assert f"graph file {GRAPH} has sha256" in _error(build)


def test_a_damaged_engine_says_to_rebuild_the_engines(build: Path) -> None:
    (build / "decode.plan").write_bytes(b"engine" * 100)
    Manifest.load(build).with_file_digests(build, only=["decode.plan"]).save(build)
    (build / "decode.plan").write_bytes(b"engine" * 10)
    message = _error(build)
    assert (
        "TensorRT engine decode.plan is truncated" in message and f"prune-export engines {build}" in message
    )


def test_a_directory_without_manifest_is_not_a_build(build: Path) -> None:
    (build / MANIFEST_NAME).unlink()
    message = _error(build)
    assert f"{build} is not a build directory (no manifest.json" in message
    assert f"prune-export build MODEL --out {build}" in message


def test_a_directory_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    message = _error(missing)
    assert f"build directory {missing} does not exist" in message and f"--out {missing}" in message


def test_a_file_is_not_a_build_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert "is a file, not a build directory" in _error(tmp_path / "file")


def test_a_manifest_written_before_digests_loads_unchecked(build: Path) -> None:
    doc = json.loads((build / MANIFEST_NAME).read_text())
    del doc["files"]
    (build / MANIFEST_NAME).write_text(json.dumps(doc))
    (build / DATA).unlink()
    manifest = Manifest.load(build, verify="full")
    assert manifest.files == {}
    assert verify_files(build, manifest) is False


@pytest.mark.parametrize(
    "name", ["/etc/passwd", "../outside", "a/../b", "./a", "a//b", "a\\b", MANIFEST_NAME, ""]
)
def test_a_record_outside_the_build_is_refused(build: Path, name: str) -> None:
    doc = json.loads((build / MANIFEST_NAME).read_text())
    doc["files"][name] = {"sha256": "0" * 64, "bytes": 0}
    (build / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(BuildError) as info:
        Manifest.load(build)
    assert "files" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError):
        _manifest().with_file_digests(build, only=[name])


def test_atomic_writes_get_the_mode_of_an_ordinary_file(tmp_path: Path) -> None:
    """Not mkstemp's private 0600: a manifest must be readable by a server running as another user."""
    import stat

    from prune_core.io import atomic_write_json

    ordinary = tmp_path / "ordinary.json"
    ordinary.write_text("{}")
    atomic_write_json(tmp_path / "manifest.json", {})
    mode = stat.S_IMODE((tmp_path / "manifest.json").stat().st_mode)
    assert mode == stat.S_IMODE(ordinary.stat().st_mode) and mode & stat.S_IROTH
