"""``prune-export build`` / ``inspect`` / ``bench`` through click's runner, on the tiny model (4 layers,
16 visual tokens).

Every build directory is made once per module by its own fixture (an export takes seconds): dense, a GSOP
plan at a budget, a fixed keep schedule, AutoPrune for TensorRT (split prefill), and a dense build of another
architecture (3 layers) with ``--skip-check`` that also serves as a foreign bench baseline.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers.cli import assert_clean_error, run

import prune_export.workflows.check as check_module
from engines.benchmark import LatencyStats
from exporter.adapters import load_spec
from exporter.autoprune_policy import AutoPrunePolicy
from exporter.demo import build_demo_model
from exporter.executor import PlanExecutor
from exporter.sample import GROUP_INDEX, Sample, key_token_mask
from prune_core.autoprune import ScheduleTable
from prune_core.cost import prefill_flops
from prune_core.manifest import CHECK_INPUTS, CHECK_REPORT, Manifest
from prune_core.ops import Group, Module, Operation
from prune_core.plan import AutoPruneSection, Plan
from prune_core.spec import DEFAULT_KEY_FRACTION, GroupSizes
from prune_export.cli import main

G, M = Group, Module
#: GSOP steps on image tokens only: img_rest entirely at layer 3, then both image MLPs at layer 2, then more.
STEPS = [
    [Operation(3, G.IMG_REST, m) for m in Module],
    [Operation(2, G.IMG_KEY, M.MLP), Operation(2, G.IMG_REST, M.MLP)],
    [Operation(1, G.IMG_REST, M.Q), Operation(1, G.IMG_REST, M.MLP)],
]


def _assert_provider(provider: str | None) -> None:
    """``--provider auto``: CPU on a machine without a GPU (CUDA only where it really came up)."""
    if torch.cuda.is_available():
        assert provider in ("CUDAExecutionProvider", "CPUExecutionProvider")
    else:
        assert provider == "CPUExecutionProvider"


def _json(*args: object) -> dict:
    """The JSON object a command printed on stdout (progress and logs go to stderr)."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _build(out: Path, *args: object) -> Manifest:
    code, output = run("build", *args, "--out", out)
    assert code == 0, output
    assert "Traceback" not in output
    return Manifest.load(out)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("builds")


@pytest.fixture(scope="module")
def dense(tiny_model: Path, workdir: Path) -> Path:
    out = workdir / "dense"
    _build(out, tiny_model)
    return out


@pytest.fixture(scope="module")
def plan(tiny_model: Path, workdir: Path) -> tuple[Path, Plan, float]:
    """A saved GSOP plan and a budget that selects its first two steps."""
    spec = load_spec(tiny_model)
    p = Plan.new(spec, GroupSizes.for_prompt(spec, 4, 12), STEPS)
    assert p.ladder[1] > p.ladder[2] > p.ladder[3]
    budget = round((p.ladder[2] + p.ladder[1]) / 2, 6)  # between steps 1 and 2: two steps selected
    path = workdir / "plan.json"
    p.save(path)
    return path, p, budget


@pytest.fixture(scope="module")
def gsop(tiny_model: Path, workdir: Path, plan) -> Path:
    path, _, budget = plan
    out = workdir / "gsop"
    _build(out, tiny_model, "--plan", path, "--budget", budget)
    return out


@pytest.fixture(scope="module")
def fixed(tiny_model: Path, workdir: Path) -> Path:
    out = workdir / "fixed"
    _build(out, tiny_model, "--keep-schedule", "1:6")
    return out


@pytest.fixture(scope="module")
def autoprune_trt(tiny_model: Path, workdir: Path) -> Path:
    out = workdir / "autoprune_trt"
    _build(out, tiny_model, "--autoprune-tokens", 4, "--target", "tensorrt")
    return out


@pytest.fixture(scope="module")
def other_model(workdir: Path) -> Path:
    """A dense build of another architecture (3 decoder layers), without the parity check."""
    model = build_demo_model(workdir / "tiny3", "tiny", seed=0, layers=3)
    out = workdir / "other_unchecked"
    _build(out, model, "--skip-check")
    return out


# -- dense ---------------------------------------------------------------------------------------------------


def test_dense_build_writes_graphs_manifest_and_check_inputs(dense: Path, tiny_model: Path) -> None:
    assert {"vision.onnx", "prefill.onnx", "manifest.json", CHECK_INPUTS} <= {p.name for p in dense.iterdir()}
    m = Manifest.load(dense)
    assert m.check.status == "passed" and m.check.samples == 2
    _assert_provider(m.check.provider)
    assert m.dtype == "fp32" and m.target == "onnxruntime" and m.prefill_layout == "single"
    assert m.model["fingerprint"] == load_spec(tiny_model).fingerprint()
    assert m.model["num_layers"] == 4 and m.model["visual_tokens"] == 16
    assert {"sys_len", "text_len"} <= set(m.shape_ranges)
    for name in ("sys_len", "text_len"):
        low, opt, high = m.shape_ranges[name]
        assert 1 <= low <= opt <= high
    assert m.versions["torch"] and m.versions["onnx"]
    assert set(m.graphs) == {"vision", "prefill", "embed", "decode"} and m.graphs["prefill"].file == "prefill.onnx"
    assert m.check.same_generation and len(m.check.generated_tokens) == 2
    # Every file of the build is recorded with its size and sha256 (computed here independently).
    import hashlib

    for name, digest in m.files.items():
        data = (dense / name).read_bytes()
        assert digest.bytes == len(data) and digest.sha256 == hashlib.sha256(data).hexdigest()
    assert {"decode.onnx", "embed.onnx", "prefill.onnx", "vision.onnx"} <= set(m.files)
    assert any(name.startswith("processor/") for name in m.files)
    assert [t.name for t in m.graphs["prefill"].inputs] == ["sys_embeds", "image_embeds", "text_embeds",
                                                             "cls_attention"]  # fmt: skip
    outputs = {o.name: o for o in m.check.outputs}
    assert outputs["logits"].max_abs_diff <= 1e-4 and outputs["logits"].ok
    assert all(f"present.{layer}.{kind}" in outputs for layer in range(4) for kind in ("key", "value"))
    assert {"vision.image_features", "vision.cls_attention", "census_flops_relative"} <= set(outputs)
    assert all(o.ok and o.max_abs_diff <= o.tolerance for o in m.check.outputs)
    assert m.check.same_next_token is True
    assert m.plan["hash"] is None and m.plan["operations"] == 0
    with np.load(dense / CHECK_INPUTS) as data:
        assert {"pixel_values", "sys_embeds", "image_embeds", "text_embeds", "cls_attention"} <= set(
            data.files
        )
    assert not list(dense.parent.glob(".dense.partial-*"))


# -- GSOP plan -----------------------------------------------------------------------------------------------


def test_gsop_build_records_the_plan_and_inspect_counts_less_work(gsop: Path, dense: Path, plan) -> None:
    path, p, budget = plan
    m = Manifest.load(gsop)
    assert m.check.status == "passed"
    assert m.plan["hash"] == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert m.plan["budget"] == budget and m.plan["steps"] == 2
    selected = p.select(budget)
    assert m.plan["operations"] == len(selected.ops) == 5
    assert m.plan["flops_ratio"] == pytest.approx(p.ladder[2])
    assert sorted(m.plan["ops"]) == sorted(str(op) for op in selected.ops)

    pruned_doc = _json("inspect", gsop, "--json")
    dense_doc = _json("inspect", dense, "--json")
    assert pruned_doc["prompt"] == dense_doc["prompt"]  # the same check prompt
    assert pruned_doc["matmul_flops"] < dense_doc["matmul_flops"]
    # Counted from the graphs: the executor's FLOPs on the check prompt plus the graph's one LM-head row.
    for doc, manifest in ((pruned_doc, m), (dense_doc, Manifest.load(dense))):
        executed = manifest.flops["check_prompts"][0]["executed"]
        assert doc["matmul_flops"] == executed + manifest.flops["lm_head_row"]
    assert pruned_doc["op_counts"]["MatMul"] > 0 and "prefill" in pruned_doc["op_counts_per_graph"]
    assert pruned_doc["plan"]["hash"] == m.plan["hash"]
    kv_pruned, kv_dense = pruned_doc["kv_tokens_per_layer"], dense_doc["kv_tokens_per_layer"]
    assert kv_pruned[:3] == kv_dense[:3] and kv_pruned[3] < kv_dense[3]  # img_rest gives no K/V at layer 3
    assert "autoprune" not in pruned_doc


def _check_prompt_flops(build: Path, spec, ops=()) -> int:
    """Cost-model FLOPs of a build's check prompt (what bench measures) plus the graph's one LM-head row."""
    with np.load(build / CHECK_INPUTS) as data:
        sys_len, txt_len = data["sys_embeds"].shape[1], data["text_embeds"].shape[1]
    sizes = GroupSizes.for_prompt(spec, sys_len, txt_len)
    return prefill_flops(spec, sizes, ops) + 2 * spec.hidden_size * spec.vocab_size


def test_bench_measures_both_builds_and_counts_their_flops(gsop: Path, dense: Path, plan, tiny_model: Path) -> None:
    _, p, budget = plan
    spec = load_spec(tiny_model)
    doc = _json("bench", gsop, "--baseline", dense, "--runs", 3, "--warmup", 1, "--json")
    assert {"dense_ms", "pruned_ms", "speedup", "flops_speedup", "efficiency", "provider"} <= set(doc)
    _assert_provider(doc["provider"])
    assert doc["runs"] == 3 and doc["dense_ms"] > 0 and doc["pruned_ms"] > 0
    # FLOPs counted from the graphs equal the cost model's for the same prompt and the plan's operations.
    dense_flops = _check_prompt_flops(dense, spec)
    pruned_flops = _check_prompt_flops(gsop, spec, p.select(budget).ops)
    assert pruned_flops < dense_flops
    assert (doc["dense_flops"], doc["pruned_flops"]) == (dense_flops, pruned_flops)
    assert doc["flops_speedup"] == pytest.approx(dense_flops / pruned_flops, rel=1e-12)


def test_bench_speedup_and_efficiency_from_known_timings(
    gsop: Path, dense: Path, plan, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timings are fixed (dense 20 ms, pruned 8 ms median): speedup 2.5, efficiency 2.5 / FLOPs speedup."""
    ran: list[str] = []

    def fake_compare(dense_fn, pruned_fn, *, runs, warmup, progress=None):
        dense_fn()  # both graphs really run, once each
        pruned_fn()
        ran.extend(["dense", "pruned"])
        return (LatencyStats(median_ms=20.0, mean_ms=21.0, min_ms=19.0, p90_ms=24.0, runs=runs),
                LatencyStats(median_ms=8.0, mean_ms=8.5, min_ms=7.5, p90_ms=9.0, runs=runs))  # fmt: skip

    monkeypatch.setattr("prune_export.workflows.measure.compare_latency", fake_compare)
    _, p, budget = plan
    spec = load_spec(tiny_model)
    flops_speedup = _check_prompt_flops(dense, spec) / _check_prompt_flops(gsop, spec, p.select(budget).ops)
    doc = _json("bench", gsop, "--baseline", dense, "--runs", 5, "--warmup", 0, "--json")
    assert ran == ["dense", "pruned"]
    assert (doc["dense_ms"], doc["pruned_ms"], doc["runs"]) == (20.0, 8.0, 5)
    assert (doc["dense_p90_ms"], doc["pruned_p90_ms"]) == (24.0, 9.0)
    assert doc["speedup"] == pytest.approx(2.5)
    assert doc["efficiency"] == pytest.approx(2.5 / flops_speedup)


# -- token sections ------------------------------------------------------------------------------------------


def test_fixed_keep_schedule_builds_and_passes_the_check(fixed: Path, dense: Path) -> None:
    m = Manifest.load(fixed)
    assert m.check.status == "passed" and m.prefill_layout == "single"
    assert m.plan["tokens"] == {"kind": "fixed", "stages": [[1, 6]], "positions": "original"}
    assert m.autoprune is None
    doc = _json("inspect", fixed, "--json")
    kv_dense = _json("inspect", dense, "--json")["kv_tokens_per_layer"]
    kv = doc["kv_tokens_per_layer"]
    assert kv[:2] == kv_dense[:2]
    assert kv[2] == kv[3] == kv_dense[2] - (16 - 6)  # 6 of the 16 visual tokens survive layer 1
    assert doc["op_counts"]["TopK"] >= 1


def _check_prompt_sample(build: Path, spec) -> Sample:
    """The executor's input for a build's check prompt, rebuilt from the embeddings in its check inputs."""
    with np.load(build / CHECK_INPUTS) as data:
        sys_e, img_e, txt_e = (torch.from_numpy(data[k][0]) for k in ("sys_embeds", "image_embeds", "text_embeds"))
        cls = torch.from_numpy(data["cls_attention"][0]).float()
    start, end = sys_e.shape[0], sys_e.shape[0] + img_e.shape[0]
    n = end + txt_e.shape[0]
    groups = torch.full((n,), GROUP_INDEX[Group.TXT], dtype=torch.long)
    groups[:start] = GROUP_INDEX[Group.SYS]
    key = key_token_mask(cls, spec.key_tokens(DEFAULT_KEY_FRACTION))
    groups[start:end] = torch.where(key, GROUP_INDEX[Group.IMG_KEY], GROUP_INDEX[Group.IMG_REST])
    embeds = torch.cat([sys_e, img_e, txt_e])
    return Sample(torch.zeros(n, dtype=torch.long), embeds, groups, start, end, cls)


def test_autoprune_for_tensorrt_builds_a_split_prefill(autoprune_trt: Path, tiny_adapter) -> None:
    names = {p.name for p in autoprune_trt.iterdir()}
    assert {
        "vision.onnx",
        "prefill_head.onnx",
        "prefill_tail.onnx",
        "schedule_table.json",
        "manifest.json",
    } <= names
    assert "prefill.onnx" not in names
    m = Manifest.load(autoprune_trt)
    assert m.prefill_layout == "split" and m.target == "tensorrt" and m.check.status == "passed"
    assert set(m.graphs) == {"vision", "prefill_head", "prefill_tail", "embed", "decode"}
    assert m.autoprune is not None
    assert m.autoprune["tokens"] == 4 and m.autoprune["n0"] == 10 and m.autoprune["score_dtype"] == "float32"
    assert m.autoprune["table"] == "schedule_table.json"
    assert "keep_counts" not in m.shape_ranges  # dimensions only; per-layer value ranges in shape_values
    assert [len(v) for v in m.shape_values["keep_counts"]] == [3, 3, 3]
    tail_inputs = {t.name: t for t in m.graphs["prefill_tail"].inputs}
    assert tail_inputs["keep_counts"].dtype == "int64" and tail_inputs["keep_counts"].shape == [3]
    table = ScheduleTable.from_dict(json.loads((autoprune_trt / "schedule_table.json").read_text()))
    assert (table.num_layers, table.visual_tokens, table.tokens) == (4, 16, 4)

    doc = _json("inspect", autoprune_trt, "--json")
    assert doc["prefill_layout"] == "split"
    assert set(doc["op_counts_per_graph"]) == {"prefill_head", "prefill_tail"}
    assert "NonZero" not in doc["op_counts"]
    # The graphs' schedule row (head -> host lookup -> tail) against the executor's own AutoPrune decision on
    # the same check prompt (its I1 from the PyTorch attention, its table row, its executed counts).
    ap = doc["autoprune"]
    section = AutoPruneSection.model_validate({k: m.autoprune[k] for k in AutoPruneSection.model_fields})
    assert section.tokens == 4
    spec = tiny_adapter.spec
    sample = _check_prompt_sample(autoprune_trt, spec)
    result = PlanExecutor(tiny_adapter).prefill(sample, (), AutoPrunePolicy(section, spec, mode="table"))
    decision = result.policy.decision
    assert ap["complexity"] == pytest.approx(decision.i1, abs=1e-5)
    assert ap["keep"] == list(decision.schedule.keep) and len(ap["keep"]) == 3
    assert ap["merged"] == list(decision.schedule.merged)
    p = doc["prompt"]
    kv = doc["kv_tokens_per_layer"]
    assert kv == [t.tokens_in for t in result.trace]  # every layer caches the tokens that entered it
    assert kv[0] == p["sys_tokens"] + 16 + p["text_tokens"]
    assert kv[1] == p["sys_tokens"] + 10 + p["text_tokens"]  # N0 = floor(2.5 * 4) leave layer 0
    for layer in (1, 2):  # selections after layers 1 and 2 (none after the last): kept plus merged tokens
        assert kv[layer + 1] == p["sys_tokens"] + decision.kept[layer] + decision.merged[layer] + p["text_tokens"]
    assert doc["matmul_flops"] == m.flops["check_prompts"][0]["executed"] + m.flops["lm_head_row"]


def test_skip_check_writes_a_skipped_check(other_model: Path) -> None:
    m = Manifest.load(other_model)
    assert m.check.status == "skipped" and m.check.outputs == [] and m.check.provider is None
    assert m.model["num_layers"] == 3
    assert {"vision.onnx", "prefill.onnx", CHECK_INPUTS} <= {p.name for p in other_model.iterdir()}
    assert "check_prompts" not in m.flops  # nothing ran in PyTorch after the export


def test_inspect_without_running_counts_what_the_cost_model_says(gsop: Path, dense: Path, plan, other_model: Path) -> None:
    """``--no-run`` (shape inference, no weights loaded: how a 7B build is inspected on a CPU) gives the run's counts."""
    _, p, budget = plan
    for build, ops in ((dense, ()), (gsop, p.select(budget).ops), (other_model, ())):
        ran, counted = _json("inspect", build, "--json"), _json("inspect", build, "--json", "--no-run")
        assert counted["matmul_flops"] == ran["matmul_flops"]
        assert counted["op_counts"] == ran["op_counts"] and counted["prompt"] == ran["prompt"]
        assert counted["kv_tokens_per_layer"] is None and ran["kv_tokens_per_layer"]
        spec = load_spec(Manifest.load(build).model["path"])
        assert counted["matmul_flops"] == _check_prompt_flops(build, spec, ops)  # LM-head row included
    code, output = run("inspect", dense, "--no-run", "--text-tokens", 9)
    assert code == 0 and "(not run: --no-run)" in output


def test_inspect_without_running_refuses_an_autoprune_build(autoprune_trt: Path) -> None:
    code, output = run("inspect", autoprune_trt, "--no-run")
    assert_clean_error(code, output, "depends on the prompt")


# -- errors --------------------------------------------------------------------------------------------------


def test_build_into_a_non_empty_directory_needs_overwrite(dense: Path, tiny_model: Path) -> None:
    before = (dense / "manifest.json").read_text()
    code, output = run("build", tiny_model, "--out", dense)
    assert_clean_error(code, output, "--overwrite")
    assert code == 1
    assert (dense / "manifest.json").read_text() == before  # untouched
    assert not list(dense.parent.glob(".dense.partial-*"))


def test_budget_without_a_plan_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    code, output = run("build", tiny_model, "--out", tmp_path / "out", "--budget", 0.5)
    assert_clean_error(code, output, "--budget needs --plan")
    assert code == 1
    assert not (tmp_path / "out").exists()


def test_inspect_of_a_directory_without_manifest(tmp_path: Path) -> None:
    (tmp_path / "prefill.onnx").write_bytes(b"")
    code, output = run("inspect", tmp_path, "--json")
    assert_clean_error(code, output, "no manifest.json")
    assert code == 1


def test_bench_refuses_a_baseline_of_another_model(gsop: Path, other_model: Path) -> None:
    code, output = run("bench", gsop, "--baseline", other_model, "--runs", 1, "--warmup", 0)
    assert_clean_error(code, output, "different models")
    assert code == 1


def test_failed_parity_check_keeps_the_graphs_aside(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(check_module, "TOLERANCE", {"fp32": 0.0, "fp16": 0.0, "bf16": 0.0})
    out = tmp_path / "strict"
    code, output = run("build", tiny_model, "--out", out)
    assert code == 1 and "Traceback" not in output
    assert "do not match the PyTorch executor" in output
    assert "logits: max abs diff" in output and "> tolerance 0" in output
    assert not (out / "manifest.json").exists() and not out.exists()
    failed = tmp_path / "strict.failed"
    assert str(failed) in output
    assert {"vision.onnx", "prefill.onnx", CHECK_REPORT, CHECK_INPUTS} <= {p.name for p in failed.iterdir()}
    assert not (failed / "manifest.json").exists()
    assert not list(tmp_path.glob(".strict.partial-*"))
    report = json.loads((failed / CHECK_REPORT).read_text())
    assert report["status"] == "failed" and report["tolerance"] == 0.0
    outputs = {o["name"]: o for o in report["outputs"]}
    assert outputs["logits"]["ok"] is False and outputs["logits"]["max_abs_diff"] > 0
    assert outputs["logits"]["tolerance"] == 0.0
    bad = [name for name, o in outputs.items() if not o["ok"]]
    assert all(f"{name}: max abs diff" in output for name in bad[:12])
    # Manifest.load says why the failed directory is no build.
    code, output = run("inspect", failed)
    assert_clean_error(code, output, "no manifest.json")
