"""What a run prunes: a plan's operations at a budget plus one token section, and that section as a policy.

Shared by ``eval`` (:mod:`.evaluate`) and ``build`` (the CLI's plan choice and the parity check of
:mod:`.build`). :func:`token_policy` is the one place a plan token section becomes an executor policy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prune_core.plan import AutoPruneSection, FixedScheduleSection
from prune_core.spec import ModelSpec
from prune_core.tokens import resolve_token_section

if TYPE_CHECKING:
    from .build import PlanChoice


def token_policy(section: AutoPruneSection | FixedScheduleSection | None, spec: ModelSpec,
                 mode: str = "exact") -> Any:
    """The executor's token policy of a plan token section (``None`` for none).

    ``mode`` is AutoPrune's schedule mode: ``exact`` (bisection per prompt, the reference) or ``table`` (the
    schedule table an engine and the exported graph use).
    """
    from exporter.autoprune_policy import AutoPrunePolicy
    from exporter.executor import FixedKeepPolicy

    if isinstance(section, AutoPruneSection):
        return AutoPrunePolicy(section, spec, mode=mode)
    if isinstance(section, FixedScheduleSection):
        return FixedKeepPolicy.from_stages([tuple(s) for s in section.stages], section.positions)
    return None


def choose_plan(model_dir: Path, plan_path: Path | None, budget: float | None,
                stages: Sequence[tuple[int, int]] | None = None, autoprune: Mapping[str, Any] | None = None,
                also_given: Sequence[str] = ()) -> tuple[ModelSpec, PlanChoice]:
    """The model's spec and what a run prunes: the plan's operations at ``budget`` and the resolved token
    section (see :func:`prune_core.tokens.resolve_token_section`), with a record of where they came from."""
    from exporter.adapters import load_spec
    from prune_core.ops import Operation
    from prune_core.plan import Plan

    from .build import PlanChoice

    spec = load_spec(model_dir)
    ops: frozenset[Operation] = frozenset()
    plan_tokens = None
    info: dict[str, Any] = {"path": None, "hash": None, "budget": budget, "steps": 0, "operations": 0,
                            "flops_ratio": 1.0}
    if plan_path is not None:
        p = Plan.load(plan_path)
        p.check_model(spec, str(model_dir))
        selection = p.select(budget)
        ops, plan_tokens = selection.ops, p.tokens
        info.update(path=str(plan_path), hash="sha256:" + hashlib.sha256(plan_path.read_bytes()).hexdigest(),
                    steps=selection.num_steps, operations=len(ops), flops_ratio=selection.flops_ratio,
                    ops=[str(op) for op in sorted(ops)])
    tokens = resolve_token_section(spec, plan_tokens, stages, autoprune, also_given=also_given)
    info["tokens"] = None if tokens is None else tokens.model_dump()
    return spec, PlanChoice(ops, tokens, info)
