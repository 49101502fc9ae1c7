"""AutoPrune as a token policy of the executor: complexity-adaptive visual-token pruning, one prompt at a time.

The arithmetic (mutual information, curve, budget solve, schedule table, TopK, recycling) lives in
:mod:`prune_core.autoprune`; this module decides *when* each piece runs inside a prefill
(docs/methods.md, sections 4 and 5):

* **after layer 0** (which ran on every token): ``I0`` = mean over heads of the layer-0 mutual information
  between text rows and all visual columns; score = ``0.3 * I0 * txt_attn + cls_attn`` (``txt_attn``: layer-0
  attention, mean over heads and text rows; ``cls_attn``: the vision tower's [CLS] attention); keep the top
  ``N0 = min(floor(2.5*T), N_vis)`` in their original order. Nothing is recycled here.
* **after layer 1**: ``I1`` = sum over heads of the layer-1 mutual information over the ``N0`` surviving
  columns; ``k = max(k0 - gamma*I1, 0)``; the schedule ``K_l``, ``c_l`` (layers ``1..L-1``) is solved exactly
  (``mode="exact"``, the reference's host-side bisection) or looked up in a :class:`ScheduleTable` built once
  per policy (``mode="table"``, what an exported engine does). ``I1`` can be slightly negative (the MI
  estimate's smoothing), making ``k > k0``: exact mode solves at that ``k``, the table reads its ``k0`` row.
* **after every layer l >= 1**: TopK(``K_l``, capped by the current count) by that layer's text attention,
  order preserved; with recycling on, the top ``floor(0.3*D)+1`` of the ``D`` dropped tokens are DPC-KNN
  clustered into ``c_l`` merged tokens (``c_l`` from the schedule, capped by the candidates), which the
  executor inserts after the kept visual tokens as ``img_rest`` tokens. Recycling is deterministic.
  The selection after the *last* layer is skipped: it cannot change the logits or any layer's KV cache
  (layer ``L-1`` caches the tokens that entered it); the reported schedule still lists its counts.

**State.** :class:`AutoPrunePolicy` is immutable configuration (and the schedule table); the per-prompt
decisions (``I0``, ``N0``, ``I1``, ``k``, the schedule, the executed counts) live in an :class:`AutoPruneRun`
that :meth:`AutoPrunePolicy.begin` creates. :class:`~exporter.executor.PlanExecutor` calls ``begin()`` at the
start of every prefill and returns the run in :attr:`PrefillResult.policy`, so one policy object serves any
number of prompts, even concurrently, and every prompt's decision can be reported
(``result.policy.decision.to_dict()``). A driver that calls :meth:`AutoPrunePolicy.select` directly gets
a run that starts afresh at every layer-0 call (fine for sequential use only).

**Composition with GSOP operations** (one plan holding both):

* Token selection decides which visual tokens are *alive* at a layer; GSOP operations then decide which
  work the alive tokens of each group do there. Within layer ``l``: GSOP's ``q``/``kv``/``mlp`` ops shape the
  layer's computation; AutoPrune's selection acts on the layer's output and sets who enters layer ``l+1``.
* Group membership is per token and fixed by the image: ``img_key`` is the top 25% of ``N_vis`` by [CLS]
  attention, decided before any pruning; survivors keep their group, so a layer's ``img_key`` ops apply to
  the key tokens still alive there (fewer than 25% of ``N_vis`` once AutoPrune dropped some). Merged
  (recycled) tokens are ``img_rest`` and follow the ``img_rest`` ops.
* Scores come from the attention that was actually executed: a visual token whose ``kv`` op is pruned at
  layer ``l`` gets zero text attention there (it ranks last, ties to the lower index) and adds nothing to the
  mutual information. Layer 0's ``kv`` is on GSOP's danger list, so ``I0`` and the layer-0 scores are whole;
  a plan that prunes image ``kv`` at layer 1 flattens ``I1`` to what the key tokens show.
* FLOPs are the cost model of the executed per-layer, per-group counts:
  ``prefill_flops(spec, result.group_sizes_per_layer, ops)``, which is what the executor counts. A plan's
  FLOPs ladder is computed for the static layout (every visual token alive), so the executed ratio of a
  combined plan is below the ladder's and differs per prompt (``eval`` reports its mean).
* Text and system tokens are never pruned, by either method.

The MI and DPC-KNN work, like the vision tower, is not in the FLOPs count (it counts decoder matmuls only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from prune_core.autoprune import (
    ScheduleSolution,
    ScheduleTable,
    check_tokens,
    complexity_i0,
    complexity_i1,
    n0_for_budget,
    recycle,
    recycle_candidates,
    select_topk_preserving_order,
    solve_scale,
    steepness,
)
from prune_core.plan import AutoPruneSection
from prune_core.spec import ModelSpec

from .executor import PositionMode, Selection, SelectionContext

__all__ = ["AutoPruneDecision", "AutoPrunePolicy", "AutoPruneRun", "ScheduleMode"]

ScheduleMode = Literal["exact", "table"]
SCHEDULE_MODES: tuple[str, ...] = ("exact", "table")
#: Weight of the layer-0 text attention (times ``I0``) next to the [CLS] attention in the layer-0 score.
LAYER0_TEXT_WEIGHT = 0.3


@dataclass
class AutoPruneDecision:
    """What AutoPrune decided for one prompt (filled in as the prefill runs).

    ``k`` is the steepness computed from ``I1``; ``schedule.k`` is the one the schedule was solved for (the
    same in exact mode, the nearest grid point in table mode). ``kept``/``merged`` map each layer whose
    selection ran to the visual tokens TopK kept there and the recycled tokens inserted after them.
    """

    mode: ScheduleMode
    tokens: float
    i0: float | None = None
    n0: int | None = None
    i1: float | None = None
    k: float | None = None
    schedule: ScheduleSolution | None = None
    kept: dict[int, int] = field(default_factory=dict)
    merged: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly report (plain numbers and lists)."""
        s = self.schedule
        return {
            "method": "autoprune",
            "mode": self.mode,
            "tokens": self.tokens,
            "i0": self.i0,
            "n0": self.n0,
            "i1": self.i1,
            "k": self.k,
            "schedule_k": None if s is None else s.k,
            "scale": None if s is None else s.scale,
            "keep": None if s is None else list(s.keep),
            "merged": None if s is None else list(s.merged),
            "tokens_per_layer": None if s is None else list(s.tokens_per_layer),
            "mean": None if s is None else s.mean,
            "executed_keep": {str(layer): c for layer, c in sorted(self.kept.items())},
            "executed_merged": {str(layer): c for layer, c in sorted(self.merged.items())},
        }


class AutoPrunePolicy:
    """AutoPrune settings of a plan bound to a model: a reusable :class:`~exporter.executor.TokenPolicy`.

    Built from an :class:`~prune_core.plan.AutoPruneSection` and the model's :class:`ModelSpec` (layers,
    visual tokens). ``mode="exact"`` solves each prompt's schedule by bisection (the reference); ``"table"``
    builds the :class:`ScheduleTable` once here and looks schedules up by ``k`` (what an engine does). A
    budget ``T`` outside ``(0, N_vis]`` raises :class:`~prune_core.errors.BudgetError`.
    """

    def __init__(self, section: AutoPruneSection, spec: ModelSpec, mode: ScheduleMode = "exact") -> None:
        if mode not in SCHEDULE_MODES:
            raise ValueError(f"mode must be one of {', '.join(SCHEDULE_MODES)}, got {mode!r}")
        if spec.num_layers < 2:
            raise ValueError(f"AutoPrune needs at least 2 decoder layers, the model has {spec.num_layers}")
        check_tokens(section.tokens, spec.visual_tokens)
        self.section = section
        self.mode: ScheduleMode = mode
        self.num_layers = spec.num_layers
        self.visual_tokens = spec.visual_tokens
        self.positions: PositionMode = section.positions
        self.n0 = n0_for_budget(section.tokens, spec.visual_tokens)
        self.table: ScheduleTable | None = (
            ScheduleTable.for_section(section, spec.num_layers, spec.visual_tokens) if mode == "table" else None
        )
        self._direct: AutoPruneRun | None = None
        self._tables: dict[int, ScheduleTable] = {}  # table mode: images with fewer than 2.5 T visual tokens

    def steepness(self, i1: float) -> float:
        """``k = max(k0 - gamma * I1, 0)`` with this plan's ``k0`` and ``gamma``."""
        return steepness(i1, self.section.k0, self.section.gamma)

    def schedule(self, k: float, visual: int | None = None) -> ScheduleSolution | None:
        """The schedule for steepness ``k``: solved exactly, or the table row nearest to ``k``.

        ``visual``: this prompt's visual token count, when an any-resolution image gives fewer than the model's
        most (LLaVA-NeXT). ``N0 = min(2.5 T, visual)``, so an image with at least ``2.5 T`` tokens gets the same
        schedule as the largest; a smaller one gets its own, solved for its count (the reference code's
        ``min(2.5 T, N)`` cap), and one with no more than ``T`` tokens is not pruned (None).
        """
        s = self.section
        v = self.visual_tokens if visual is None else min(visual, self.visual_tokens)
        if v < self.n0 and s.tokens >= v:
            return None
        if self.table is None:  # for v >= N0 the same solve as for the largest image: N0 and the caps agree
            return solve_scale(k, s.tokens, self.num_layers, v, s.x0, s.amplitude)
        if v >= self.n0:
            return self.table.lookup(k)
        if v not in self._tables:
            self._tables[v] = ScheduleTable.for_section(s, self.num_layers, v)
        return self._tables[v].lookup(k)

    def begin(self) -> AutoPruneRun:
        """Fresh per-prompt state for one prefill (the executor calls this at the start of each prefill)."""
        return AutoPruneRun(self)

    def wants_selection(self, layer: int) -> bool:
        """Selection runs after layers ``0..L-2`` (after the last layer it could change nothing)."""
        return 0 <= layer < self.num_layers - 1

    def select(self, ctx: SelectionContext) -> Selection | None:
        """Protocol fallback for drivers that do not call :meth:`begin`: a new run starts at every layer 0."""
        if ctx.layer == 0 or self._direct is None:
            self._direct = self.begin()
        return self._direct.select(ctx)

    def __repr__(self) -> str:
        s = self.section
        return (
            f"AutoPrunePolicy(T={s.tokens}, N0={self.n0}, x0={s.x0}, k0={s.k0}, gamma={s.gamma}, "
            f"A={s.amplitude}, positions={s.positions}, recycle={s.recycle}, mode={self.mode})"
        )


class AutoPruneRun:
    """AutoPrune serving one prefill: a :class:`~exporter.executor.TokenPolicy` with per-prompt state.

    Made by :meth:`AutoPrunePolicy.begin`; its :attr:`decision` says what was decided. It expects the layers
    in order from layer 0 (a prefill resumed from a stored state after layer 0 has no ``N0`` or schedule to
    continue with, and is refused).
    """

    def __init__(self, policy: AutoPrunePolicy) -> None:
        self.policy = policy
        self.positions: PositionMode = policy.positions
        self.decision = AutoPruneDecision(mode=policy.mode, tokens=policy.section.tokens)
        self._last_layer = -1
        self._visual = policy.visual_tokens  # this prompt's visual tokens, counted at layer 0

    def wants_selection(self, layer: int) -> bool:
        return self.policy.wants_selection(layer)

    def report(self) -> dict[str, Any]:
        """The per-prompt decision as a JSON-friendly dict (for evaluation reports)."""
        return self.decision.to_dict()

    def select(self, ctx: SelectionContext) -> Selection | None:
        if ctx.num_layers != self.policy.num_layers:
            raise ValueError(
                f"AutoPrune policy was built for {self.policy.num_layers} layers, the executor runs {ctx.num_layers}"
            )
        if ctx.layer <= self._last_layer:
            raise RuntimeError(
                f"AutoPrune run saw layer {ctx.layer} after layer {self._last_layer}; one run serves one "
                "prefill (the executor calls policy.begin() per prefill)"
            )
        if ctx.layer > 0 and self.decision.n0 is None:
            raise RuntimeError(
                f"AutoPrune decides N0 after layer 0 and the schedule after layer 1; a prefill starting at "
                f"layer {ctx.layer} has neither (resume AutoPrune prefills from layer 0 only)"
            )
        self._last_layer = ctx.layer
        if ctx.layer == 0:
            return self._after_layer0(ctx)
        if ctx.layer == 1:
            self._decide_schedule(ctx)
        return self._prune(ctx)

    # -- steps ---------------------------------------------------------------------------------------------
    def _after_layer0(self, ctx: SelectionContext) -> Selection | None:
        v = int(ctx.visual_hidden.shape[0])
        i0 = _complexity(ctx.text_attention, complexity_i0)
        score = LAYER0_TEXT_WEIGHT * i0 * _text_scores(ctx.text_attention, torch.float64) + ctx.cls_attention.to(
            torch.float64
        )
        n0 = min(self.policy.n0, v)
        self._visual = v
        self.decision.i0, self.decision.n0 = i0, n0
        self.decision.kept[0], self.decision.merged[0] = n0, 0
        if n0 >= v:
            return None
        return Selection(keep=select_topk_preserving_order(score, n0))

    def _decide_schedule(self, ctx: SelectionContext) -> None:
        i1 = _complexity(ctx.text_attention, complexity_i1)
        k = self.policy.steepness(i1)
        self.decision.i1, self.decision.k = i1, k
        self.decision.schedule = self.policy.schedule(k, self._visual)

    def _prune(self, ctx: SelectionContext) -> Selection | None:
        schedule = self.decision.schedule
        v = int(ctx.visual_hidden.shape[0])
        if schedule is None:  # an image with no more visual tokens than the budget: nothing to prune
            self.decision.kept[ctx.layer], self.decision.merged[ctx.layer] = v, 0
            return None
        keep_count = min(schedule.keep[ctx.layer - 1], v)
        dropped = v - keep_count
        scores = _text_scores(ctx.text_attention, torch.float32)
        keep = select_topk_preserving_order(scores, keep_count)
        merged: torch.Tensor | None = None
        c = 0
        if self.policy.section.recycle and dropped > 0:
            c = min(schedule.merged[ctx.layer - 1], recycle_candidates(dropped))
            if c > 0:
                gone = torch.ones(v, dtype=torch.bool, device=keep.device)
                gone[keep] = False
                merged = recycle(ctx.visual_hidden[gone], scores[gone], n_clusters=c)
        self.decision.kept[ctx.layer], self.decision.merged[ctx.layer] = keep_count, c
        if dropped == 0:
            return None
        return Selection(keep=keep, merged=merged)


def _text_scores(text_attention: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mean over heads and text rows of the text rows' attention to each visual token (zeros: no text rows)."""
    if text_attention.shape[1] == 0:
        return torch.zeros(text_attention.shape[2], dtype=dtype, device=text_attention.device)
    return text_attention.to(dtype).mean(dim=(0, 1))


def _complexity(text_attention: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """``I0``/``I1`` as a float; 0 when there is no text row or no visual column to measure."""
    if text_attention.shape[1] == 0 or text_attention.shape[2] == 0:
        return 0.0
    return float(fn(text_attention))
