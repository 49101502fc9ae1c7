"""GSOP search against stub evaluators whose metric is a known formula of the pruned op set."""

from __future__ import annotations

import io
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
from helpers.calib_stubs import BatchStubEvaluator, Killed, StubEvaluator, Weights, free_from

from calib.journal import Journal
from calib.search import (
    SearchResult,
    SearchSettings,
    SearchSettingsError,
    TqdmProgress,
    candidate_operations,
    danger_operations,
    journal_identity,
    plan_from_search,
    run_search,
)
from prune_core.errors import InternalError, JournalError
from prune_core.ops import (
    PRUNABLE_GROUPS,
    Group,
    Module,
    Operation,
    all_operations,
    apply_depth_rule,
    apply_group_rule,
    close_under_rules,
)
from prune_core.plan import Plan
from prune_core.spec import GroupSizes, ModelSpec

KEY, REST = Group.IMG_KEY, Group.IMG_REST
KV, Q, MLP = Module.KV, Module.Q, Module.MLP
NO_FREE_BLOCK: tuple[tuple[Module, ...], ...] = ()


def ops_at(group: Group, modules: tuple[Module, ...], layers: range) -> set[Operation]:
    return {Operation(layer, group, m) for layer in layers for m in modules}


def random_weights(seed: int, free_rest_from: int | None = None) -> Weights:
    """Distinct random costs per op; ``img_rest`` free from ``free_rest_from`` on (if given)."""
    rng = random.Random(seed)
    table = {op: rng.uniform(0.002, 0.06) for op in all_operations(8, PRUNABLE_GROUPS)}

    def weight(op: Operation) -> float:
        if free_rest_from is not None and op.group is REST and op.layer >= free_rest_from:
            return 0.0
        return table[op]

    return weight


def check_bookkeeping(result: SearchResult, evaluator: StubEvaluator, spec: ModelSpec) -> None:
    """Every accepted op is in exactly one step, the steps' union is the (closed) policy, metrics replay."""
    seen: set[Operation] = set()
    for i, step in enumerate(result.steps):
        assert len(set(step)) == len(step)
        assert not seen & set(step), f"step {i} repeats ops of earlier steps"
        if i:
            assert step, f"greedy step {i} is empty"
        seen |= set(step)
        assert close_under_rules(seen, spec.num_layers) == seen, f"prefix up to step {i} is not closed"
        assert result.step_metrics[i] == evaluator.value(frozenset(seen))
    assert seen == result.policy
    assert not seen & danger_operations(spec, result.settings)
    assert len(evaluator.calls) == len(set(evaluator.calls)), "an op set was evaluated twice"


# -- implication rules ------------------------------------------------------------------------------------
def test_group_rule_prunes_rest_with_key() -> None:
    ops = {Operation(3, KEY, Q), Operation(4, REST, MLP)}
    assert apply_group_rule(ops) == ops | {Operation(3, REST, Q)}
    assert apply_group_rule({Operation(3, REST, Q)}) == {Operation(3, REST, Q)}  # never the other way


def test_depth_rule_needs_kv_through_the_last_layer() -> None:
    gap = ops_at(REST, (KV,), range(4, 7))  # layers 4..6, layer 7 still gives K/V
    assert apply_depth_rule(gap, 8) == gap
    tail = ops_at(REST, (KV,), range(4, 8))
    assert apply_depth_rule(tail, 8) == tail | ops_at(REST, (Q, MLP), range(4, 8))
    # the other group is untouched
    assert not {op for op in apply_depth_rule(tail, 8) if op.group is KEY}


def test_closure_combines_rules_until_fixed_point() -> None:
    start = ops_at(KEY, (KV,), range(6, 8)) | ops_at(REST, (KV,), range(3, 6))
    closed = close_under_rules(start, 8)
    expected = (
        ops_at(KEY, (KV, Q, MLP), range(6, 8))  # key kv 6..7 -> key q/mlp 6..7
        | ops_at(REST, (KV,), range(3, 8))  # group rule completes rest kv 3..7
        | ops_at(REST, (Q, MLP), range(3, 8))  # ... so the depth rule frees rest q/mlp from 3
    )
    assert closed == expected
    assert apply_group_rule(closed) == closed and apply_depth_rule(closed, 8) == closed
    assert close_under_rules(closed, 8) == closed


def test_greedy_step_carries_its_implied_ops(spec: ModelSpec, layout: GroupSizes) -> None:
    # only one cheap op: key q at layer 4; everything else costs too much to ever be accepted
    cheap = Operation(4, KEY, Q)
    ev = StubEvaluator(lambda op: 0.01 if op in (cheap, Operation(4, REST, Q)) else 1.0)
    settings = SearchSettings(key_danger_layers=2, free_block_module_sets=NO_FREE_BLOCK, steps=3)
    result = run_search(ev, spec, layout, settings)
    # rest q at 4 is the best candidate (0.01); then key q at 4 (its rest counterpart already pruned)
    assert result.steps[1:] == ((Operation(4, REST, Q),), (cheap,))
    # a key op that is cheaper than its rest counterpart (pruning it even helps a little) is taken first,
    # and its step holds the rest op the group rule adds
    ev2 = StubEvaluator(lambda op: -0.005 if op == cheap else 0.009 if op == Operation(4, REST, Q) else 1.0)
    result2 = run_search(ev2, spec, layout, settings)
    assert result2.steps[1] == (Operation(4, KEY, Q), Operation(4, REST, Q))  # the key op brings rest along


# -- settings -----------------------------------------------------------------------------------------------
def test_settings_defaults_and_validation() -> None:
    s = SearchSettings()
    assert (s.tolerance, s.steps, s.key_danger_layers, s.protect_layer0_kv) == (0.3, 15, 6, True)
    assert s.free_block_module_sets == ((Q, MLP, KV), (Q, MLP), (Q,))
    assert s.free_block_groups == (REST, KEY)
    assert "batch_size" in s.to_json() and "batch_size" not in s.identity()
    with pytest.raises(SearchSettingsError, match="steps must be >= 1"):
        SearchSettings(steps=0)
    with pytest.raises(SearchSettingsError, match="strict subset"):
        SearchSettings(free_block_module_sets=((Q,), (Q, MLP)))
    with pytest.raises(SearchSettingsError, match="image groups"):
        SearchSettings(free_block_groups=(Group.TXT,))
    with pytest.raises(SearchSettingsError, match="tolerance mode"):
        SearchSettings(tolerance_mode="percent")  # type: ignore[arg-type]


def test_tolerance_modes() -> None:
    auto = SearchSettings(tolerance=0.3)
    assert auto.resolve_tolerance(0.6, higher_is_better=True) == ("relative", pytest.approx(0.18))
    assert auto.resolve_tolerance(0.0, higher_is_better=False) == ("absolute", 0.3)
    assert SearchSettings(tolerance_mode="relative").resolve_tolerance(2.0, False) == ("relative", 0.6)
    assert SearchSettings(tolerance_mode="absolute").resolve_tolerance(0.6, True) == ("absolute", 0.3)


def test_danger_and_candidates(spec: ModelSpec) -> None:
    danger = danger_operations(spec, SearchSettings())
    assert danger == ops_at(KEY, (KV, Q, MLP), range(6)) | {Operation(0, REST, KV)}
    cands = candidate_operations(spec, SearchSettings())
    assert len(cands) == 48 - len(danger) and cands == sorted(cands)
    assert not danger_operations(spec, SearchSettings(key_danger_layers=0, protect_layer0_kv=False))


# -- free-to-prune block ------------------------------------------------------------------------------------
FREE_REST = {KV: 3, MLP: 2, Q: 1}
FREE_KEY = {KV: 6, MLP: 5, Q: 4}


def test_free_block_finds_known_start_layers(spec: ModelSpec, layout: GroupSizes) -> None:
    ev = StubEvaluator(free_from(FREE_REST, FREE_KEY))
    result = run_search(ev, spec, layout, SearchSettings(key_danger_layers=2))
    starts = [(fb.group, fb.modules, fb.start) for fb in result.free_block]
    assert starts == [
        (REST, (Q, MLP, KV), 3), (REST, (Q, MLP), 2), (REST, (Q,), 1),
        (KEY, (Q, MLP, KV), 6), (KEY, (Q, MLP), 5), (KEY, (Q,), 4),
    ]
    expected = set()
    for group, table in ((REST, FREE_REST), (KEY, FREE_KEY)):
        for module, first in table.items():
            expected |= ops_at(group, (module,), range(first, 8))
    assert set(result.steps[0]) == close_under_rules(expected, 8) == expected
    assert result.step_metrics[0] == result.baseline == 1.0
    # each binary search is bounded by the previous start: ranges [0,8], [0,3], [0,2], [2,8], [2,6], [2,5]
    ranges = [8, 3, 2, 6, 4, 3]
    for fb, width in zip(result.free_block, ranges, strict=True):
        assert fb.trials <= math.ceil(math.log2(width + 1)), fb
    assert result.phase_evaluations["free"] <= sum(fb.trials for fb in result.free_block)
    check_bookkeeping(result, ev, spec)


def test_free_block_trials_grow_like_log2_of_depth(spec: ModelSpec, layout: GroupSizes) -> None:
    deep = replace(spec, num_layers=32)
    ev = StubEvaluator(free_from({KV: 21, MLP: 13, Q: 9}, {KV: 32, MLP: 32, Q: 32}))
    result = run_search(ev, deep, layout, SearchSettings(steps=1, tolerance=0.0))
    rest = [fb for fb in result.free_block if fb.group is REST]
    assert [fb.start for fb in rest] == [21, 13, 9]
    for fb, width in zip(rest, (32, 21, 13), strict=True):  # ranges [0,32], [0,21], [0,13]
        assert 1 <= fb.trials <= math.ceil(math.log2(width + 1))
    assert result.phase_evaluations["free"] <= 6 + 5 + 4 + 3 * math.ceil(math.log2(27))


def test_free_block_never_prunes_danger_ops(spec: ModelSpec, layout: GroupSizes) -> None:
    ev = StubEvaluator(lambda op: 0.0)  # everything is free
    result = run_search(ev, spec, layout, SearchSettings())
    danger = danger_operations(spec, SearchSettings())
    assert set(result.steps[0]) == set(all_operations(8, PRUNABLE_GROUPS)) - danger
    assert len(result.steps) == 1  # no candidate left for the greedy sort
    assert [fb.start for fb in result.free_block] == [0, 0, 0, 6, 6, 6]


# -- greedy sort with historical rankings ------------------------------------------------------------------
def test_greedy_levels_refreshes_and_evaluation_count(spec: ModelSpec, layout: GroupSizes) -> None:
    """Hand-traced run: T=0.3 of baseline 1.0 over 5 levels (0.06 each); 41 candidates.

    level 1: c1 (0.04) accepted; c2 tried on a stale score (cum 0.09) -> rejected, refresh (38 new)
    level 2: c2 accepted (0.09); c3 tried stale (0.14) -> rejected, refresh (37 new)
    level 3: c3 accepted (0.14); c4 tried stale (0.39) -> rejected, refresh (36 new)
    level 4: c4 is still the best of a fresh ranking, 0.39 > 0.24 -> rejected, no re-score
    level 5: 0.39 > 0.30 -> rejected; level 6 > steps: stop (no pointless refresh)

    A refresh against policy P re-scores each remaining c as close(P | {c}); two of those are already
    known: the tried-and-rejected set, and the key twin of the last accepted rest op (close({key op})
    already held its rest counterpart, so it was evaluated in the previous sweep).
    """
    c1, c2, c3, c4 = Operation(3, REST, Q), Operation(4, REST, Q), Operation(5, REST, MLP), Operation(2, REST, MLP)
    cost = {c1: 0.04, c2: 0.05, c3: 0.05, c4: 0.25}
    ev = StubEvaluator(lambda op: cost.get(op, 1.0))
    settings = SearchSettings(steps=5, key_danger_layers=2, free_block_module_sets=NO_FREE_BLOCK)
    result = run_search(ev, spec, layout, settings)
    assert len(candidate_operations(spec, settings)) == 41
    assert result.steps == ((), (c1,), (c2,), (c3,))
    assert result.step_metrics == pytest.approx((1.0, 0.96, 0.91, 0.86))
    assert (result.rejections, result.refreshes, result.final_level) == (5, 3, 6)
    assert result.phase_evaluations == {"baseline": 1, "free": 0, "greedy": 41 + 1 + 38 + 1 + 37 + 1 + 36}
    assert result.naive_evaluations == 41 + 40 + 39
    assert len(ev.calls) == result.evaluations_run == result.distinct_evaluations == 156
    check_bookkeeping(result, ev, spec)


def test_ranking_reuse_costs_far_less_than_naive_greedy(spec: ModelSpec, layout: GroupSizes) -> None:
    """Paper-like costs (deep ops cheap, early ops ten times dearer): many steps fit in one level, so the
    stored ranking is reused for several accepts before a rejection forces a refresh."""
    rng = random.Random(0)
    table = {op: rng.uniform(0.0005, 0.004) * (10 if op.layer < 3 else 1) for op in all_operations(8, PRUNABLE_GROUPS)}
    ev = StubEvaluator(table.__getitem__)
    settings = SearchSettings(key_danger_layers=2, free_block_module_sets=NO_FREE_BLOCK)
    result = run_search(ev, spec, layout, settings)
    greedy = result.phase_evaluations["greedy"]
    assert len(result.steps) > 30 and result.refreshes >= 5
    assert greedy < result.naive_evaluations / 3, (greedy, result.naive_evaluations)
    assert len(ev.calls) == 1 + greedy == result.evaluations_run == result.distinct_evaluations
    check_bookkeeping(result, ev, spec)


@pytest.mark.parametrize("seed", range(6))
def test_every_accepted_op_is_recorded_exactly_once(spec: ModelSpec, layout: GroupSizes, seed: int) -> None:
    """The public code's aliasing bug lost ops accepted right after an undo; rejections must not do that."""
    ev = StubEvaluator(random_weights(seed, free_rest_from=6), interaction=0.03)
    settings = SearchSettings(key_danger_layers=2, steps=6)
    result = run_search(ev, spec, layout, settings)
    assert result.rejections >= 2 and len(result.steps) >= 4  # the undo path really ran between accepts
    check_bookkeeping(result, ev, spec)
    assert 1.0 - result.step_metrics[-1] <= result.tolerance_total + settings.epsilon
    plan = plan_from_search(result)
    assert plan.cumulative_ops(len(plan.steps)) == result.policy
    assert [s.metric for s in plan.doc.steps] == list(result.step_metrics)
    assert plan.ladder == sorted(plan.ladder, reverse=True)


def test_search_is_deterministic_and_batching_does_not_change_it(spec: ModelSpec, layout: GroupSizes) -> None:
    settings = SearchSettings(key_danger_layers=2, steps=6, batch_size=5)
    weights = random_weights(11, free_rest_from=5)
    one = plan_from_search(run_search(StubEvaluator(weights, interaction=0.03), spec, layout, settings))
    two = plan_from_search(run_search(StubEvaluator(weights, interaction=0.03), spec, layout, settings))
    batch_ev = BatchStubEvaluator(weights, interaction=0.03)
    batched = run_search(batch_ev, spec, layout, replace(settings, batch_size=7))
    assert one.to_json() == two.to_json() == plan_from_search(batched).to_json()
    assert batch_ev.chunks and max(batch_ev.chunks) == 7
    reloaded = Plan.from_document(one.to_json())
    assert reloaded.steps == one.steps and reloaded.doc.search == one.doc.search


def test_lower_is_better_metric_mirrors_accuracy(spec: ModelSpec, layout: GroupSizes) -> None:
    weights = random_weights(5, free_rest_from=6)
    settings = SearchSettings(key_danger_layers=2, steps=6)  # auto: relative for accuracy, absolute for kl
    acc = run_search(StubEvaluator(weights), spec, layout, settings)
    kl_ev = StubEvaluator(weights, higher_is_better=False)
    kl = run_search(kl_ev, spec, layout, settings)
    assert (kl.baseline, kl.tolerance_mode, kl.tolerance_total) == (0.0, "absolute", 0.3)
    assert (acc.baseline, acc.tolerance_mode) == (1.0, "relative")
    assert kl.steps == acc.steps  # kl = 1 - accuracy here, so the same ordering
    assert all(v <= 0.3 + settings.epsilon for v in kl.step_metrics)
    assert kl.step_metrics == tuple(pytest.approx(1.0 - a) for a in acc.step_metrics)
    check_bookkeeping(kl, kl_ev, spec)
    record = plan_from_search(kl).doc.search
    assert record is not None and record["metric"] == "kl" and record["higher_is_better"] is False
    # a fraction of a zero baseline allows no loss at all: only free ops are taken
    strict = run_search(StubEvaluator(weights, higher_is_better=False), spec, layout,
                        replace(settings, tolerance_mode="relative"))
    assert strict.tolerance_total == 0.0 and len(strict.steps) == 1 and strict.steps[0]


def test_nan_from_the_evaluator_is_an_internal_error(spec: ModelSpec, layout: GroupSizes) -> None:
    ev = StubEvaluator(lambda op: math.nan)
    with pytest.raises(InternalError, match="NaN"):
        run_search(ev, spec, layout, SearchSettings())


def test_progress_reports_phases(spec: ModelSpec, layout: GroupSizes) -> None:
    events = []
    result = run_search(StubEvaluator(free_from(FREE_REST, FREE_KEY)), spec, layout,
                        SearchSettings(key_danger_layers=2), progress=events.append)
    phases = [e.phase for e in events]
    assert phases[0] == "baseline" and "free" in phases and phases[-1] == "greedy"
    assert events[-1].evaluations == result.evaluations_run
    assert events[-1].steps == len(result.steps) - 1
    assert 0 < events[-1].flops_ratio < 1
    stream = io.StringIO()
    with TqdmProgress(file=stream, mininterval=0) as bar:
        run_search(StubEvaluator(free_from(FREE_REST, FREE_KEY)), spec, layout,
                   SearchSettings(key_danger_layers=2), progress=bar)
    assert "GSOP search" in stream.getvalue()
    assert "workers" not in stream.getvalue() and all(e.workers is None for e in events)


def test_progress_shows_workers_alive_and_sweep_eta(spec: ModelSpec, layout: GroupSizes) -> None:
    """An evaluator with workers (the Ray pool's attributes) has them on every event and on the bar, and a
    ranking sweep's bar has a total, so tqdm shows its ETA."""
    ev = StubEvaluator(free_from(FREE_REST, FREE_KEY))
    ev.workers_alive, ev.workers_total = 3, 4  # type: ignore[attr-defined]
    events = []
    run_search(ev, spec, layout, SearchSettings(key_danger_layers=2), progress=events.append)
    assert events and all(e.workers == (3, 4) for e in events)
    stream = io.StringIO()
    with TqdmProgress(file=stream, mininterval=0) as bar:
        bar(next(e for e in events if e.pending))
        assert bar.bar.total is not None
    text = stream.getvalue()
    assert "workers=3/4" in text and "<" in text  # tqdm's "elapsed<remaining"


# -- resuming -----------------------------------------------------------------------------------------------
RESUME_SETTINGS = SearchSettings(key_danger_layers=2, steps=5, batch_size=4)


def resume_weights() -> Weights:
    return random_weights(7, free_rest_from=5)


def identity_for(spec: ModelSpec, ev: StubEvaluator, settings: SearchSettings = RESUME_SETTINGS) -> dict:
    return journal_identity(spec, ev.metric, settings, calibration_hash="sha256:calib")


def killed_run(path: Path, spec: ModelSpec, layout: GroupSizes, ev: StubEvaluator) -> None:
    with Journal.open(path, identity_for(spec, ev)) as journal, pytest.raises(Killed):
        run_search(ev, spec, layout, RESUME_SETTINGS, journal)


def resumed_run(path: Path, spec: ModelSpec, layout: GroupSizes, ev: StubEvaluator) -> tuple[SearchResult, Journal]:
    with Journal.open(path, identity_for(spec, ev), resume=True) as journal:
        return run_search(ev, spec, layout, RESUME_SETTINGS, journal), journal


@pytest.fixture
def reference(spec: ModelSpec, layout: GroupSizes) -> tuple[SearchResult, StubEvaluator]:
    ev = StubEvaluator(resume_weights(), interaction=0.03)
    return run_search(ev, spec, layout, RESUME_SETTINGS), ev


def test_resume_after_kill_redoes_nothing_and_gives_the_same_plan(
    tmp_path: Path, spec: ModelSpec, layout: GroupSizes, reference: tuple[SearchResult, StubEvaluator]
) -> None:
    ref, ref_ev = reference
    total = len(ref_ev.calls)
    assert ref.rejections and total > 50
    expected = plan_from_search(ref).to_json()
    for kill_at in sorted({0, 1, 2, total // 7, total // 2, total - 1}):
        path = tmp_path / f"kill{kill_at}.jsonl"
        first = StubEvaluator(resume_weights(), interaction=0.03, fail_after=kill_at)
        killed_run(path, spec, layout, first)
        assert first.calls == ref_ev.calls[:kill_at]
        second = StubEvaluator(resume_weights(), interaction=0.03)
        result, journal = resumed_run(path, spec, layout, second)
        assert journal.loaded == kill_at and not journal.notices
        assert not set(second.calls) & set(first.calls), f"kill at {kill_at}: finished work was redone"
        assert len(second.calls) == total - kill_at
        assert (result.evaluations_run, result.evaluations_from_journal) == (total - kill_at, kill_at)
        assert result.distinct_evaluations == ref.distinct_evaluations
        assert plan_from_search(result).to_json() == expected
    # resuming a finished search evaluates nothing
    again = StubEvaluator(resume_weights(), interaction=0.03)
    result, _ = resumed_run(tmp_path / f"kill{total - 1}.jsonl", spec, layout, again)
    assert again.calls == [] and result.evaluations_run == 0
    assert plan_from_search(result).to_json() == expected


def test_resume_after_kill_inside_a_batch(
    tmp_path: Path, spec: ModelSpec, layout: GroupSizes, reference: tuple[SearchResult, StubEvaluator]
) -> None:
    ref, ref_ev = reference
    mid_chunk = False
    for kill_at in (20, 21, 22, 23, len(ref_ev.calls) // 2):  # 20..23: inside the first sweep
        path = tmp_path / f"journal{kill_at}.jsonl"
        first = BatchStubEvaluator(resume_weights(), interaction=0.03, fail_after=kill_at)
        killed_run(path, spec, layout, first)
        with Journal.open(path, identity_for(spec, first), resume=True) as journal:
            journaled = set(journal)
        assert journaled and len(journaled) <= len(first.calls) == kill_at
        mid_chunk |= len(journaled) < kill_at  # the chunk in flight was lost and must be redone
        second = BatchStubEvaluator(resume_weights(), interaction=0.03)
        result, _ = resumed_run(path, spec, layout, second)
        assert not set(second.calls) & journaled
        assert len(second.calls) == len(ref_ev.calls) - len(journaled)
        assert plan_from_search(result).to_json() == plan_from_search(ref).to_json()
    assert mid_chunk


def test_resume_with_a_torn_last_line(
    tmp_path: Path, spec: ModelSpec, layout: GroupSizes, reference: tuple[SearchResult, StubEvaluator]
) -> None:
    ref, ref_ev = reference
    total = len(ref_ev.calls)
    # killed between evaluations, then a half-written line (kill -9 inside write())
    path = tmp_path / "torn.jsonl"
    killed_run(path, spec, layout, StubEvaluator(resume_weights(), interaction=0.03, fail_after=30))
    with path.open("ab") as fh:
        fh.write(b'{"ops":[[5,"img_rest","kv"],[6,"img_')
    second = StubEvaluator(resume_weights(), interaction=0.03)
    result, journal = resumed_run(path, spec, layout, second)
    assert journal.notices and "torn" in journal.notices[0]
    assert len(second.calls) == total - 30
    assert plan_from_search(result).to_json() == plan_from_search(ref).to_json()
    # a finished journal whose last record lost its tail: exactly that evaluation runs again
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    third = StubEvaluator(resume_weights(), interaction=0.03)
    result, journal = resumed_run(path, spec, layout, third)
    assert len(third.calls) == 1 and len(journal.notices) == 1
    assert plan_from_search(result).to_json() == plan_from_search(ref).to_json()
    assert path.read_bytes() == data  # repaired: the same record written again


def test_search_refuses_a_journal_of_another_search(tmp_path: Path, spec: ModelSpec, layout: GroupSizes) -> None:
    ev = StubEvaluator(resume_weights())
    with Journal.open(tmp_path / "j.jsonl", identity_for(spec, ev)) as journal:
        with pytest.raises(JournalError, match=r"settings\.steps: journal has 5, this search has 6"):
            run_search(ev, spec, layout, replace(RESUME_SETTINGS, steps=6), journal)
        other = replace(spec, num_layers=9)
        with pytest.raises(JournalError, match="model_fingerprint"):
            run_search(ev, other, layout, RESUME_SETTINGS, journal)
        # batch_size is not part of the identity: a resumed search may change it
        run_search(ev, spec, layout, replace(RESUME_SETTINGS, batch_size=1), journal)
