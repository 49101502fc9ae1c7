"""Tests of exporter.autoprune_policy: AutoPrune run by the executor on a tiny random LLaVA.

The model (built once per module): 8 decoder layers, 112 px images -> 64 visual tokens, 4 system and 13
text tokens. ``x0=3.5`` puts the curve's knee inside 8 layers, so different ``k`` give different schedules.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from helpers import SQUARE_QUESTION
from PIL import Image, ImageDraw

from exporter.adapters import load_adapter
from exporter.autoprune_policy import AutoPrunePolicy, AutoPruneRun
from exporter.demo import build_demo_model
from exporter.executor import FixedKeepPolicy, PlanExecutor, PrefillState, SelectionContext
from exporter.sample import prepare_sample
from prune_core.autoprune import grid_points
from prune_core.cost import prefill_flops
from prune_core.errors import BudgetError
from prune_core.ops import Group, Module, Operation, apply_group_rule
from prune_core.plan import AutoPruneSection

LAYERS, VISUAL = 8, 64


def _image(color: tuple[int, int, int], box: tuple[int, int, int, int]) -> Image.Image:
    img = Image.new("RGB", (112, 112), (240, 240, 240))
    ImageDraw.Draw(img).rectangle(box, fill=color)
    return img


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory):
    folder = build_demo_model(
        tmp_path_factory.mktemp("ap") / "tiny8", "tiny", seed=3, overwrite=True, layers=LAYERS, image_size=112
    )
    return load_adapter(folder)


@pytest.fixture(scope="module")
def executor(adapter) -> PlanExecutor:
    return PlanExecutor(adapter)


@pytest.fixture(scope="module")
def samples(adapter):
    a = prepare_sample(adapter, _image((220, 30, 30), (10, 10, 60, 60)), SQUARE_QUESTION)
    b = prepare_sample(adapter, _image((30, 60, 220), (40, 20, 100, 90)), "How many dogs are there on the left?")
    return a, b


def section(**kw) -> AutoPruneSection:
    return AutoPruneSection(**{"tokens": 16, "x0": 3.5, **kw})


# -- reuse and determinism --------------------------------------------------------------------------------


def test_one_policy_reused_across_samples_gives_the_same_answer_twice(adapter, executor, samples):
    policy = AutoPrunePolicy(section(), adapter.spec)
    a, b = samples
    first = executor.generate(a, (), policy, max_new_tokens=3)
    other = executor.generate(b, (), policy, max_new_tokens=3)
    again = executor.generate(a, (), policy, max_new_tokens=3)
    runs = (first.prefill.policy, other.prefill.policy, again.prefill.policy)
    assert all(isinstance(r, AutoPruneRun) for r in runs) and len({id(r) for r in runs}) == 3
    assert first.prefill.policy.report() == again.prefill.policy.report()
    assert first.prefill.policy.decision.i1 != other.prefill.policy.decision.i1  # per-sample state, not shared
    assert first.token_ids == again.token_ids
    assert torch.equal(first.prefill.logits, again.prefill.logits)
    assert torch.equal(first.prefill.state.hidden, again.prefill.state.hidden)
    json.dumps(first.prefill.policy.report())  # the report is JSON-friendly


def test_decision_follows_the_schedule(adapter, executor, samples):
    policy = AutoPrunePolicy(section(), adapter.spec)
    res = executor.prefill(samples[0], (), policy, with_cache=False)
    d = res.policy.decision
    s = d.schedule
    assert d.n0 == s.n0 == 40 and d.k == pytest.approx(policy.steepness(d.i1)) and s.k == d.k
    assert d.i0 is not None and d.i1 is not None
    # Visual tokens entering each layer: all of them, N0, then K_l + c_l after layers 1..L-2.
    assert res.visual_tokens_per_layer == [VISUAL, *s.tokens_per_layer[:-1]]
    assert [d.kept[layer] for layer in range(1, LAYERS - 1)] == list(s.keep[:-1])
    assert LAYERS - 1 not in d.kept  # the selection after the last layer cannot matter and is skipped


# -- FLOPs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["renumbered", "original"])
@pytest.mark.parametrize("mode", ["exact", "table"])
def test_executed_flops_equal_the_cost_model_of_the_executed_schedule(adapter, executor, samples, positions, mode):
    policy = AutoPrunePolicy(section(positions=positions), adapter.spec, mode=mode)
    res = executor.prefill(samples[0], (), policy, with_cache=False)
    sizes = res.group_sizes_per_layer
    assert [g.img_key + g.img_rest for g in sizes] == res.visual_tokens_per_layer
    assert res.flops == prefill_flops(adapter.spec, sizes)
    dense = executor.prefill(samples[0], (), None, with_cache=False).flops
    assert res.flops < dense == prefill_flops(adapter.spec, samples[0].sizes)


# -- recycling --------------------------------------------------------------------------------------------


def test_recycling_inserts_the_stated_number_of_merged_tokens(adapter, executor, samples):
    policy = AutoPrunePolicy(section(tokens=24), adapter.spec)
    res = executor.prefill(samples[0], (), policy, with_cache=False)
    d, s = res.policy.decision, res.policy.decision.schedule
    assert max(s.merged) >= 2  # D = 60 - K_1 >= 30 at layer 1: more than one cluster
    assert [d.merged[layer] for layer in range(1, LAYERS - 1)] == list(s.merged[:-1])
    for layer in range(1, LAYERS - 1):
        assert res.visual_tokens_per_layer[layer + 1] == d.kept[layer] + d.merged[layer]
        # merged tokens are img_rest: the key group only shrinks
        assert res.group_sizes_per_layer[layer + 1].img_key <= res.group_sizes_per_layer[layer].img_key
    final = res.state
    assert int((final.original_index == -1).sum()) >= 1  # the last insertion is still alive


def test_recycling_off_keeps_only_topk(adapter, executor, samples):
    policy = AutoPrunePolicy(section(tokens=24, recycle=False), adapter.spec)
    res = executor.prefill(samples[0], (), policy, with_cache=False)
    s = res.policy.decision.schedule
    assert res.visual_tokens_per_layer == [VISUAL, s.n0, *s.keep[:-1]]
    assert int((res.state.original_index == -1).sum()) == 0


def test_recycling_is_deterministic_and_counts_come_from_the_schedule(adapter):
    policy = AutoPrunePolicy(section(tokens=24), adapter.spec)
    outs = []
    for _ in range(2):
        run = policy.begin()
        run.select(_context(0, VISUAL, _uniform(VISUAL), seed=1))
        sel = run.select(_context(1, policy.n0, _uniform(policy.n0), seed=2))
        outs.append(sel)
    s = run.decision.schedule
    assert outs[0].merged.shape == (s.merged[0], adapter.spec.hidden_size) and s.merged[0] == 2
    assert outs[0].keep.shape[0] == s.keep[0] and bool((outs[0].keep.diff() > 0).all())
    assert torch.equal(outs[0].merged, outs[1].merged) and torch.equal(outs[0].keep, outs[1].keep)


# -- complexity drives the schedule ----------------------------------------------------------------------


def _uniform(v: int, heads: int = 4, rows: int = 8) -> torch.Tensor:
    return torch.full((heads, rows, v), 1.0 / v)


def _peaked(v: int, heads: int = 4, rows: int = 8) -> torch.Tensor:
    """Each text row attends to its own visual token: high mutual information."""
    attn = torch.zeros(heads, rows, v)
    attn[:, torch.arange(rows), torch.arange(rows) * (v // rows)] = 1.0
    return attn


def _context(layer: int, v: int, attn: torch.Tensor, seed: int = 0, hidden: int = 64) -> SelectionContext:
    g = torch.Generator().manual_seed(seed)
    return SelectionContext(
        layer=layer,
        num_layers=LAYERS,
        visual_hidden=torch.randn(v, hidden, generator=g),
        visual_original_index=torch.arange(v),
        text_attention=attn,
        cls_attention=torch.rand(v, generator=g),
    )


def test_different_mutual_information_gives_different_schedules(adapter):
    policy = AutoPrunePolicy(section(), adapter.spec)
    decisions = []
    for attn1 in (_uniform(policy.n0), _peaked(policy.n0)):
        run = policy.begin()
        run.select(_context(0, VISUAL, _uniform(VISUAL)))
        run.select(_context(1, policy.n0, attn1))
        decisions.append(run.decision)
    simple, complex_ = decisions
    assert simple.i1 == pytest.approx(0.0, abs=1e-2) and complex_.i1 == pytest.approx(4 * 3.0, abs=1e-2)
    assert simple.k == pytest.approx(0.4, abs=1e-2) and complex_.k == 0.0
    assert simple.schedule.keep != complex_.schedule.keep
    # Higher MI, flatter curve: fewer tokens early, more late; the same budget.
    assert complex_.schedule.keep[0] < simple.schedule.keep[0]
    assert complex_.schedule.keep[-1] > simple.schedule.keep[-1]


def test_negative_mi_lifts_k_above_k0_and_the_table_clamps_it(adapter):
    # The smoothing constant (+1e-6 under p(x)p(y)) makes near-uniform attention's MI slightly negative, so
    # k = k0 - gamma*I1 exceeds k0; exact mode solves at that k, the table reads its last row (k0).
    ks = {}
    for mode in ("exact", "table"):
        run = AutoPrunePolicy(section(), adapter.spec, mode=mode).begin()
        run.select(_context(0, VISUAL, _uniform(VISUAL)))
        run.select(_context(1, 40, _uniform(40, rows=200)))
        ks[mode] = (run.decision.k, run.decision.schedule.k)
    assert ks["exact"][0] == ks["table"][0] > 0.4
    assert ks["exact"][1] == ks["exact"][0] and ks["table"][1] == 0.4


def test_real_prompts_measure_different_complexity(adapter, executor, samples):
    policy = AutoPrunePolicy(section(), adapter.spec)
    ks = [executor.prefill(s, (), policy, with_cache=False).policy.decision.k for s in samples]
    assert ks[0] != ks[1]


def test_layer0_score_weighs_text_attention_by_i0(adapter):
    policy = AutoPrunePolicy(section(), adapter.spec)
    ctx = _context(0, VISUAL, _peaked(VISUAL))
    ctx = replace(ctx, cls_attention=torch.zeros(VISUAL))  # only the text term can rank
    sel = policy.begin().select(ctx)
    attended = set((torch.arange(8) * (VISUAL // 8)).tolist())
    assert attended <= set(sel.keep.tolist()) and sel.keep.shape[0] == policy.n0


# -- table vs exact ---------------------------------------------------------------------------------------


def test_table_mode_agrees_with_exact_mode_at_grid_k(adapter, executor, samples):
    exact = AutoPrunePolicy(section(), adapter.spec, mode="exact")
    table = AutoPrunePolicy(section(), adapter.spec, mode="table")
    for k in grid_points(exact.section.k0, exact.section.k_step):
        assert table.schedule(k) == exact.schedule(k)
    # gamma=0 pins k to k0 and a huge gamma to 0: both grid points, so whole runs agree.
    for gamma in (0.0, 1e6):
        results = [
            executor.prefill(samples[0], (), AutoPrunePolicy(section(gamma=gamma), adapter.spec, mode=m))
            for m in ("exact", "table")
        ]
        de, dt = (r.policy.decision for r in results)
        assert de.k == dt.k and de.schedule == dt.schedule
        assert torch.equal(results[0].logits, results[1].logits)
        assert results[0].flops == results[1].flops


# -- positions and the KV cache ---------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["renumbered", "original"])
def test_both_position_modes_give_a_decodable_cache(adapter, executor, samples, positions):
    sample = samples[0]
    policy = AutoPrunePolicy(section(positions=positions), adapter.spec)
    res = executor.prefill(sample, (), policy)
    assert res.cache is not None and len(res.cache) == LAYERS
    for layer, (cache, trace) in enumerate(zip(res.cache, res.trace, strict=True)):
        assert cache.keys.shape[1] == cache.values.shape[1] == trace.tokens_in  # no kv op pruned here
        expected = trace.tokens_in if positions == "renumbered" else sample.num_tokens
        assert cache.next_position == expected, layer
    pos = res.state.positions
    if positions == "renumbered":
        assert torch.equal(pos, torch.arange(res.state.num_tokens))
    else:
        assert bool((pos.diff() >= 0).all()) and int(pos[-1]) == sample.num_tokens - 1
    gen = executor.generate(sample, (), policy, max_new_tokens=4)
    assert len(gen.step_logits) >= 1 and all(bool(torch.isfinite(x).all()) for x in gen.step_logits)
    assert torch.equal(gen.prefill.logits, res.logits)
    if len(gen.step_logits) > 1:
        assert gen.prefill.cache[-1].keys.shape[1] == res.trace[-1].tokens_in + len(gen.step_logits) - 1


def test_position_modes_change_the_computation(adapter, executor, samples):
    runs = [
        executor.prefill(samples[0], (), AutoPrunePolicy(section(positions=p), adapter.spec), with_cache=False)
        for p in ("renumbered", "original")
    ]
    assert runs[0].visual_tokens_per_layer == runs[1].visual_tokens_per_layer
    assert not torch.equal(runs[0].logits, runs[1].logits)


# -- GSOP + AutoPrune -------------------------------------------------------------------------------------


def test_combined_gsop_and_autoprune_plan_counts_consistent_flops(adapter, executor, samples):
    ops = apply_group_rule(
        [Operation(layer, Group.IMG_REST, m) for layer in range(2, LAYERS) for m in (Module.Q, Module.MLP)]
        + [Operation(layer, Group.IMG_KEY, Module.KV) for layer in range(5, LAYERS)]
    )
    policy = AutoPrunePolicy(section(), adapter.spec)
    sample = samples[0]
    both = executor.prefill(sample, ops, policy)
    tokens_only = executor.prefill(sample, (), policy)
    ops_only = executor.prefill(sample, ops, None)
    assert both.flops == prefill_flops(adapter.spec, both.group_sizes_per_layer, ops)
    assert ops_only.flops == prefill_flops(adapter.spec, sample.sizes, ops)
    assert both.flops < min(tokens_only.flops, ops_only.flops)
    # Layers 0-1 are untouched by the ops, so the complexity signal and the schedule are the same.
    assert both.policy.decision.k == tokens_only.policy.decision.k
    assert both.visual_tokens_per_layer == tokens_only.visual_tokens_per_layer
    # Image kv pruned from layer 5 on: only sys and txt tokens are cached there.
    for layer in range(5, LAYERS):
        sizes = both.group_sizes_per_layer[layer]
        assert both.cache[layer].keys.shape[1] == sizes.sys + sizes.txt
        assert both.trace[layer].counts.n_q == sizes.sys + sizes.img_key + sizes.txt


def test_pruned_kv_tokens_score_zero_and_go_first(adapter, executor, samples):
    ops = apply_group_rule([Operation(2, Group.IMG_REST, Module.KV)])
    policy = AutoPrunePolicy(section(), adapter.spec)
    res = executor.prefill(samples[0], ops, policy, with_cache=False)
    assert res.flops == prefill_flops(adapter.spec, res.group_sizes_per_layer, ops)
    d = res.policy.decision
    sizes_in, sizes_out = res.group_sizes_per_layer[2], res.group_sizes_per_layer[3]
    # TopK after layer 2 ranks the key tokens (attended) above every rest token (zero attention).
    kept_key = min(d.kept[2], sizes_in.img_key)
    assert sizes_out.img_key == kept_key
    assert sizes_out.img_rest == d.kept[2] - kept_key + d.merged[2]


# -- protocol and errors ----------------------------------------------------------------------------------


def test_fixed_keep_policy_needs_no_begin(adapter, executor, samples):
    fixed = FixedKeepPolicy.from_stages([(2, 8)])
    res = executor.prefill(samples[0], (), fixed, with_cache=False)
    assert res.policy is fixed and res.visual_tokens_per_layer[3] == 8


def test_direct_use_without_begin_restarts_at_layer0(adapter):
    policy = AutoPrunePolicy(section(), adapter.spec)
    for _ in range(2):
        policy.select(_context(0, VISUAL, _uniform(VISUAL)))
        policy.select(_context(1, policy.n0, _peaked(policy.n0)))


def test_a_run_serves_one_prefill_from_layer0(adapter, executor, samples):
    policy = AutoPrunePolicy(section(), adapter.spec)
    run = policy.begin()
    with pytest.raises(RuntimeError, match="layer 0"):
        run.select(_context(1, policy.n0, _uniform(policy.n0)))
    run = policy.begin()
    run.select(_context(0, VISUAL, _uniform(VISUAL)))
    with pytest.raises(RuntimeError, match="one run serves one"):
        run.select(_context(0, VISUAL, _uniform(VISUAL)))
    states: dict[int, PrefillState] = {}
    executor.prefill(samples[0], (), None, with_cache=False, keep_states=[2], states_out=states)
    with pytest.raises(RuntimeError, match="resume"):
        executor.prefill(samples[0], (), policy, with_cache=False, start=(2, states[2]))


def test_budget_and_mode_are_checked(adapter):
    with pytest.raises(BudgetError, match=r"\(0, 64\]"):
        AutoPrunePolicy(section(tokens=65), adapter.spec)
    with pytest.raises(ValueError, match="mode"):
        AutoPrunePolicy(section(), adapter.spec, mode="fast")  # type: ignore[arg-type]
