"""The AutoPrune parts of the CLI: ``autoprune-schedule``, ``eval --autoprune-*`` and ``plan show``.

Uses the session fixtures of conftest.py: the tiny model (4 layers, 16 visual tokens), a config-only copy of
it, and four synthetic VQA rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.cli import LLAVA_7B_CONFIG, assert_clean_error, run

from exporter.adapters import load_spec
from prune_core.autoprune import ScheduleTable, solve_scale
from prune_core.ops import Group, Module, Operation
from prune_core.plan import AutoPruneSection, FixedScheduleSection, Plan
from prune_core.spec import GroupSizes


def _plan(tiny_model: Path, path: Path, steps=(), tokens=None) -> Path:
    spec = load_spec(tiny_model)
    Plan.new(spec, GroupSizes.for_prompt(spec, 4, 12), steps, tokens=tokens).save(path)
    return path


# -- autoprune-schedule ---------------------------------------------------------------------------------


def test_schedule_json_from_a_config_only_folder(config_only: Path) -> None:
    code, out = run("autoprune-schedule", config_only, "--tokens", 4, "--k", 0.2, "--json")
    assert code == 0, out
    data = json.loads(out)
    sol = solve_scale(0.2, 4, 4, 16)
    assert data["n0"] == sol.n0 == 10
    assert data["scale"] == sol.scale
    assert data["tokens_per_layer"] == list(sol.tokens_per_layer) and len(data["tokens_per_layer"]) == 4
    assert data["keep"] == list(sol.keep) and data["merged"] == list(sol.merged)
    for i in range(1, 4):
        assert data["tokens_per_layer"][i] == data["keep"][i - 1] + data["merged"][i - 1]
    assert data["mean"] == pytest.approx(sum(data["tokens_per_layer"]) / 4)
    assert data["error"] == pytest.approx(abs(data["mean"] - 4))
    assert 0 < data["flops_ratio"] < 1


def test_schedule_text_lists_every_layer(config_only: Path) -> None:
    code, out = run("autoprune-schedule", config_only, "--tokens", 4, "--k", 0.4)
    assert code == 0, out
    assert "N0      10 visual tokens leave layer 0" in out
    assert "scale" in out and "FLOPs" in out
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]


def test_schedule_of_llava_7b_from_config_alone(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAVA_7B_CONFIG))
    code, out = run("autoprune-schedule", tmp_path, "--tokens", 64, "--k", 0, "--json")
    data = json.loads(out)
    assert data["n0"] == 160 and len(data["tokens_per_layer"]) == 32
    assert round(data["mean"], 2) == 64.19  # k = 0: a flat curve only comes close (METHODS)
    code, out = run("autoprune-schedule", tmp_path, "--tokens", 64, "--k", 0.2, "--json")
    assert json.loads(out)["error"] < 0.01


def test_schedule_table_reads_the_nearest_grid_row(config_only: Path) -> None:
    code, out = run("autoprune-schedule", config_only, "--tokens", 4, "--k", 0.123, "--table", "--k-step", 0.05,
                    "--json")
    assert code == 0, out
    data = json.loads(out)
    table = ScheduleTable.build(4, 4, 16, k_step=0.05)
    assert data["mode"] == "table" and data["schedule_k"] == 0.1
    assert data["keep"] == list(table.lookup(0.123).keep)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--tokens", 0, "--k", 0.1), "--tokens"),
        (("--tokens", 17, "--k", 0.1), "(0, 16]"),
        (("--tokens", "nan", "--k", 0.1), "--tokens"),
        (("--tokens", 4, "--k", -0.1), "--k"),
        (("--tokens", 4, "--k", "inf"), "--k"),
        (("--tokens", 4, "--k", 0.1, "--amplitude", 0), "--amplitude"),
        (("--tokens", 4, "--k", 0.1, "--table", "--k-step", 0), "--k-step"),
    ],
)
def test_schedule_errors_are_one_line(config_only: Path, args: tuple, needle: str) -> None:
    code, out = run("autoprune-schedule", config_only, *args)
    assert_clean_error(code, out, needle)


def test_schedule_of_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    code, out = run("autoprune-schedule", tmp_path / "nope", "--tokens", 4, "--k", 0.1)
    assert_clean_error(code, out, "nope")


# -- eval ----------------------------------------------------------------------------------------------


def _eval(tiny_model: Path, demo_data: Path, *args: object) -> dict:
    code, out = run("eval", tiny_model, "--data", demo_data, "--limit", 2, "--max-new-tokens", 2, "--json", *args)
    assert code == 0, out
    return json.loads(out)


def test_eval_autoprune_reports_tokens_and_executed_flops(tiny_model: Path, demo_data: Path, tmp_path: Path):
    samples = tmp_path / "samples.jsonl"
    data = _eval(tiny_model, demo_data, "--autoprune-tokens", 4, "--samples-out", samples)
    dense = _eval(tiny_model, demo_data)
    assert dense["mean_flops_ratio"] == 1.0 and dense["mean_visual_tokens_per_layer"] == [16.0] * 4
    assert data["mean_visual_tokens_per_layer"][:2] == [16.0, 10.0]
    assert all(v <= 10 for v in data["mean_visual_tokens_per_layer"][2:])
    assert 0 < data["mean_flops_ratio"] < 1
    assert data["mean_flops_ratio"] == pytest.approx(data["flops_ratio"], rel=0.05)
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    decision = rows[0]["token_decision"]
    assert decision["method"] == "autoprune" and decision["n0"] == 10 and decision["mode"] == "exact"
    assert decision["k"] == pytest.approx(max(0.4 - 0.2 * decision["i1"], 0.0))
    assert rows[0]["visual_tokens_per_layer"] == [16, *decision["tokens_per_layer"][:-1]]


def test_eval_honours_a_plans_autoprune_section(tiny_model: Path, demo_data: Path, tmp_path: Path) -> None:
    section = AutoPruneSection(tokens=4, x0=1.5, positions="original", recycle=False)
    plan = _plan(tiny_model, tmp_path / "ap.json", tokens=section)
    from_plan = _eval(tiny_model, demo_data, "--plan", plan)
    from_flags = _eval(tiny_model, demo_data, "--autoprune-tokens", 4, "--autoprune-x0", 1.5,
                       "--autoprune-positions", "original", "--no-recycle")
    assert from_plan == {**from_flags, "seconds": from_plan["seconds"]}
    # Flags override the plan's settings.
    overridden = _eval(tiny_model, demo_data, "--plan", plan, "--autoprune-tokens", 2, "--autoprune-mode", "table")
    assert overridden["mean_visual_tokens_per_layer"][1] == 5.0
    code, out = run("plan", "show", plan)
    assert code == 0 and "AutoPrune schedules" in out and "k=0" in out


def test_eval_combines_gsop_ops_with_autoprune(tiny_model: Path, demo_data: Path, tmp_path: Path) -> None:
    steps = [[Operation(layer, Group.IMG_REST, m) for layer in (2, 3) for m in (Module.Q, Module.MLP)]]
    plan = _plan(tiny_model, tmp_path / "gsop.json", steps)
    ops_only = _eval(tiny_model, demo_data, "--plan", plan)
    both = _eval(tiny_model, demo_data, "--plan", plan, "--autoprune-tokens", 4)
    tokens_only = _eval(tiny_model, demo_data, "--autoprune-tokens", 4)
    assert both["mean_flops_ratio"] < min(ops_only["mean_flops_ratio"], tokens_only["mean_flops_ratio"])
    assert both["mean_visual_tokens_per_layer"] == tokens_only["mean_visual_tokens_per_layer"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--autoprune-tokens", 17), "(0, 16]"),
        (("--autoprune-tokens", -1), "--autoprune-tokens"),
        (("--autoprune-x0", 3), "need(s) --autoprune-tokens"),
        (("--no-recycle",), "--no-recycle"),
        (("--autoprune-mode", "table"), "--autoprune-mode"),
        (("--autoprune-tokens", 4, "--keep-schedule", "1:8"), "--keep-schedule"),
        (("--autoprune-tokens", 4, "--autoprune-gamma", -1), "--autoprune-gamma"),
        (("--autoprune-tokens", 4, "--autoprune-k0", "nan"), "--autoprune-k0"),
    ],
)
def test_eval_autoprune_errors_are_one_line(tiny_model: Path, demo_data: Path, args: tuple, needle: str) -> None:
    code, out = run("eval", tiny_model, "--data", demo_data, *args)
    assert_clean_error(code, out, needle)


def test_eval_refuses_autoprune_flags_on_a_fixed_schedule_plan(tiny_model: Path, demo_data: Path, tmp_path: Path):
    plan = _plan(tiny_model, tmp_path / "fixed.json", tokens=FixedScheduleSection(stages=[(1, 8)]))
    code, out = run("eval", tiny_model, "--data", demo_data, "--plan", plan, "--autoprune-tokens", 4)
    assert_clean_error(code, out, "fixed keep schedule")


def test_eval_refuses_a_plan_budget_t_the_model_cannot_hold(tiny_model: Path, demo_data: Path, tmp_path: Path):
    plan = _plan(tiny_model, tmp_path / "big.json", tokens=AutoPruneSection(tokens=32))
    code, out = run("eval", tiny_model, "--data", demo_data, "--plan", plan)
    assert_clean_error(code, out, "tokens.tokens")
