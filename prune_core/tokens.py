"""Which visual tokens a run keeps: the one resolver of a plan's token section and the token options.

``eval`` and ``build`` both turn (the model, the plan's token section, ``--keep-schedule``, the
``--autoprune-*`` overrides) into one plan token section with :func:`resolve_token_section`: an
:class:`~prune_core.plan.AutoPruneSection`, a :class:`~prune_core.plan.FixedScheduleSection` or
``None``. ``build`` bakes that section; ``eval`` runs it as a policy (``prune_export.workflows.selection``).
Only the core is needed here (the spec, the plan's sections), so the CLI can validate options before any
stage is imported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from .errors import BudgetError, PlanError, PruneExportError
from .plan import AutoPruneSection, FixedScheduleSection
from .spec import ModelSpec

#: The --autoprune-* options by AutoPrune setting (error messages name the flag).
AUTOPRUNE_FLAGS = {"tokens": "--autoprune-tokens", "x0": "--autoprune-x0", "k0": "--autoprune-k0",
                   "gamma": "--autoprune-gamma", "amplitude": "--autoprune-amplitude",
                   "positions": "--autoprune-positions", "k_step": "--autoprune-k-step", "recycle": "--no-recycle"}


def parse_keep_schedule(text: str) -> list[tuple[int, int]]:
    """``"2:144"`` or ``"8:288,16:144,24:72"`` -> stages ``[(layer, tokens), ...]``."""
    try:
        stages = [tuple(int(x) for x in part.split(":")) for part in text.split(",") if part.strip()]
    except ValueError:
        stages = []
    if not stages or any(len(s) != 2 for s in stages):
        raise PruneExportError(
            f"--keep-schedule {text!r} is not LAYER:TOKENS[,LAYER:TOKENS...] (e.g. '2:144' for FastV)"
        )
    return [(int(a), int(b)) for a, b in stages]


def resolve_token_section(
    spec: ModelSpec,
    plan_tokens: AutoPruneSection | FixedScheduleSection | None,
    stages: Sequence[tuple[int, int]] | None = None,
    autoprune: Mapping[str, Any] | None = None,
    *,
    also_given: Sequence[str] = (),
) -> AutoPruneSection | FixedScheduleSection | None:
    """The token section a run uses, checked against the model.

    Args:
        spec: the model.
        plan_tokens: the plan's token section (``None``: no plan, or a plan without one).
        stages: ``--keep-schedule`` stages ``[(layer, tokens), ...]`` (``None``: not given).
        autoprune: AutoPrune settings by name (keys of :data:`AUTOPRUNE_FLAGS`); ``None`` values are not
            given. They override the settings of the plan's AutoPrune section; ``tokens`` alone makes one.
        also_given: other AutoPrune-only flags the user passed (eval's ``--autoprune-mode``), named in the
            same errors as the ``--autoprune-*`` options.

    Raises:
        PruneExportError: (or its subclasses) a combination that names two token policies, an AutoPrune
            option without an AutoPrune budget, or settings out of range for the model.
    """
    overrides = {k: v for k, v in (autoprune or {}).items() if v is not None}
    given = [AUTOPRUNE_FLAGS[k] for k in overrides] + list(also_given)
    if stages is not None and plan_tokens is not None:
        raise PruneExportError("the plan already carries a token section; drop --keep-schedule or use another plan")
    if given and (stages is not None or isinstance(plan_tokens, FixedScheduleSection)):
        source = "--keep-schedule" if stages is not None else "the plan's fixed keep schedule"
        raise PruneExportError(f"{', '.join(given)} cannot be combined with {source}; choose one token policy")
    if isinstance(plan_tokens, AutoPruneSection) or "tokens" in overrides:
        base = plan_tokens.model_dump() if isinstance(plan_tokens, AutoPruneSection) else {}
        flags = {k: (AUTOPRUNE_FLAGS[k] if k in overrides else f"the plan's tokens.{k}") for k in AUTOPRUNE_FLAGS}
        section = autoprune_section(spec, {**base, **overrides}, flags)
        if spec.num_layers < 2:
            raise PlanError(f"AutoPrune needs at least 2 decoder layers; the model has {spec.num_layers}")
        return section
    if given:
        raise PruneExportError(
            f"{', '.join(given)} need(s) --autoprune-tokens (the AutoPrune budget T) or a plan with an AutoPrune section"
        )
    if isinstance(plan_tokens, FixedScheduleSection):
        stages, positions = [tuple(s) for s in plan_tokens.stages], plan_tokens.positions
    elif plan_tokens is not None:
        raise PruneExportError(f"token section of kind {plan_tokens.kind!r} is not supported by this version")
    else:
        positions = "original"
    if stages is None:
        return None
    bad = [layer for layer, _ in stages if not 0 <= layer < spec.num_layers]
    if bad:
        raise PruneExportError(f"keep schedule names layer(s) {bad}; the model has layers 0..{spec.num_layers - 1}")
    too_many = [(layer, count) for layer, count in stages if count > spec.visual_tokens]
    if too_many:  # a stage keeping more tokens than exist would silently prune nothing
        raise PlanError(
            f"keep schedule {too_many} keeps more visual tokens than the model has ({spec.visual_tokens}); "
            f"counts are visual tokens kept after the layer, at most {spec.visual_tokens}"
        )
    try:
        return FixedScheduleSection(stages=[(int(a), int(b)) for a, b in stages], positions=positions)
    except ValidationError as exc:  # order and counts
        reason = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise PlanError(f"keep schedule {[tuple(s) for s in stages]}: {reason}") from None


def autoprune_section(spec: ModelSpec, values: Mapping[str, Any], flags: Mapping[str, str]) -> AutoPruneSection:
    """Check AutoPrune settings against the model and build the section; ``flags`` names each setting's source."""
    tokens = values.get("tokens")
    if tokens is None or not (0 < tokens <= spec.visual_tokens):
        raise BudgetError(
            f"{flags['tokens']} (AutoPrune budget T, average visual tokens per layer) must be in "
            f"(0, {spec.visual_tokens}] for this model, got {tokens}; LLaVA-1.5 uses 64, 128 or 192"
        )
    checks = {"x0": (lambda v: True, "a finite number"), "k0": (lambda v: v >= 0, "a finite number >= 0"),
              "gamma": (lambda v: v >= 0, "a finite number >= 0"), "amplitude": (lambda v: v > 0, "> 0"),
              "k_step": (lambda v: v > 0, "> 0")}
    for key, (ok, expected) in checks.items():
        v = values.get(key)
        if v is not None and not (math.isfinite(v) and ok(v)):
            raise PlanError(f"{flags[key]} must be {expected}, got {v}")
    try:
        return AutoPruneSection(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise PlanError(f"AutoPrune settings: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
