"""What a run prunes: a plan's operations at a budget plus one token section, and that section as a policy.

Shared by ``eval`` (:mod:`.evaluate`) and ``build`` (the CLI's plan choice and the parity check of
:mod:`.build`). :func:`token_policy` is the one place a plan token section becomes an executor policy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prune_core.errors import PruneExportError
from prune_core.ops import Operation
from prune_core.plan import AutoPruneSection, FixedScheduleSection, Plan, check_budget
from prune_core.spec import ModelSpec
from prune_core.tokens import AUTOPRUNE_FLAGS, resolve_token_section


@dataclass(frozen=True)
class PlanChoice:
    """What gets baked or evaluated: static operations, the token section, and where they came from."""

    ops: frozenset[Operation] = frozenset()
    tokens: AutoPruneSection | FixedScheduleSection | None = None
    info: dict[str, Any] = field(default_factory=dict)


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


@dataclass(frozen=True)
class PlanRequest:
    """What a user asked to prune, as the plan options give it (``--plan``, ``--budget``, ``--keep-schedule``,
    ``--autoprune-*``, ``--no-recycle``, eval's ``--autoprune-mode``); ``None`` is "not given".

    Attributes:
        plan_path / budget: the plan file, and the fraction of dense prefill FLOPs its operations keep.
        stages: a fixed keep schedule ``[(layer, tokens), ...]``.
        autoprune: AutoPrune settings by name (keys of :data:`prune_core.tokens.AUTOPRUNE_FLAGS`).
        autoprune_mode: how the executor computes an AutoPrune schedule (``exact`` or ``table``).
    """

    plan_path: Path | None = None
    budget: float | None = None
    stages: Sequence[tuple[int, int]] | None = None
    autoprune: Mapping[str, Any] = field(default_factory=dict)
    autoprune_mode: str | None = None

    def flags_given(self) -> list[str]:
        """The options this request was given by, as the user typed them."""
        flags = [flag for flag, value in (("--plan", self.plan_path), ("--budget", self.budget),
                                          ("--keep-schedule", self.stages)) if value is not None]  # fmt: skip
        flags += [AUTOPRUNE_FLAGS[k] for k, v in self.autoprune.items() if v is not None]
        return flags + (["--autoprune-mode"] if self.autoprune_mode is not None else [])


#: The request of a run given no plan option: the dense model.
NO_PRUNING = PlanRequest()


def choose_plan(model_dir: Path, request: PlanRequest = NO_PRUNING) -> tuple[ModelSpec, PlanChoice]:
    """The model's spec and what a run prunes: the plan's operations at the request's budget and the resolved
    token section (see :func:`prune_core.tokens.resolve_token_section`), with a record of where they came from.

    One line for a request that cannot be met: a budget outside (0, 1] or without a plan, a plan searched on
    another model, two token policies at once, AutoPrune settings the model cannot hold.
    """
    from exporter.adapters import load_spec

    plan_path, budget = request.plan_path, request.budget
    if budget is not None:
        check_budget(budget)
        if plan_path is None:
            raise PruneExportError("--budget needs --plan (the budget selects a prefix of the plan's steps)")
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
    also_given = ["--autoprune-mode"] if request.autoprune_mode is not None else []
    tokens = resolve_token_section(spec, plan_tokens, request.stages, request.autoprune, also_given=also_given)
    info["tokens"] = None if tokens is None else tokens.model_dump()
    return spec, PlanChoice(ops, tokens, info)
