"""GSOP search: order the image-token operations of a VLM decoder from "free to prune" to "costly".

This is the search of *Greedily Sorted Operation Pruning* (docs/methods.md, section 3), written
against an abstract :class:`Evaluator` (run the model on the calibration set with a set of operations
pruned, return one number). Its output, a list of steps, is a plan: any compute budget is later met by
walking the steps, without searching again.

1. **Baseline**: the metric of the unpruned model.
2. **Free-to-prune block** (step 0): for each image group, for op sets ``[q, mlp, kv]``, ``[q, mlp]``,
   ``[q]`` (each a subset of the one before), binary-search the smallest start layer ``L`` such that
   pruning those ops at every layer ``L..last`` (with everything already accepted, closed under the
   implication rules) loses nothing against the baseline. A smaller set can only start earlier: its search
   is bounded above by the previous ``L``, which is already known to be fine.
3. **Danger-to-prune** operations (key-group ops below ``key_danger_layers``, layer-0 ``kv``) are never
   pruned, neither in step 0 nor as greedy candidates.
4. **Greedy sort with historical rankings**: every remaining candidate is scored once against the policy;
   then the best *stored* score is tried (closed under the rules, evaluated against the current policy).
   Within the tolerance ``level * T / steps`` it is accepted as the next step; otherwise it is undone, the
   level rises, and the ranking is refreshed against the current policy. Scores go stale as the policy
   grows; that is the point: re-scoring only on a rejection costs a fraction of the naive greedy, which
   re-scores every candidate before every step (``SearchResult.naive_evaluations`` counts that).

Every evaluation is memoised by its (closed) operation set, so no set is ever evaluated twice; with a
:class:`~calib.journal.Journal` the memo survives a kill, and a resumed search replays the same decisions
from the recorded values and produces the identical plan. The policy is an immutable ``frozenset`` that
is only ever replaced, never mutated in place, so an accepted step can never be lost to aliasing (the
public GSOP code aliased its current and last policy lists after an undo and could drop accepted ops).
Ties are broken by the canonical order of :class:`~prune_core.ops.Operation`, so the same inputs and
the same evaluator always give the same plan.

Why one file of ~700 lines: the search's phases share one state (the accepted set, the journal, the
levels) and one set of invariants; the evaluators, journal and distributed runner live in their own files.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

from prune_core import defaults
from prune_core.cost import prefill_flops
from prune_core.errors import InternalError, JournalError, PruneExportError
from prune_core.ops import PRUNABLE_GROUPS, Group, Module, Operation, all_operations, close_under_rules
from prune_core.plan import AutoPruneSection, FixedScheduleSection, Plan
from prune_core.spec import GroupSizes, ModelSpec

from .journal import Journal, identity_differences

OpSet = frozenset[Operation]

#: The op sets of the free-to-prune block, largest first: the whole layer, then attention-in + MLP
#: (tokens still give K/V), then attention-in only.
FREE_BLOCK_MODULE_SETS: tuple[tuple[Module, ...], ...] = (
    (Module.Q, Module.MLP, Module.KV),
    (Module.Q, Module.MLP),
    (Module.Q,),
)
#: ``img_rest`` first: it is the group that goes first (group rule), so its block can reach furthest; the
#: ``img_key`` search then starts from a policy that already holds it.
FREE_BLOCK_GROUPS: tuple[Group, ...] = (Group.IMG_REST, Group.IMG_KEY)

ToleranceMode = Literal["auto", "relative", "absolute"]


class SearchSettingsError(PruneExportError):
    """Search settings out of range (a wrong ``--tolerance``, ``--steps`` and the like)."""


# -- the evaluator interface ------------------------------------------------------------------------------
class Metric(Protocol):
    """What the evaluator measures: a name (``accuracy``, ``nll``, ``kl``) and its direction."""

    name: str
    higher_is_better: bool


class Evaluator(Protocol):
    """Runs the model on the calibration set with ``ops`` pruned and returns the metric.

    It may also offer ``evaluate_many(list_of_op_sets) -> list_of_values`` (see :class:`BatchEvaluator`);
    the search then hands it the candidate-scoring sweeps in chunks of ``SearchSettings.batch_size``.
    It must be deterministic: the same op set must give the same value, or resuming cannot replay.
    """

    metric: Metric

    def evaluate(self, ops: frozenset[Operation]) -> float: ...


class BatchEvaluator(Evaluator, Protocol):
    """An evaluator that scores several op sets in one call (e.g. one calibration pass, many variants)."""

    def evaluate_many(self, op_sets: list[frozenset[Operation]]) -> list[float]: ...


# -- settings -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchSettings:
    """Every knob of the GSOP search, with the paper's defaults.

    Attributes:
        tolerance: ``T``, the total metric drop the greedy sort may spend, split into ``steps`` equal
            levels. Read according to ``tolerance_mode``. Paper: 0.3 (30% of the baseline accuracy).
        tolerance_mode: ``relative``: the allowed drop is ``T * |baseline|`` (accuracy: 30% of it);
            ``absolute``: the allowed drop is ``T`` itself in metric units (KL to the dense model, whose
            baseline is 0, so a fraction of it would allow nothing). ``auto`` (default) picks relative
            for higher-is-better metrics (accuracy-like) and absolute for lower-is-better ones (KL, NLL).
        steps: number of tolerance levels (15-20 in the paper); level ``k`` allows a drop of ``k*T/steps``.
        key_danger_layers: ``img_key`` ops at layers below this are never pruned (public run: 6).
        protect_layer0_kv: never prune layer-0 ``kv`` of the image groups (their tokens must be seen once).
        free_block_groups: groups of the free-to-prune block, in search order. Default ``img_rest`` first:
            by the group rule key tokens go last, so the rest group's block is searched unconstrained and
            the key group's search starts from a policy that already holds it.
        free_block_module_sets: op sets of the free block, each a strict subset of the one before (a
            smaller set's search is bounded by the start layer of the larger one); empty skips step 0.
        epsilon: metric noise floor, in metric units: a drop of at most ``epsilon`` counts as no drop
            (free block) and a cumulative drop may exceed a level's allowance by at most ``epsilon``
            (greedy). It absorbs float noise (``k*T/steps`` rounding, summation order in KL/NLL) and is far
            below an accuracy quantum (1/500 on 500 questions). Default 1e-6.
        seed: recorded with the search identity; the search draws no random numbers, but evaluators that
            sample calibration data should take it from here so a plan names everything it depends on.
        batch_size: op sets handed to ``evaluate_many`` per call in a scoring sweep; bounds the work lost
            to a kill (results are journaled per chunk). Does not change the result, so it is left out of
            :meth:`identity` and of the plan.
    """

    tolerance: float = defaults.SEARCH_TOLERANCE
    tolerance_mode: ToleranceMode = "auto"
    steps: int = defaults.SEARCH_STEPS
    key_danger_layers: int = defaults.KEY_DANGER_LAYERS
    protect_layer0_kv: bool = True
    free_block_groups: tuple[Group, ...] = FREE_BLOCK_GROUPS
    free_block_module_sets: tuple[tuple[Module, ...], ...] = FREE_BLOCK_MODULE_SETS
    epsilon: float = 1e-6
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise SearchSettingsError(f"tolerance must be a finite number >= 0, got {self.tolerance}")
        if self.tolerance_mode not in ("auto", "relative", "absolute"):
            raise SearchSettingsError(
                f"tolerance mode must be auto, relative or absolute, got {self.tolerance_mode!r}"
            )
        if self.steps < 1:
            raise SearchSettingsError(f"steps must be >= 1, got {self.steps}")
        if self.key_danger_layers < 0:
            raise SearchSettingsError(f"key_danger_layers must be >= 0, got {self.key_danger_layers}")
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise SearchSettingsError(f"epsilon must be a finite number >= 0, got {self.epsilon}")
        if self.batch_size < 1:
            raise SearchSettingsError(f"batch_size must be >= 1, got {self.batch_size}")
        groups = tuple(Group(g) for g in self.free_block_groups)
        if len(set(groups)) != len(groups) or not set(groups) <= set(PRUNABLE_GROUPS):
            raise SearchSettingsError(
                f"free_block_groups must be distinct image groups ({', '.join(g.value for g in PRUNABLE_GROUPS)}), "
                f"got {[g.value for g in groups]}"
            )
        sets = tuple(tuple(Module(m) for m in s) for s in self.free_block_module_sets)
        for i, mods in enumerate(sets):
            if not mods or len(set(mods)) != len(mods):
                raise SearchSettingsError(f"free block op set {i} must be non-empty and distinct, got {mods}")
            if i and not set(mods) < set(sets[i - 1]):
                raise SearchSettingsError(
                    f"free block op set {i} {[m.value for m in mods]} must be a strict subset of the set before it "
                    f"{[m.value for m in sets[i - 1]]} (each shrink may only start earlier)"
                )
        object.__setattr__(self, "free_block_groups", groups)
        object.__setattr__(self, "free_block_module_sets", sets)

    def resolve_tolerance(self, baseline: float, higher_is_better: bool) -> tuple[str, float]:
        """``(mode, T in metric units)``: the total drop the greedy sort may spend (see ``tolerance_mode``)."""
        mode = self.tolerance_mode
        if mode == "auto":
            mode = "relative" if higher_is_better else "absolute"
        total = self.tolerance * abs(baseline) if mode == "relative" else self.tolerance
        return mode, total

    def to_json(self) -> dict[str, Any]:
        """All settings as plain JSON values."""
        data = asdict(self)
        data["free_block_groups"] = [g.value for g in self.free_block_groups]
        data["free_block_module_sets"] = [[m.value for m in s] for s in self.free_block_module_sets]
        return data

    def identity(self) -> dict[str, Any]:
        """The settings that can change the result (all but ``batch_size``): journal identity, plan record."""
        data = self.to_json()
        del data["batch_size"]
        return data


def danger_operations(spec: ModelSpec, settings: SearchSettings) -> frozenset[Operation]:
    """Operations never pruned: ``img_key`` below ``key_danger_layers``, and (optionally) layer-0 ``kv``."""
    danger = {
        Operation(layer, Group.IMG_KEY, m)
        for layer in range(min(settings.key_danger_layers, spec.num_layers))
        for m in Module
    }
    if settings.protect_layer0_kv and spec.num_layers:
        danger.update(Operation(0, g, Module.KV) for g in PRUNABLE_GROUPS)
    return frozenset(danger)


def candidate_operations(spec: ModelSpec, settings: SearchSettings) -> list[Operation]:
    """Image-group operations the search may prune, in canonical order."""
    danger = danger_operations(spec, settings)
    return sorted(op for op in all_operations(spec.num_layers, PRUNABLE_GROUPS) if op not in danger)


def journal_identity(
    spec: ModelSpec, metric: Metric, settings: SearchSettings, calibration_hash: str, dtype: str = "fp32",
    batch_size: int = 1,
) -> dict[str, Any]:
    """What a journal's values depend on: the model, the calibration data, the metric, the settings, the
    precision the model ran in and the calibration rows per forward (``--batch-size``: batched values
    equal row-by-row ones only to ~1e-7). The last two are recorded when not the default, so journals of
    earlier versions still resume. The worker count is not: values do not depend on it."""
    identity = {
        "model_fingerprint": spec.fingerprint(),
        "calibration": calibration_hash,
        "metric": {"name": metric.name, "higher_is_better": bool(metric.higher_is_better)},
        "settings": settings.identity(),
    }
    if dtype != "fp32":
        identity["dtype"] = dtype
    if batch_size != 1:
        identity["calibration_batch_size"] = batch_size
    return identity


# -- progress -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchEvent:
    """A progress report, sent after every evaluation (or chunk of them) and at phase changes.

    ``pending`` is the number of evaluations still to run in the current sweep (0 outside sweeps); with
    the rate of finished ones it gives an ETA. ``workers`` is ``(alive, started)`` for an evaluator with
    workers (Ray), else None.
    """

    phase: str
    evaluations: int
    reused: int
    pending: int
    level: int
    steps: int
    ops: int
    flops_ratio: float
    value: float | None
    workers: tuple[int, int] | None = None


ProgressCallback = Callable[[SearchEvent], None]


class TqdmProgress:
    """A progress callback drawing a tqdm bar of evaluations (rate, ETA of the current sweep, phase, level).

    Use as a context manager so the bar is closed: ``with TqdmProgress() as bar: run_search(..., progress=bar)``.
    """

    def __init__(self, **tqdm_kwargs: Any) -> None:
        from tqdm.auto import tqdm

        tqdm_kwargs.setdefault("desc", "GSOP search")
        tqdm_kwargs.setdefault("unit", "eval")
        self.bar = tqdm(total=None, **tqdm_kwargs)

    def __call__(self, event: SearchEvent) -> None:
        self.bar.total = event.evaluations + event.pending if event.pending else None
        self.bar.n = event.evaluations
        self.bar.set_postfix(
            phase=event.phase,
            level=event.level,
            steps=event.steps,
            flops=f"{event.flops_ratio:.3f}",
            metric="-" if event.value is None else f"{event.value:.4g}",
            reused=event.reused,
            refresh=False,
            **({"workers": f"{event.workers[0]}/{event.workers[1]}"} if event.workers else {}),
        )
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- result -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FreeBlockStart:
    """Outcome of one binary search of the free block: ``modules`` of ``group`` pruned from ``start`` on.

    ``start == num_layers`` means nothing of this set could be pruned for free; ``trials`` is the number
    of start layers the binary search tried (evaluated or found in the memo).
    """

    group: Group
    modules: tuple[Module, ...]
    start: int
    trials: int

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.group.value,
            "modules": [m.value for m in self.modules],
            "start": self.start,
            "trials": self.trials,
        }


@dataclass(frozen=True)
class SearchResult:
    """The outcome of :func:`run_search`.

    ``steps[0]`` is the free-to-prune block (possibly empty), each further entry the operations one
    accepted greedy choice added (after closure); ``step_metrics[i]`` is the metric with steps ``0..i``
    pruned. Counting: ``distinct_evaluations`` is the number of distinct op sets the search needed (the
    same whether or not it was resumed; the plan records it); ``evaluations_run`` of them ran in this
    process, the rest came from the journal; ``reused`` counts lookups answered from the memo or journal;
    ``naive_evaluations`` is what a greedy without historical rankings would spend in the greedy phase
    (the remaining candidates, summed over accepted steps), to compare with ``phase_evaluations["greedy"]``.
    """

    spec: ModelSpec
    layout: GroupSizes
    settings: SearchSettings
    metric_name: str
    higher_is_better: bool
    baseline: float
    tolerance_mode: str
    tolerance_total: float
    steps: tuple[tuple[Operation, ...], ...]
    step_metrics: tuple[float, ...]
    free_block: tuple[FreeBlockStart, ...]
    distinct_evaluations: int
    evaluations_run: int
    evaluations_from_journal: int
    reused: int
    phase_evaluations: dict[str, int]
    naive_evaluations: int
    refreshes: int
    rejections: int
    final_level: int
    eval_seconds: float
    wall_seconds: float

    @property
    def policy(self) -> frozenset[Operation]:
        """All operations the plan prunes (the union of the steps)."""
        return frozenset(op for step in self.steps for op in step)

    def search_record(self) -> dict[str, Any]:
        """The ``search`` section of the plan: deterministic facts only (no timings, no per-run counts)."""
        return {
            "method": "gsop",
            "metric": self.metric_name,
            "higher_is_better": self.higher_is_better,
            "baseline": self.baseline,
            "tolerance_mode": self.tolerance_mode,
            "tolerance_total": self.tolerance_total,
            "settings": self.settings.identity(),
            "evaluations": self.distinct_evaluations,
            "phase_evaluations": dict(self.phase_evaluations),
            "naive_evaluations": self.naive_evaluations,
            "step_metrics": list(self.step_metrics),
            "free_block": [fb.to_json() for fb in self.free_block],
        }


def plan_from_search(
    result: SearchResult, tokens: AutoPruneSection | FixedScheduleSection | None = None
) -> Plan:
    """The plan of a search: its steps, per-step metrics and a record of how they were found."""
    return Plan.new(
        result.spec,
        result.layout,
        steps=[list(s) for s in result.steps],
        metrics=list(result.step_metrics),
        search=result.search_record(),
        tokens=tokens,
    )


# -- the search ---------------------------------------------------------------------------------------------
class _Memo:
    """Evaluations by closed op set: journal-backed, each distinct set run at most once."""

    def __init__(self, evaluator: Evaluator, journal: Journal | None, batch_size: int,
                 notify: Callable[[int], None]) -> None:
        self.evaluator = evaluator
        self.journal = journal
        self.batch_size = batch_size
        self.notify = notify
        self.values: dict[OpSet, float] = dict(journal.items()) if journal is not None else {}
        self.journaled = frozenset(self.values)
        self.first_phase: dict[OpSet, str] = {}
        self.phase = "baseline"
        self.run = 0
        self.reused = 0
        self.seconds = 0.0
        many = getattr(evaluator, "evaluate_many", None)
        self.evaluate_many: Callable[[list[OpSet]], list[float]] | None = many if callable(many) else None

    def peek(self, ops: OpSet) -> float:
        """A value already known (no counting)."""
        return self.values[ops]

    def get(self, ops: OpSet) -> float:
        """The value of one op set: from the memo/journal, else evaluated (and journaled) now."""
        return self.get_many([ops], batched=False)[0]

    def get_many(self, op_sets: Sequence[OpSet], batched: bool = True) -> list[float]:
        """Values of several op sets; the unknown ones go to ``evaluate_many`` in chunks when offered.

        Each result is journaled as soon as its call returns (per chunk for ``evaluate_many``), so a kill
        loses at most the call in flight.
        """
        missing: list[OpSet] = []
        queued: set[OpSet] = set()
        for ops in op_sets:
            self.first_phase.setdefault(ops, self.phase)
            if ops in self.values or ops in queued:
                self.reused += 1
            else:
                missing.append(ops)
                queued.add(ops)
        if batched and self.evaluate_many is not None:
            for i in range(0, len(missing), self.batch_size):
                chunk = missing[i:i + self.batch_size]
                start = time.perf_counter()
                values = list(self.evaluate_many(chunk))
                self.seconds += time.perf_counter() - start
                if len(values) != len(chunk):
                    raise InternalError(f"evaluate_many returned {len(values)} values for {len(chunk)} op sets")
                for ops, value in zip(chunk, values, strict=True):
                    self._store(ops, value)
                self.notify(len(missing) - i - len(chunk))
        else:
            for i, ops in enumerate(missing):
                start = time.perf_counter()
                value = self.evaluator.evaluate(ops)
                self.seconds += time.perf_counter() - start
                self._store(ops, value)
                self.notify(len(missing) - i - 1)
        return [self.values[ops] for ops in op_sets]

    def _store(self, ops: OpSet, value: float) -> None:
        value = float(value)
        if math.isnan(value):
            raise InternalError(f"the evaluator returned NaN for a set of {len(ops)} pruned operations")
        if self.journal is not None:
            self.journal.record(ops, value)
        self.values[ops] = value
        self.run += 1


class _Search:
    """State of one search run; see the module docstring for the algorithm."""

    def __init__(self, evaluator: Evaluator, spec: ModelSpec, layout: GroupSizes, settings: SearchSettings,
                 journal: Journal | None, progress: ProgressCallback | None) -> None:
        self.spec = spec
        self.layout = layout
        self.settings = settings
        self.higher_is_better = bool(evaluator.metric.higher_is_better)
        self.progress = progress
        self.danger = danger_operations(spec, settings)
        self.dense_flops = prefill_flops(spec, layout)
        self.policy: OpSet = frozenset()
        self.level = 1
        self.accepted_steps = 0
        self.last_value: float | None = None
        self.memo = _Memo(evaluator, journal, settings.batch_size, self._notify)
        self.baseline = math.nan

    # -- helpers
    def _notify(self, pending: int) -> None:
        if self.progress is None:
            return
        evaluator = self.memo.evaluator
        alive, total = getattr(evaluator, "workers_alive", None), getattr(evaluator, "workers_total", None)
        self.progress(SearchEvent(
            phase=self.memo.phase,
            evaluations=self.memo.run,
            reused=self.memo.reused,
            pending=pending,
            level=self.level,
            steps=self.accepted_steps,
            ops=len(self.policy),
            flops_ratio=prefill_flops(self.spec, self.layout, self.policy) / self.dense_flops,
            value=self.last_value,
            workers=(alive, total) if alive is not None and total is not None else None,
        ))

    def drop(self, value: float) -> float:
        """Loss against the baseline in the metric's direction (positive = worse)."""
        return self.baseline - value if self.higher_is_better else value - self.baseline

    def close(self, ops: Iterable[Operation]) -> OpSet:
        closed = frozenset(close_under_rules(ops, self.spec.num_layers))
        bad = closed & self.danger
        if bad:
            raise InternalError(f"the implication rules added danger-to-prune operations {sorted(map(str, bad))}")
        return closed

    # -- phases
    def run(self) -> SearchResult:
        wall = time.perf_counter()
        self.baseline = self.memo.get(frozenset())
        self.last_value = self.baseline
        mode, total = self.settings.resolve_tolerance(self.baseline, self.higher_is_better)

        self.memo.phase = "free"
        free, starts = self._free_block()
        self.policy = free
        steps: list[tuple[Operation, ...]] = [tuple(sorted(free))]
        metrics: list[float] = [self.memo.peek(free)]
        self.last_value = metrics[0]
        self._notify(0)

        self.memo.phase = "greedy"
        naive, refreshes, rejections = self._greedy(total, steps, metrics)

        phases = {"baseline": 0, "free": 0, "greedy": 0}
        for phase in self.memo.first_phase.values():
            phases[phase] += 1
        distinct = len(self.memo.first_phase)
        journal = self.memo.journaled & self.memo.first_phase.keys()
        return SearchResult(
            spec=self.spec,
            layout=self.layout,
            settings=self.settings,
            metric_name=self.memo.evaluator.metric.name,
            higher_is_better=self.higher_is_better,
            baseline=self.baseline,
            tolerance_mode=mode,
            tolerance_total=total,
            steps=tuple(steps),
            step_metrics=tuple(metrics),
            free_block=tuple(starts),
            distinct_evaluations=distinct,
            evaluations_run=self.memo.run,
            evaluations_from_journal=len(journal),
            reused=self.memo.reused,
            phase_evaluations=phases,
            naive_evaluations=naive,
            refreshes=refreshes,
            rejections=rejections,
            final_level=self.level,
            eval_seconds=self.memo.seconds,
            wall_seconds=time.perf_counter() - wall,
        )

    def _free_block(self) -> tuple[OpSet, list[FreeBlockStart]]:
        """Binary searches of step 0; returns the accepted (closed) op set and each search's start layer.

        For a start layer ``L`` the trial is ``close(accepted | ops of the set at layers L..last)``, with
        danger ops left out of the set before closing (closure never adds them back). A trial passes when
        its drop is at most ``epsilon``; the search assumes, as the paper does, that pruning from an earlier
        layer never loses less than pruning from a later one. Results are memoised by op set, which subsumes a cache
        by start vector (equal start vectors give equal sets).
        """
        n = self.spec.num_layers
        accepted: OpSet = frozenset()
        starts: list[FreeBlockStart] = []
        for group in self.settings.free_block_groups:
            lowest = min(self.settings.key_danger_layers, n) if group is Group.IMG_KEY else 0
            bound = n  # a start known to pass: n prunes nothing new
            for modules in self.settings.free_block_module_sets:
                trials = 0
                lo, hi = lowest, bound
                while lo < hi:
                    mid = (lo + hi) // 2
                    trials += 1
                    value = self.memo.get(self._free_trial(accepted, group, modules, mid))
                    if self.drop(value) <= self.settings.epsilon:
                        hi = mid
                    else:
                        lo = mid + 1
                # passes: evaluated in the loop, or (hi == bound) nothing beyond what is already accepted
                accepted = self._free_trial(accepted, group, modules, hi)
                bound = hi
                starts.append(FreeBlockStart(group, modules, hi, trials))
                self.policy = accepted
        return accepted, starts

    def _free_trial(self, accepted: OpSet, group: Group, modules: tuple[Module, ...], start: int) -> OpSet:
        """``accepted`` plus ``modules`` of ``group`` at layers ``start..last`` (danger ops left out), closed."""
        new = {Operation(layer, group, m) for layer in range(start, self.spec.num_layers) for m in modules}
        return self.close(accepted | (new - self.danger))

    def _greedy(self, total: float, steps: list[tuple[Operation, ...]], metrics: list[float]) -> tuple[int, int, int]:
        """Greedy sort with historical rankings; appends accepted steps. Returns (naive, refreshes, rejections).

        Scores are stored per candidate with the policy they were computed against. A tried candidate is
        accepted if its cumulative drop is within ``level * total / steps`` (+ ``epsilon``). On a rejection
        the level rises and, unless the tolerance is exhausted, the ranking is refreshed against the current
        policy; if the ranking is already fresh (no step accepted since the last refresh) a re-score would
        give identical numbers, so none is done and the same best candidate is simply tried at the higher
        level (a memo hit). The loop ends when the level exceeds ``steps`` or no candidate remains.
        """
        settings = self.settings
        candidates = sorted(op for op in candidate_operations(self.spec, settings) if op not in self.policy)
        scores: dict[Operation, float] = {}
        scored_against: OpSet | None = None
        naive = refreshes = rejections = 0

        def rescore() -> None:
            nonlocal scored_against
            trials = [self.close(self.policy | {c}) for c in candidates]
            for c, value in zip(candidates, self.memo.get_many(trials), strict=True):
                scores[c] = value
            scored_against = self.policy

        if candidates:
            rescore()
        while candidates and self.level <= settings.steps:
            best = min(candidates, key=lambda c: (self.drop(scores[c]), c))
            trial = self.close(self.policy | {best})
            value = self.memo.get(trial)
            allowed = self.level * total / settings.steps
            if self.drop(value) <= allowed + settings.epsilon:
                naive += len(candidates)
                added = trial - self.policy
                self.policy = trial  # a new frozenset: earlier steps keep their own objects
                steps.append(tuple(sorted(added)))
                metrics.append(value)
                candidates = [c for c in candidates if c not in trial]
                self.accepted_steps += 1
                self.last_value = value
                self._notify(0)
            else:
                rejections += 1
                self.level += 1
                if self.level <= settings.steps and scored_against != self.policy:
                    rescore()
                    refreshes += 1
                self._notify(0)
        return naive, refreshes, rejections


def _check_journal(journal: Journal, spec: ModelSpec, metric: Metric, settings: SearchSettings) -> None:
    """Refuse a journal opened for another model, metric or settings (the fields this function can know)."""
    expected = journal_identity(spec, metric, settings, calibration_hash="")
    del expected["calibration"]
    recorded = {k: journal.identity[k] for k in expected if k in journal.identity}
    diffs = identity_differences(recorded, {k: v for k, v in expected.items() if k in recorded})
    if diffs:
        raise JournalError(
            f"search journal {journal.path} was opened for another search than this one ({'; '.join(diffs)}); "
            "delete the journal or choose another --out"
        )


def run_search(
    evaluator: Evaluator,
    spec: ModelSpec,
    layout: GroupSizes,
    settings: SearchSettings | None = None,
    journal: Journal | None = None,
    progress: ProgressCallback | None = None,
) -> SearchResult:
    """Run the GSOP search and return its ordered steps (see the module docstring).

    ``layout`` only serves the FLOPs figures (progress, plan ladder). With a ``journal``, every finished
    evaluation is recorded before the search goes on, and recorded ones are never run again: a search
    killed at any moment and resumed on the reopened journal gives the identical result. The journal
    stays open (the caller owns it). If its identity names a model fingerprint, metric or settings, they
    must be this search's.
    """
    settings = settings or SearchSettings()
    if journal is not None:
        _check_journal(journal, spec, evaluator.metric, settings)
    return _Search(evaluator, spec, layout, settings, journal, progress).run()


__all__ = [
    "FREE_BLOCK_GROUPS",
    "FREE_BLOCK_MODULE_SETS",
    "BatchEvaluator",
    "Evaluator",
    "FreeBlockStart",
    "Metric",
    "ProgressCallback",
    "SearchEvent",
    "SearchResult",
    "SearchSettings",
    "SearchSettingsError",
    "TqdmProgress",
    "candidate_operations",
    "danger_operations",
    "journal_identity",
    "plan_from_search",
    "run_search",
]
