"""The CLI through click's runner: happy paths and one clear line (no traceback) for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.cli import LLAVA_7B_CONFIG, assert_clean_error, run

from exporter.adapters import load_spec
from prune_core.ops import Group, Module, Operation
from prune_core.plan import Plan
from prune_core.spec import GroupSizes, ModelSpec


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    spec = load_spec(tiny_model)
    steps = [[Operation(3, Group.IMG_REST, m) for m in Module], [Operation(2, Group.IMG_REST, Module.MLP)]]
    path = tmp_path_factory.mktemp("plans") / "plan.json"
    Plan.new(spec, GroupSizes.for_prompt(spec, 4, 12), steps).save(path)
    return path


def test_demo_model_writes_a_loadable_folder(tmp_path: Path) -> None:
    code, out = run("demo-model", tmp_path / "m", "--preset", "tiny", "--seed", "3", "--kv-heads", "2")
    assert code == 0, out
    assert load_spec(tmp_path / "m").num_kv_heads == 2
    code, out = run("demo-model", tmp_path / "m")
    assert_clean_error(code, out, "--overwrite")


def test_info_json_from_a_config_only_folder(config_only: Path) -> None:
    code, out = run("info", config_only, "--json", "--text-tokens", "50")
    assert code == 0, out
    data = json.loads(out)
    for key in ("layers", "hidden_size", "intermediate_size", "heads", "kv_heads", "visual_tokens", "groups",
                "operations", "dense_prefill_flops"):
        assert key in data
    assert data["groups"] == {"sys": 35, "img_key": 4, "img_rest": 12, "txt": 50}
    assert data["operations"] == 4 * 4 * 3
    spec = ModelSpec(**data["spec"])
    from prune_core.cost import prefill_flops

    assert data["dense_prefill_flops"] == prefill_flops(spec, GroupSizes(35, 4, 12, 50))


def test_info_text_sizes_llava_7b_from_config_alone(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAVA_7B_CONFIG))
    code, out = run("info", tmp_path, "--json")
    data = json.loads(out)
    assert (data["layers"], data["hidden_size"], data["intermediate_size"], data["visual_tokens"]) == (32, 4096, 11008, 576)
    assert data["operations"] == 384 and data["groups"]["img_key"] == 144
    assert round(data["dense_prefill_flops"] / 1e12, 2) == 9.47
    code, out = run("info", tmp_path)
    assert code == 0 and "9.4739 TFLOPs" in out


def test_plan_show_ladder_and_budget(plan_file: Path) -> None:
    code, out = run("plan", "show", plan_file)
    assert code == 0 and "FLOPs ratio" in out
    plan = Plan.load(plan_file)
    code, out = run("plan", "show", plan_file, "--budget", str(plan.ladder[1]), "--json")
    data = json.loads(out)
    assert data["budget"]["steps"] == 1 and len(data["budget"]["ops"]) == 3
    assert [s["flops_ratio"] for s in data["steps"]] == pytest.approx(plan.ladder[1:])


def test_eval_json_reports_accuracy_and_flops(tiny_model: Path, demo_data: Path, plan_file: Path) -> None:
    code, out = run("eval", tiny_model, "--data", demo_data, "--json", "--max-new-tokens", "3")
    assert code == 0, out
    dense = json.loads(out)
    for key in ("samples", "accuracy", "dense_flops", "pruned_flops", "flops_ratio"):
        assert key in dense
    assert dense["samples"] == 4 and dense["flops_ratio"] == 1.0
    code, out = run("eval", tiny_model, "--data", demo_data, "--plan", plan_file, "--budget", "0.99",
                    "--json", "--max-new-tokens", "3")
    pruned = json.loads(out)
    assert pruned["dense_flops"] == dense["dense_flops"]
    assert pruned["pruned_flops"] < dense["pruned_flops"]
    assert pruned["flops_ratio"] == pytest.approx(pruned["pruned_flops"] / pruned["dense_flops"])


def test_missing_and_non_llava_folders(tmp_path: Path, demo_data: Path) -> None:
    assert_clean_error(*run("info", tmp_path / "nope"), "does not exist")
    assert_clean_error(*run("info", tmp_path), "no config.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert_clean_error(*run("info", tmp_path), "model_type 'bert' is not supported")
    assert_clean_error(*run("eval", tmp_path, "--data", demo_data), "model_type 'bert'")


def test_config_only_folder_cannot_eval(config_only: Path, demo_data: Path) -> None:
    assert_clean_error(*run("eval", config_only, "--data", demo_data), "no weights")


def test_bad_plans_and_budgets(tmp_path: Path, tiny_model: Path, demo_data: Path, plan_file: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    assert_clean_error(*run("plan", "show", bad), "not valid JSON")
    data = json.loads(plan_file.read_text())
    data["steps"][0]["ops"].append([1, "img_rest", "everything"])
    bad.write_text(json.dumps(data))
    assert_clean_error(*run("plan", "show", bad), "not a valid plan")
    assert_clean_error(*run("plan", "show", plan_file, "--budget", "1.5"), "(0, 1]")
    assert_clean_error(*run("eval", tiny_model, "--data", demo_data, "--plan", plan_file, "--budget", "0"), "(0, 1]")
    assert_clean_error(*run("eval", tiny_model, "--data", demo_data, "--budget", "0.5"), "--budget needs --plan")
    other = ModelSpec("llava", 4, 64, 128, 4, 2, 16, 400, 16, 56, 14, 3, 32)
    foreign = tmp_path / "foreign.json"
    Plan.new(other, GroupSizes.for_prompt(other, 4, 12), [[Operation(1, Group.IMG_REST, Module.Q)]]).save(foreign)
    assert_clean_error(*run("eval", tiny_model, "--data", demo_data, "--plan", foreign), "made for another model")


def test_bad_data_rows(tmp_path: Path, tiny_model: Path, demo_data: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    image = (demo_data.parent / "images" / "0000.png").resolve()
    rows.write_text(json.dumps({"image": str(image), "question": "q?"}) + "\n")
    assert_clean_error(*run("eval", tiny_model, "--data", rows), ":1: missing field(s) answer")
    rows.write_text(json.dumps({"image": "missing.png", "question": "q?", "answer": "a"}) + "\n")
    assert_clean_error(*run("eval", tiny_model, "--data", rows), "image missing.png not found")
    rows.write_text("not json\n")
    assert_clean_error(*run("eval", tiny_model, "--data", rows), "not valid JSON")
    assert_clean_error(*run("eval", tiny_model, "--data", tmp_path / "none.jsonl"), "does not exist")
    assert_clean_error(*run("eval", tiny_model, "--data", demo_data, "--keep-schedule", "x"), "LAYER:TOKENS")
