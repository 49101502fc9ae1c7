import json
from pathlib import Path

import pytest

from prune_core.errors import BudgetError, PlanError, PlanMismatchError
from prune_core.ops import Group, Module, Operation
from prune_core.plan import FixedScheduleSection, Plan
from prune_core.spec import GroupSizes, ModelSpec

SPEC = ModelSpec("llava", 4, 64, 128, 4, 4, 16, 400, 16, 56, 14, 3, 32)
LAYOUT = GroupSizes.for_prompt(SPEC, 4, 12)
STEPS = [
    [Operation(3, Group.IMG_REST, m) for m in Module],
    [Operation(2, Group.IMG_REST, Module.MLP)],
    [Operation(2, Group.IMG_KEY, Module.Q), Operation(2, Group.IMG_REST, Module.Q)],
]


def make_plan(**kw) -> Plan:
    return Plan.new(SPEC, LAYOUT, STEPS, metrics=[1.0, 0.9, 0.8], **kw)


def test_round_trip_keeps_everything(tmp_path: Path) -> None:
    plan = make_plan(tokens=FixedScheduleSection(stages=[(1, 8), (2, 4)]), search={"metric": "kl"})
    path = tmp_path / "plan.json"
    plan.save(path)
    again = Plan.load(path)
    assert again.steps == plan.steps
    assert again.ladder == pytest.approx(plan.ladder)
    assert again.to_json() == plan.to_json()
    assert again.tokens == plan.tokens
    assert again.fingerprint == SPEC.fingerprint()


def test_ladder_is_decreasing_and_budgets_pick_prefixes() -> None:
    plan = make_plan()
    assert plan.ladder[0] == 1.0
    assert all(a > b for a, b in zip(plan.ladder, plan.ladder[1:], strict=False))
    assert plan.select(1.0).num_steps == 0
    assert plan.select(plan.ladder[2]).num_steps == 2
    assert plan.select(plan.ladder[2] + 1e-3).num_steps == 2
    assert plan.select(plan.ladder[1] - 1e-3).num_steps == 2
    assert plan.select(None).num_steps == 3
    assert plan.select(plan.ladder[3]).ops == frozenset(op for s in STEPS for op in s)


@pytest.mark.parametrize("budget", [0.0, -0.5, 1.01])
def test_budget_outside_unit_interval_is_refused(budget: float) -> None:
    with pytest.raises(BudgetError, match=r"\(0, 1\]"):
        make_plan().select(budget)


def test_budget_below_the_last_step_is_refused() -> None:
    with pytest.raises(BudgetError, match="below what this plan reaches"):
        make_plan().select(0.01)


def test_hand_written_plan_without_ratios_loads(tmp_path: Path) -> None:
    data = make_plan().to_json()
    for step in data["steps"]:
        del step["flops_ratio"]
    path = tmp_path / "hand.json"
    path.write_text(json.dumps(data))
    assert Plan.load(path).ladder == pytest.approx(make_plan().ladder)


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "p.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(version=7), "version 7 is not supported"),
        (lambda d: d.update(format="other"), "not a prune-export plan"),
        (lambda d: d["steps"][0]["ops"].append([9, "img_rest", "q"]), "names layer 9"),
        (lambda d: d["steps"][0]["ops"].append([1, "txt", "q"]), "only img_key, img_rest can be pruned"),
        (lambda d: d["steps"][0]["ops"].append([1, "img_rest", "attn"]), "steps.0.ops"),
        (lambda d: d["steps"][0].update(flops_ratio=0.5), "does not match the cost model"),
        (lambda d: d["model"]["spec"].update(num_layers=5), "spec was edited"),
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d.update(tokens={"kind": "fixed", "stages": [[1, 4], [2, 8]]}), "non-increasing"),
        (lambda d: d.update(tokens={"kind": "autoprune", "tokens": -1}), "tokens"),
    ],
)
def test_out_of_schema_plans_are_refused(tmp_path: Path, mutate, message: str) -> None:
    data = make_plan().to_json()
    mutate(data)
    with pytest.raises(PlanError, match=message):
        Plan.load(_write(tmp_path, data))


def test_malformed_json_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(_write(tmp_path, "{not json"))
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "nope.json")


def test_plan_for_another_model_is_refused() -> None:
    other = ModelSpec("llava", 4, 64, 128, 4, 2, 16, 400, 16, 56, 14, 3, 32)
    with pytest.raises(PlanMismatchError, match="num_kv_heads: plan 4 vs model 2"):
        make_plan().check_model(other)
    make_plan().check_model(SPEC)
