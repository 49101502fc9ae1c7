"""What a run prunes (prune_export.workflows.selection): the rules on plan options hold for Python callers too."""

from __future__ import annotations

from pathlib import Path

import pytest

from prune_core.errors import PruneExportError
from prune_core.plan import AutoPruneSection
from prune_export.workflows.selection import NO_PRUNING, PlanRequest, choose_plan


def test_a_budget_without_a_plan_is_refused(tiny_model: Path) -> None:
    with pytest.raises(PruneExportError, match="--budget needs --plan"):
        choose_plan(tiny_model, PlanRequest(budget=0.5))


@pytest.mark.parametrize("budget", [0.0, 1.5])
def test_a_budget_outside_the_range_is_refused_before_the_plan_is_read(tiny_model: Path, budget: float) -> None:
    with pytest.raises(PruneExportError, match="budget"):
        choose_plan(tiny_model, PlanRequest(plan_path=Path("/nonexistent/plan.json"), budget=budget))


def test_no_request_is_the_dense_model(tiny_model: Path) -> None:
    spec, choice = choose_plan(tiny_model, NO_PRUNING)
    assert choice.ops == frozenset() and choice.tokens is None and choice.info["flops_ratio"] == 1.0
    assert spec.num_layers > 0


def test_autoprune_options_make_a_section(tiny_model: Path) -> None:
    _, choice = choose_plan(tiny_model, PlanRequest(autoprune={"tokens": 4, "recycle": False}))
    assert isinstance(choice.tokens, AutoPruneSection) and choice.tokens.tokens == 4 and not choice.tokens.recycle


def test_flags_given_name_what_the_user_typed() -> None:
    request = PlanRequest(plan_path=Path("p.json"), budget=0.5, stages=[(1, 4)],
                          autoprune={"tokens": 8, "x0": None, "recycle": False}, autoprune_mode="table")
    assert request.flags_given() == ["--plan", "--budget", "--keep-schedule", "--autoprune-tokens", "--no-recycle",
                                     "--autoprune-mode"]
    assert NO_PRUNING.flags_given() == []
