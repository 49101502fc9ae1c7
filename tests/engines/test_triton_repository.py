"""A Triton repository written from real tiny builds: graph models, the orchestrator model, bad requests."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from engines.triton.config import check_against_onnx, parse_config
from engines.triton.repository import RepositoryFromBuild
from prune_core.autoprune import ScheduleTable
from prune_core.errors import BuildError
from prune_export.cli import main

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] is a dependency")


ROOT = Path(__file__).resolve().parents[2]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_graph_becomes_a_checked_onnxruntime_model(triton_builds: dict[str, Path], tmp_path: Path) -> None:
    build = triton_builds["autoprune"]
    repo = RepositoryFromBuild(build, tmp_path / "repo", name="vlm", instances=2)()
    models = sorted(p.name for p in repo.iterdir() if p.is_dir())
    assert models == ["vlm", "vlm_decode", "vlm_embed", "vlm_prefill", "vlm_vision"]
    for model in models[1:]:
        graph = model.removeprefix("vlm_")
        cfg = parse_config((repo / model / "config.pbtxt").read_text(), model)
        assert cfg.name == model and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 0
        assert cfg.instance_group[0].count == 2
        served = repo / model / "1" / "model.onnx"
        assert _sha(served) == _sha(build / f"{graph}.onnx")  # the build's graph, unchanged
        check_against_onnx(cfg, served, model)
    decode = parse_config((repo / "vlm_decode" / "config.pbtxt").read_text(), "decode")
    assert [list(t.dims) for t in decode.input[:4]] == [[-1, 1], [-1, 4, -1, 16], [-1, 4, -1, 16], [-1, -1]]  # batches
    versions = json.loads((repo / "versions.json").read_text())
    assert versions["build"]["target"] == "onnxruntime" and versions["onnxruntime"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial directory left
    # copies (or reflinks), never hard links: onnx and onnx-ir refuse external data with several links
    linked = [p for p in [*build.rglob("*"), *repo.rglob("*")] if p.is_file() and p.stat().st_nlink > 1]
    assert linked == []


def test_the_model_clients_call(triton_builds: dict[str, Path], tmp_path: Path) -> None:
    build = triton_builds["autoprune"]
    repo = RepositoryFromBuild(build, tmp_path / "repo", name="vlm", max_new_tokens=32, stream=True)()
    cfg = parse_config((repo / "vlm" / "config.pbtxt").read_text(), "vlm")
    assert cfg.backend == "python" and cfg.model_transaction_policy.decoupled
    from tritonclient.grpc import model_config_pb2 as pb

    inputs = {t.name: (pb.DataType.Name(t.data_type), list(t.dims), t.optional) for t in cfg.input}
    assert inputs == {"image": ("TYPE_STRING", [1], False), "question": ("TYPE_STRING", [1], False),
                      "max_new_tokens": ("TYPE_INT32", [1], True), "ignore_eos": ("TYPE_BOOL", [1], True)}  # fmt: skip
    assert [t.name for t in cfg.output] == ["answer", "new_tokens"]
    version = repo / "vlm" / "1"
    assert (version / "model.py").read_text().startswith('"""The Triton model a client calls')
    manifest = json.loads((build / "manifest.json").read_text())
    for name in ("tokenizer.json", "processor_config.json"):
        assert _sha(version / "processor" / name) == _sha(build / "processor" / name)
    spec = json.loads((version / "generation.json").read_text())
    assert spec["models"] == {g: f"vlm_{g}" for g in ("vision", "prefill", "embed", "decode")}
    assert spec["eos_token_ids"] == manifest["generation"]["eos_token_ids"]
    assert spec["image_token_id"] == manifest["generation"]["image_token_id"]
    assert (spec["max_new_tokens"], spec["default_new_tokens"], spec["num_layers"]) == (32, 32, 4)
    assert spec["input_dtypes"]["pixel_values"] == "float32" and "schedule" not in spec
    assert "Clients call **`vlm`**" in (repo / "README.md").read_text()


def test_max_batch_deploys_the_batching_orchestrator(triton_builds: dict[str, Path], tmp_path: Path) -> None:
    """``--max-batch N``: a decoupled model with the scheduler beside it and its bounds in generation.json;
    the decode model takes a batch (its first dimension is dynamic). Without it: today's one-response model."""
    build = triton_builds["autoprune"]
    repo = RepositoryFromBuild(build, tmp_path / "repo", name="vlm", max_batch=8, kv_budget_mb=64)()
    version = repo / "vlm" / "1"
    cfg = parse_config((repo / "vlm" / "config.pbtxt").read_text(), "vlm")
    assert cfg.model_transaction_policy.decoupled
    spec = json.loads((version / "generation.json").read_text())
    assert (spec["max_batch"], spec["kv_budget_bytes"], spec["stream"]) == (8, 64 * 2**20, False)
    assert spec["decode_in"] == "orchestrator"  # the caches stay in the served model's process
    assert (version / "prune_export_batching.py").read_text() == (ROOT / "engines" / "batching.py").read_text()
    decode = parse_config((repo / "vlm_decode" / "config.pbtxt").read_text(), "vlm_decode")
    dims = {t.name: list(t.dims) for t in decode.input}
    assert dims["input_ids"] == [-1, 1] and dims["past.0.key"][0] == -1 and dims["past.0.position"] == [-1, -1]
    assert "up to 8 sequences per decode step, within a KV-cache budget of 64 MiB" in (repo / "README.md").read_text()
    plain = RepositoryFromBuild(build, tmp_path / "plain", name="vlm")()
    assert not parse_config((plain / "vlm" / "config.pbtxt").read_text(), "vlm").model_transaction_policy.decoupled
    assert not (plain / "vlm" / "1" / "prune_export_batching.py").exists()
    with pytest.raises(BuildError, match="--max-batch must be between 1 and the build's decode batch bound 16"):
        RepositoryFromBuild(build, tmp_path / "r", max_batch=17)
    with pytest.raises(BuildError, match="--kv-budget-mb must be > 0"):
        RepositoryFromBuild(build, tmp_path / "r", max_batch=2, kv_budget_mb=0)
    with pytest.raises(BuildError, match="pass --max-batch N or --stream"):
        RepositoryFromBuild(build, tmp_path / "r", decode_in="orchestrator")
    bls = RepositoryFromBuild(build, tmp_path / "bls", name="vlm", max_batch=4, decode_in="bls")()
    assert json.loads((bls / "vlm" / "1" / "generation.json").read_text())["decode_in"] == "bls"
    assert "each decode step is a BLS request to `vlm_decode`" in (bls / "README.md").read_text()


def test_a_split_build_carries_its_schedule_table(triton_builds: dict[str, Path], tmp_path: Path) -> None:
    build = triton_builds["split"]
    repo = RepositoryFromBuild(build, tmp_path / "repo", name="vlm")()
    spec = json.loads((repo / "vlm" / "1" / "generation.json").read_text())
    assert set(spec["models"]) == {"vision", "embed", "decode", "prefill_head", "prefill_tail"}
    table = ScheduleTable.from_dict(json.loads((build / "schedule_table.json").read_text()))
    assert spec["schedule"]["keep"] == [list(e.keep) for e in table.entries]
    assert spec["schedule"]["merged"] == [list(e.merged) for e in table.entries]
    assert "autoprune.complexity" in spec["head_outputs"] and spec["prefill_layout"] == "split"


def test_bad_repository_requests_are_refused(triton_builds: dict[str, Path], tmp_path: Path) -> None:
    build = triton_builds["autoprune"]
    for bad in ("my model", ".hidden", "a/b", "x" * 129, ""):
        with pytest.raises(BuildError, match="cannot be served"):
            RepositoryFromBuild(build, tmp_path / "r", name=bad)
    with pytest.raises(BuildError, match="between 1 and the build's bound 1024"):
        RepositoryFromBuild(build, tmp_path / "r", max_new_tokens=5000)
    repo = RepositoryFromBuild(build, tmp_path / "r")()
    with pytest.raises(BuildError, match="already exists and is not empty; pass --overwrite"):
        RepositoryFromBuild(build, repo)()
    assert RepositoryFromBuild(build, repo, overwrite=True)() == repo
    with pytest.raises(BuildError, match="not a build directory"):
        RepositoryFromBuild(tmp_path, tmp_path / "r2")


def test_deploy_cli_errors_are_one_line(triton_builds: dict[str, Path], tmp_path: Path) -> None:
    build = triton_builds["autoprune"]
    damaged = tmp_path / "damaged"
    shutil.copytree(build, damaged)
    (damaged / "decode.onnx").write_bytes((damaged / "decode.onnx").read_bytes()[:100])
    existing = tmp_path / "existing"
    (existing / "something").mkdir(parents=True)
    cases = [
        ([str(tmp_path), "--repo", str(tmp_path / "a")], "not a build directory"),
        ([str(damaged), "--repo", str(tmp_path / "b")], "decode.onnx is truncated"),
        ([str(build), "--repo", str(existing)], "already exists and is not empty; pass --overwrite"),
        ([str(build), "--repo", str(tmp_path / "c"), "--name", "my model"], "cannot be served"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, ["deploy", *args])
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    assert sorted(p.name for p in existing.iterdir()) == ["something"]  # nothing lost
    ok = CliRunner().invoke(main, ["deploy", str(build), "--repo", str(tmp_path / "d"), "--name", "vlm", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["models"] == ["vlm", "vlm_decode", "vlm_embed", "vlm_prefill", "vlm_vision"]


def test_graphs_with_tensorrt_engines_are_served_as_plans(triton_builds: dict[str, Path], tmp_path: Path) -> None:
    """A split build whose manifest records built engines: ``tensorrt_plan`` models, shape tensors marked."""
    from prune_core.manifest import EngineReport, Manifest

    build = tmp_path / "split"
    shutil.copytree(triton_builds["split"], build)
    manifest = Manifest.load(build)
    files = {}
    for graph in manifest.graphs:
        files[graph] = f"{graph}.plan"
        (build / files[graph]).write_bytes(f"engine of {graph}".encode())  # the repository copies, never parses it
    manifest = manifest.model_copy(update={"engines": EngineReport(status="built", files=files, tensorrt="10.7.0")})
    manifest.with_file_digests(build).save(build)
    repo = RepositoryFromBuild(build, tmp_path / "repo", name="vlm", kind="gpu")()
    for graph in manifest.graphs:
        cfg = parse_config((repo / f"vlm_{graph}" / "config.pbtxt").read_text(), graph)
        assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan"
        assert (repo / f"vlm_{graph}" / "1" / "model.plan").read_bytes() == f"engine of {graph}".encode()
        assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_GPU
        shape = {t.name for t in cfg.input if t.is_shape_tensor}
        assert shape == ({"keep_counts", "merged_counts"} if graph == "prefill_tail" else set())
    assert json.loads((repo / "versions.json").read_text())["tensorrt"] == "10.7.0"
    assert "TensorRT engines (`model.plan`) only load on the TensorRT version and GPU" in (repo / "README.md").read_text()


def test_local_serving_refuses_gpu_instances_without_a_gpu(triton_builds: dict[str, Path], tmp_path: Path) -> None:
    from engines.triton.server import LocalTritonServer, _gpus_present
    from prune_core.errors import ServeError

    if _gpus_present():
        pytest.skip("this machine has a GPU")
    repo = RepositoryFromBuild(triton_builds["dense"], tmp_path / "repo", name="vlm", kind="gpu")()
    with pytest.raises(ServeError, match="ask for KIND_GPU instances and this machine has no GPU; deploy again with --device cpu"):
        LocalTritonServer(repo)
    with pytest.raises(ServeError, match="holds no model"):
        LocalTritonServer(tmp_path)
