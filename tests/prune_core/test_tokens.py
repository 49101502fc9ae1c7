"""Unit tests of prune_core/tokens.py: the token-section resolver, --keep-schedule and AutoPrune checks.

The CLI tests (test_cli.py, test_cli_autoprune.py) run these paths end to end on a model folder; here the
function is called directly on a hand-made 4-layer, 16-visual-token spec.
"""

from __future__ import annotations

import math

import pytest

from prune_core.errors import BudgetError, PlanError, PruneExportError
from prune_core.plan import AutoPruneSection, FixedScheduleSection
from prune_core.spec import ModelSpec
from prune_core.tokens import AUTOPRUNE_FLAGS, parse_keep_schedule, resolve_token_section

SPEC = ModelSpec("llava", 4, 64, 128, 4, 4, 16, 100, 16, 56, 14, 3, 32)  # layers 0..3, 16 visual tokens
ONE_LAYER = ModelSpec("llava", 1, 64, 128, 4, 4, 16, 100, 16, 56, 14, 3, 32)
PLAN_AP = AutoPruneSection(tokens=8, x0=1.5, positions="original", recycle=False, k_step=0.05)
PLAN_FIXED = FixedScheduleSection(stages=[(1, 8), (2, 2)], positions="renumbered")
DEFAULTS = {"kind": "autoprune", "x0": 14.9, "k0": 0.4, "gamma": 0.2, "amplitude": 0.75,
            "positions": "renumbered", "recycle": True, "k_step": 0.01}


def _raises(cls: type[Exception], *needles: str, spec: ModelSpec = SPEC, **kwargs) -> str:
    with pytest.raises(PruneExportError) as info:
        resolve_token_section(spec, kwargs.pop("plan", None), **kwargs)
    msg = str(info.value)
    assert type(info.value) is cls, msg
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg
    return msg


def test_flags_name_every_autoprune_setting() -> None:
    assert set(AUTOPRUNE_FLAGS) == set(AutoPruneSection.model_fields) - {"kind"}


@pytest.mark.parametrize(("text", "stages"), [("2:144", [(2, 144)]), ("1:8,3:4", [(1, 8), (3, 4)]),
                                              (" 8:288 , 16:144 ,24:72,", [(8, 288), (16, 144), (24, 72)])])
def test_parse_keep_schedule(text: str, stages: list) -> None:
    assert parse_keep_schedule(text) == stages


@pytest.mark.parametrize("text", ["1-8", "", ",", "1:8:2", "a:b", "1:", "1:8,3"])
def test_parse_keep_schedule_rejects_malformed_text(text: str) -> None:
    with pytest.raises(PruneExportError) as info:
        parse_keep_schedule(text)
    assert type(info.value) is PruneExportError
    assert f"--keep-schedule {text!r} is not LAYER:TOKENS" in str(info.value)


def test_nothing_given_is_no_section() -> None:
    assert resolve_token_section(SPEC, None) is None
    assert resolve_token_section(SPEC, None, None, dict.fromkeys(AUTOPRUNE_FLAGS)) is None


def test_keep_schedule_stages_make_a_fixed_section() -> None:
    section = resolve_token_section(SPEC, None, parse_keep_schedule("1:8,3:4"))
    assert section == FixedScheduleSection(stages=[(1, 8), (3, 4)], positions="original")
    assert resolve_token_section(SPEC, None, [(0, 0), (3, 0)]).stages == [(0, 0), (3, 0)]


def test_a_plans_fixed_schedule_is_kept_with_its_positions() -> None:
    section = resolve_token_section(SPEC, PLAN_FIXED, None, {"tokens": None})
    assert isinstance(section, FixedScheduleSection)
    assert (section.stages, section.positions) == ([(1, 8), (2, 2)], "renumbered")


def test_autoprune_tokens_alone_makes_a_default_section() -> None:
    section = resolve_token_section(SPEC, None, None, {"tokens": 4, "x0": None})
    assert isinstance(section, AutoPruneSection)
    assert section.model_dump() == {**DEFAULTS, "tokens": 4.0}
    assert resolve_token_section(SPEC, None, None, {"tokens": 16}).tokens == 16  # T = all visual tokens


def test_overrides_replace_a_plans_autoprune_values_and_keep_the_others() -> None:
    section = resolve_token_section(SPEC, PLAN_AP, None, {"tokens": 4, "gamma": 0.1, "x0": None, "k0": 0})
    assert section.model_dump() == {**DEFAULTS, "tokens": 4.0, "x0": 1.5, "k0": 0.0, "gamma": 0.1,
                                    "positions": "original", "recycle": False, "k_step": 0.05}
    assert resolve_token_section(SPEC, PLAN_AP, None, {"positions": "renumbered", "recycle": True}) == \
        PLAN_AP.model_copy(update={"positions": "renumbered", "recycle": True})
    assert resolve_token_section(SPEC, PLAN_AP, also_given=["--autoprune-mode"]) == PLAN_AP


def test_two_token_policies_are_refused() -> None:
    for plan in (PLAN_AP, PLAN_FIXED):
        _raises(PruneExportError, "plan already carries a token section", "--keep-schedule", plan=plan,
                stages=[(1, 8)])
    _raises(PruneExportError, "--autoprune-tokens cannot be combined with --keep-schedule",
            stages=[(1, 8)], autoprune={"tokens": 4})
    msg = _raises(PruneExportError, "cannot be combined with the plan's fixed keep schedule", plan=PLAN_FIXED,
                  autoprune={"x0": 2.0, "recycle": False}, also_given=["--autoprune-mode"])
    assert msg.startswith("--autoprune-x0, --no-recycle, --autoprune-mode cannot")


@pytest.mark.parametrize(("autoprune", "also", "flags"), [
    ({"x0": 3.0}, (), "--autoprune-x0"), ({"recycle": False}, (), "--no-recycle"),
    ({"k_step": 0.1, "positions": "original"}, (), "--autoprune-k-step, --autoprune-positions"),
    ({}, ("--autoprune-mode",), "--autoprune-mode"),
])
def test_autoprune_options_need_a_budget(autoprune: dict, also: tuple, flags: str) -> None:
    _raises(PruneExportError, f"{flags} need(s) --autoprune-tokens", autoprune=autoprune, also_given=also)


@pytest.mark.parametrize("tokens", [0, -1, 16.5, 17, math.nan, math.inf])
def test_budget_t_must_be_in_range(tokens: float) -> None:
    _raises(BudgetError, "--autoprune-tokens", "must be in (0, 16]", f"got {tokens}",
            autoprune={"tokens": tokens})


def test_a_plans_budget_t_is_checked_against_the_model() -> None:
    _raises(BudgetError, "the plan's tokens.tokens", "(0, 16]", plan=AutoPruneSection(tokens=32))


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("k0", math.nan, "a finite number >= 0"), ("k0", -0.1, "a finite number >= 0"),
    ("gamma", -1.0, "a finite number >= 0"), ("gamma", math.inf, "a finite number >= 0"),
    ("x0", math.inf, "a finite number"), ("x0", -math.inf, "a finite number"),
    ("amplitude", 0.0, "> 0"), ("amplitude", math.nan, "> 0"),
    ("k_step", 0.0, "> 0"), ("k_step", -0.01, "> 0"),
])
def test_autoprune_settings_are_checked(key: str, value: float, expected: str) -> None:
    _raises(PlanError, f"{AUTOPRUNE_FLAGS[key]} must be {expected}, got {value}",
            autoprune={"tokens": 4, key: value})


def test_a_plans_bad_setting_names_the_plan() -> None:
    _raises(PlanError, "the plan's tokens.k0 must be a finite number >= 0, got -1.0",
            plan=AutoPruneSection(tokens=4, k0=-1))


def test_autoprune_needs_two_layers() -> None:
    _raises(PlanError, "at least 2 decoder layers", "has 1", spec=ONE_LAYER, autoprune={"tokens": 4})


@pytest.mark.parametrize(("stages", "layers"), [([(4, 8)], "[4]"), ([(-1, 8), (2, 4), (9, 1)], "[-1, 9]")])
def test_keep_schedule_layers_must_exist(stages: list, layers: str) -> None:
    _raises(PruneExportError, f"names layer(s) {layers}", "layers 0..3", stages=stages)


@pytest.mark.parametrize(("stages", "reason"), [
    ([(3, 4), (1, 8)], "stage layers must be strictly increasing, got [3, 1]"),
    ([(1, 8), (1, 4)], "stage layers must be strictly increasing, got [1, 1]"),
    ([(1, 4), (3, 8)], "stage token counts must be >= 0 and non-increasing, got [4, 8]"),
    ([(1, -1)], "stage token counts must be >= 0"),
])
def test_keep_schedule_stages_must_be_ordered(stages: list, reason: str) -> None:
    _raises(PlanError, f"keep schedule {stages}: {reason}", stages=stages)


def test_a_stage_keeping_more_tokens_than_the_model_has_is_refused() -> None:
    with pytest.raises(PlanError, match=r"keeps more visual tokens than the model has \(16\)"):
        resolve_token_section(SPEC, None, [(1, 17)])
    assert resolve_token_section(SPEC, None, [(1, 16)]) == FixedScheduleSection(stages=[(1, 16)])
