"""The plan: the contract between search (calib/) and build (exporter/).

A plan is a versioned JSON document, validated on load, holding

* ``model``: the architecture it was made for (:class:`~prune_core.spec.ModelSpec` and its fingerprint);
* ``layout``: the reference group sizes its FLOPs ladder is computed for;
* ``steps``: the ordered GSOP steps, each a list of ``[layer, group, module]`` operations, with the
  cumulative FLOPs ratio after the step (computed, never typed in) and optionally the search metric;
* ``search``: optional search settings and baseline (written by ``prune-export search``);
* ``tokens``: optional dynamic token selection: an AutoPrune curve or a fixed per-layer keep schedule.

Any compute budget ``B`` (fraction of dense prefill FLOPs kept, in (0, 1]) is met *without re-searching*:
walk the steps, accumulate operations, stop at the first prefix whose FLOPs ratio is at most ``B``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .cost import prefill_flops
from .errors import BudgetError, PlanError, PlanMismatchError
from .io import atomic_write_json
from .ops import PRUNABLE_GROUPS, Group, Module, Operation
from .spec import GroupSizes, ModelSpec

PLAN_FORMAT = "prune-export-plan"
PLAN_VERSION = 1
#: Two FLOPs ratios closer than this are the same number (the ladder is recomputed on load).
RATIO_TOLERANCE = 1e-6


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Strict):
    fingerprint: str
    spec: dict[str, Any]


class LayoutSection(_Strict):
    sys: int = Field(ge=0)
    img_key: int = Field(ge=0)
    img_rest: int = Field(ge=0)
    txt: int = Field(ge=1)


class StepSection(_Strict):
    ops: list[tuple[int, Group, Module]]
    flops_ratio: float | None = Field(default=None, gt=0, le=1)
    metric: float | None = None


class AutoPruneSection(_Strict):
    """AutoPrune curve settings (docs/methods.md, section 4; defaults from the paper)."""

    kind: Literal["autoprune"] = "autoprune"
    tokens: float = Field(gt=0, description="T: average visual tokens per layer")
    x0: float = 14.9
    k0: float = 0.4
    gamma: float = 0.2
    amplitude: float = Field(default=0.75, gt=0, description="A, the curve's height")
    positions: Literal["renumbered", "original"] = "renumbered"
    recycle: bool = True
    k_step: float = Field(default=0.01, gt=0, description="quantisation of k in the exported schedule table")


class FixedScheduleSection(_Strict):
    """A fixed keep schedule: after layer ``layer``, at most ``tokens`` visual tokens remain.

    FastV is one stage ``[[K, R]]``; PDrop is several stages with falling counts.
    """

    kind: Literal["fixed"] = "fixed"
    stages: list[tuple[int, int]] = Field(min_length=1)
    positions: Literal["original", "renumbered"] = "original"

    @field_validator("stages")
    @classmethod
    def _monotone(cls, stages: list[tuple[int, int]]) -> list[tuple[int, int]]:
        layers = [s[0] for s in stages]
        counts = [s[1] for s in stages]
        if layers != sorted(set(layers)):
            raise ValueError(f"stage layers must be strictly increasing, got {layers}")
        if any(c < 0 for c in counts) or counts != sorted(counts, reverse=True):
            raise ValueError(f"stage token counts must be >= 0 and non-increasing, got {counts}")
        return stages


TokenSection = Annotated[AutoPruneSection | FixedScheduleSection, Field(discriminator="kind")]


class PlanDocument(_Strict):
    format: Literal["prune-export-plan"]
    version: Literal[1]
    model: ModelSection
    layout: LayoutSection
    steps: list[StepSection] = Field(default_factory=list)
    search: dict[str, Any] | None = None
    tokens: TokenSection | None = None

    @model_validator(mode="after")
    def _spec_matches_fingerprint(self) -> PlanDocument:
        try:
            spec = ModelSpec(**self.model.spec)
        except TypeError as exc:
            raise ValueError(f"model.spec does not describe a model: {exc}") from None
        if spec.fingerprint() != self.model.fingerprint:
            raise ValueError(
                f"model.fingerprint {self.model.fingerprint} does not match model.spec "
                f"(which hashes to {spec.fingerprint()}); the spec was edited"
            )
        return self


@dataclass(frozen=True)
class BudgetSelection:
    """The prefix of a plan's steps that meets a budget."""

    budget: float
    num_steps: int
    ops: frozenset[Operation]
    flops_ratio: float


class Plan:
    """A validated plan with its FLOPs ladder. Build with :meth:`load`, :meth:`from_document` or :meth:`new`."""

    def __init__(self, doc: PlanDocument) -> None:
        self.doc = doc
        self.spec = ModelSpec(**doc.model.spec)
        self.layout = GroupSizes(**doc.layout.model_dump())
        self.steps: list[list[Operation]] = []
        for i, step in enumerate(doc.steps):
            ops = [Operation(int(layer), Group(g), Module(m)) for layer, g, m in step.ops]
            for op in ops:
                if not 0 <= op.layer < self.spec.num_layers:
                    raise PlanError(
                        f"step {i}: operation {op} names layer {op.layer}, but the model has layers "
                        f"0..{self.spec.num_layers - 1}"
                    )
                if op.group not in PRUNABLE_GROUPS:
                    raise PlanError(
                        f"step {i}: operation {op} prunes group '{op.group.value}'; only "
                        f"{', '.join(g.value for g in PRUNABLE_GROUPS)} can be pruned"
                    )
            self.steps.append(ops)
        self.ladder = self._compute_ladder()
        for i, (step, ratio) in enumerate(zip(doc.steps, self.ladder[1:], strict=True)):
            if step.flops_ratio is not None and abs(step.flops_ratio - ratio) > RATIO_TOLERANCE:
                raise PlanError(
                    f"step {i}: flops_ratio {step.flops_ratio} does not match the cost model ({ratio:.6f}) for "
                    "this model and layout; delete the flops_ratio fields to have them recomputed"
                )

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def new(
        cls,
        spec: ModelSpec,
        layout: GroupSizes,
        steps: Iterable[Iterable[Operation]] = (),
        metrics: Iterable[float | None] | None = None,
        search: dict[str, Any] | None = None,
        tokens: AutoPruneSection | FixedScheduleSection | None = None,
    ) -> Plan:
        steps = [sorted(set(s)) for s in steps]
        metrics = list(metrics) if metrics is not None else [None] * len(steps)
        doc = PlanDocument(
            format=PLAN_FORMAT,
            version=PLAN_VERSION,
            model=ModelSection(fingerprint=spec.fingerprint(), spec=spec.to_json()),
            layout=LayoutSection(**layout.as_dict()),
            steps=[StepSection(ops=[tuple(op) for op in s], metric=m) for s, m in zip(steps, metrics, strict=True)],
            search=search,
            tokens=tokens,
        )
        return cls(doc)

    @classmethod
    def from_document(cls, data: Any, source: str = "plan") -> Plan:
        try:
            doc = PlanDocument.model_validate(data)
        except ValidationError as exc:
            raise PlanError(f"{source}: not a valid plan: {_summarise(exc)}") from None
        return cls(doc)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file {path} does not exist; pass a plan written by 'prune-export search'")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"{path}: not a prune-export plan (expected \"format\": \"{PLAN_FORMAT}\")")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(
                f"{path}: plan version {data.get('version')!r} is not supported by this prune-export "
                f"(reads version {PLAN_VERSION})"
            )
        return cls.from_document(data, source=str(path))

    def to_json(self) -> dict[str, Any]:
        data = self.doc.model_dump(mode="json", exclude_none=True)
        for step, ratio in zip(data["steps"], self.ladder[1:], strict=True):
            step["flops_ratio"] = round(ratio, 9)
        return data

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_json())

    # -- queries -------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.doc.model.fingerprint

    @property
    def tokens(self) -> AutoPruneSection | FixedScheduleSection | None:
        return self.doc.tokens

    def check_model(self, spec: ModelSpec, model_name: str = "the model") -> None:
        """Refuse to run on a model with another architecture than the plan was made for."""
        if spec.fingerprint() != self.fingerprint:
            diffs = [
                f"{k}: plan {v} vs model {getattr(spec, k)}"
                for k, v in self.doc.model.spec.items()
                if getattr(spec, k, None) != v
            ]
            raise PlanMismatchError(
                f"the plan was made for another model (fingerprint {self.fingerprint}, {model_name} has "
                f"{spec.fingerprint()}; differs in {', '.join(diffs) or 'fields'}); search a plan for this model"
            )

    def cumulative_ops(self, num_steps: int) -> frozenset[Operation]:
        out: set[Operation] = set()
        for step in self.steps[:num_steps]:
            out.update(step)
        return frozenset(out)

    def _compute_ladder(self) -> list[float]:
        dense = prefill_flops(self.spec, self.layout)
        ladder = [1.0]
        ops: set[Operation] = set()
        for step in self.steps:
            ops.update(step)
            ladder.append(prefill_flops(self.spec, self.layout, ops) / dense)
        return ladder

    def select(self, budget: float | None) -> BudgetSelection:
        """The shortest prefix of steps whose FLOPs ratio is at most ``budget`` (all steps when None)."""
        if budget is None:
            n = len(self.steps)
            return BudgetSelection(1.0, n, self.cumulative_ops(n), self.ladder[n])
        check_budget(budget)
        for n, ratio in enumerate(self.ladder):
            if ratio <= budget + RATIO_TOLERANCE:
                return BudgetSelection(budget, n, self.cumulative_ops(n), ratio)
        raise BudgetError(
            f"budget {budget} is below what this plan reaches (its last step keeps {self.ladder[-1]:.4f} of the "
            f"dense FLOPs); pass --budget >= {self.ladder[-1]:.4f} or search with a larger --tolerance"
        )


def check_budget(budget: float) -> float:
    if not (0.0 < budget <= 1.0):
        raise BudgetError(f"budget must be in (0, 1] (fraction of dense prefill FLOPs kept), got {budget}")
    return budget


def _summarise(exc: ValidationError, limit: int = 3) -> str:
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
