"""Tests of prune_core.autoprune: MI, curve, budget solve, schedule table, TopK, recycling.

Shapes: LLaVA-1.5-7B (32 layers, 576 visual tokens, paper defaults x0=14.9, A=0.75) and tiny decoders
(4 layers / 16 visual tokens, 8 layers / 64 visual tokens) whose numbers can be checked by hand.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from prune_core.autoprune import (
    ScheduleTable,
    complexity_i0,
    complexity_i1,
    curve,
    dpc_knn,
    grid_points,
    merged_count,
    mutual_information,
    n0_for_budget,
    recycle,
    recycle_candidates,
    recycle_tokens,
    select_topk_preserving_order,
    simulate,
    solve_scale,
    steepness,
    table_distance,
)
from prune_core.errors import BudgetError, PlanError

LLAVA_7B = {"num_layers": 32, "visual_tokens": 576}


# -- mutual information ---------------------------------------------------------------------------------


def mi_loop(a: list[list[float]]) -> float:
    """The METHODS formula for one head, written as explicit loops."""
    tx, nv = len(a), len(a[0])
    p_y = [sum(a[x][y] / tx for x in range(tx)) for y in range(nv)]
    total = 0.0
    for x in range(tx):
        for y in range(nv):
            p_xy = a[x][y] / tx
            total += p_xy * math.log2(max(p_xy / ((1 / tx) * p_y[y] + 1e-6), 1e-6))
    return total


def test_mi_uniform_attention_is_about_zero() -> None:
    # Every text row spreads its mass evenly: p(x,y) = p(x)p(y) = 1/(Tx*Nv), only the 1e-6 smoothing remains.
    tx, nv = 3, 4
    attn = torch.full((1, tx, nv), 1 / nv)
    p = 1 / (tx * nv)
    expected = math.log2(p / (p + 1e-6))  # sum of p(x,y) is 1
    assert mutual_information(attn).item() == pytest.approx(expected, rel=1e-12)
    assert abs(expected) < 2e-5


def test_mi_one_hot_attention() -> None:
    # Two text rows, each attending to its own visual token: one bit (less the smoothing).
    attn = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    expected = math.log2(0.5 / (0.25 + 1e-6))
    assert mutual_information(attn).item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(1.0, abs=1e-5)
    # Both rows on the same token: y carries no information about x.
    same = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert mutual_information(same).item() == pytest.approx(math.log2(0.5 / (0.5 + 1e-6)), rel=1e-12)


def test_mi_matches_loop_on_unnormalised_attention() -> None:
    gen = torch.Generator().manual_seed(0)
    full = torch.softmax(torch.randn(3, 5, 9, generator=gen), dim=-1)  # 9 keys: 2 text + 7 visual
    attn = full[:, :, 2:]  # visual columns only, rows no longer sum to 1
    got = mutual_information(attn)
    assert got.shape == (3,) and got.dtype == torch.float64
    expected = [mi_loop(attn[h].double().tolist()) for h in range(3)]
    assert got.tolist() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert complexity_i0(attn).item() == pytest.approx(sum(expected) / 3, rel=1e-10)
    assert complexity_i1(attn).item() == pytest.approx(sum(expected), rel=1e-10)
    assert mutual_information(attn, dtype=torch.float32).tolist() == pytest.approx(
        expected, rel=1e-4, abs=1e-6
    )


def test_mi_rejects_wrong_rank() -> None:
    with pytest.raises(ValueError, match="heads"):
        mutual_information(torch.ones(4, 4))


# -- steepness and curve --------------------------------------------------------------------------------


def test_higher_mi_gives_smaller_k_and_earlier_pruning() -> None:
    assert steepness(0.5) == pytest.approx(0.3)
    assert steepness(1.0) == pytest.approx(0.2)
    assert steepness(0.5) > steepness(1.0) > steepness(1.9)
    assert steepness(2.0) == 0.0 and steepness(10.0) == 0.0  # clamped, never negative
    steep = solve_scale(steepness(0.2), 64, **LLAVA_7B)
    flat = solve_scale(steepness(1.5), 64, **LLAVA_7B)
    # Same budget; the flatter curve prunes harder early and keeps more late.
    assert flat.tokens_per_layer[1] < steep.tokens_per_layer[1]
    assert flat.tokens_per_layer[-1] > steep.tokens_per_layer[-1]


def test_curve_shape() -> None:
    r = curve(0.0, 32)
    assert len(r) == 31 and all(v == pytest.approx(0.375) for v in r)
    r = curve(0.4, 32)
    assert all(a >= b for a, b in zip(r, r[1:], strict=False))
    # Midpoint at l = x0 + k = 15.3: r_15 just above A/2, r_16 below.
    assert r[14] > 0.375 > r[15]
    assert curve(0.3, 4, x0=1.0, amplitude=1.0)[0] == pytest.approx(1 / (1 + math.exp(0.3 * (1 - 1.3))))
    assert all(v >= 0 for v in curve(500.0, 32))  # no overflow for absurd k
    with pytest.raises(ValueError, match="k must be"):
        curve(-0.1, 32)


# -- simulation and budget solve ------------------------------------------------------------------------


def test_n0_and_merged_count() -> None:
    assert n0_for_budget(64, 576) == 160
    assert n0_for_budget(192, 576) == 480
    assert n0_for_budget(300, 576) == 576
    assert n0_for_budget(6, 16) == 15
    with pytest.raises(BudgetError):
        n0_for_budget(0, 576)
    with pytest.raises(BudgetError):
        n0_for_budget(600, 576)
    assert [merged_count(d) for d in (0, 1, 2, 10, 30, 100, 416)] == [0, 1, 1, 1, 2, 4, 13]
    for d in range(2000):  # the float formula of METHODS, literally
        c = 0 if d == 0 else min(math.floor((math.floor(0.3 * d) + 1) / 10) + 1, math.floor(0.3 * d) + 1)
        assert merged_count(d) == c
        assert recycle_candidates(d) == min(math.floor(0.3 * d) + 1, d)
        assert merged_count(d) <= max(recycle_candidates(d), 0) <= d


def test_simulate_by_hand() -> None:
    # N0 = 10, flat curve r = 0.5, s = 0.5: K = ceil(9 * 0.25) = 3 at every layer.
    sim = simulate(0.5, [0.5, 0.5, 0.5], 10, 16)
    # layer 1: D = 7 -> c = 1, cur 4; layer 2: D = 1 -> c = 1, cur 4; layer 3: same.
    assert sim.keep == (3, 3, 3)
    assert sim.merged == (1, 1, 1)
    assert sim.tokens_per_layer == (10, 4, 4, 4)
    assert sim.mean == 5.5
    # s = 0 keeps nothing by score; only recycled tokens survive.
    assert simulate(0.0, [0.5] * 3, 10, 16).tokens_per_layer == (10, 1, 1, 1)
    # s large: K = N0 - 1 everywhere and the one dropped token comes back merged.
    assert simulate(20.0, [0.5] * 3, 10, 16).tokens_per_layer == (10, 10, 10, 10)


@pytest.mark.parametrize("tokens", [64, 128, 192])
@pytest.mark.parametrize("k", [0.05, 0.1, 0.2, 0.3, 0.4])
def test_budget_met_exactly_llava_7b(tokens: int, k: float) -> None:
    sol = solve_scale(k, tokens, **LLAVA_7B)
    assert abs(sol.mean - tokens) < 0.01 and sol.exact
    assert sol.mean == sum(sol.tokens_per_layer) / 32
    assert len(sol.tokens_per_layer) == 32 and len(sol.keep) == len(sol.merged) == 31
    assert 0 < sol.scale < 20


# Tiny decoder, L = 4, 16 visual tokens: the mean is (N0 + three later counts) / 4 and the later counts can be
# no smaller than the recycled tokens, so most budgets are out of reach. T=4: N0=10, later counts (2, 2, 2) give
# exactly 16/4. T=6: N0=15 and (3, 3, 3). (T=5 needs (3, 3, 2): a falling curve, so k > 0 only.)
# L = 8, 64 visual tokens leaves room for real curves.
@pytest.mark.parametrize(
    ("num_layers", "visual_tokens", "tokens", "x0"),
    [(4, 16, 4, 2.0), (4, 16, 6, 2.0), (4, 16, 5, 2.0), (4, 16, 6, 14.9), (8, 64, 8, 3.7), (8, 64, 12, 3.7)],
)
@pytest.mark.parametrize("k", [0.05, 0.1, 0.2, 0.4])
def test_budget_met_exactly_tiny(
    num_layers: int, visual_tokens: int, tokens: int, x0: float, k: float
) -> None:
    sol = solve_scale(k, tokens, num_layers, visual_tokens, x0=x0)
    assert sol.exact, sol
    assert sol.mean == tokens


def test_tiny_schedule_by_hand() -> None:
    sol = solve_scale(0.2, 6, 4, 16, x0=2.0)
    assert sol.n0 == 15
    assert sol.tokens_per_layer == (15, 3, 3, 3)
    assert sol.keep == (2, 2, 2) and sol.merged == (1, 1, 1)


def test_flat_curve_comes_close() -> None:
    # k = 0: every layer keeps the same K, the mean jumps past T; METHODS quotes 64.19.
    sol = solve_scale(0.0, 64, **LLAVA_7B)
    assert round(sol.mean, 2) == 64.19
    assert not sol.exact and sol.error == pytest.approx(0.1875)
    assert set(sol.keep) == {60}


def test_unreachable_budget_gives_closest() -> None:
    # At k = 0.34, T = 192 one step of s moves the sum by 2 tokens: 192 is jumped over, 1/32 off is the best.
    sol = solve_scale(0.34, 192, **LLAVA_7B)
    assert sol.error == pytest.approx(1 / 32)
    r = curve(0.34, 32)
    below = simulate(sol.scale * (1 - 1e-3), r, sol.n0, 576).mean
    assert below < 192 < sol.mean


@pytest.mark.parametrize("k", [0.0, 0.02, 0.1, 0.25, 0.4])
@pytest.mark.parametrize("tokens", [64, 192])
def test_schedules_non_increasing(tokens: int, k: float) -> None:
    sol = solve_scale(k, tokens, **LLAVA_7B)
    counts = sol.tokens_per_layer
    assert counts[0] == sol.n0 == n0_for_budget(tokens, 576)
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))
    for i, (keep, merged) in enumerate(zip(sol.keep, sol.merged, strict=True)):
        assert keep <= counts[i]  # the run-time cap min(K_l, cur) never binds for k >= 0
        assert merged == merged_count(counts[i] - keep)
        assert counts[i + 1] == keep + merged


# -- schedule table -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def table_64() -> ScheduleTable:
    return ScheduleTable.build(64, **LLAVA_7B, k_step=0.05)


def test_table_grid_and_lookup(table_64: ScheduleTable) -> None:
    assert table_64.ks == (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)
    for k in table_64.ks:
        assert table_64.lookup(k) == solve_scale(k, 64, **LLAVA_7B)
    assert table_64.lookup(0.024).k == 0.0
    assert table_64.lookup(0.026).k == 0.05
    assert table_64.lookup(0.175).k == 0.2  # halves round up
    assert table_64.lookup(-1.0).k == 0.0 and table_64.lookup(3.0).k == 0.4
    assert table_64.keep_rows()[2] == list(solve_scale(0.1, 64, **LLAVA_7B).keep)
    assert grid_points(0.4, 0.03)[-2:] == [0.39, 0.4]
    assert grid_points(0.4, 0.01)[:4] == [0.0, 0.01, 0.02, 0.03] and len(grid_points(0.4, 0.01)) == 41


def test_table_json_round_trip(table_64: ScheduleTable) -> None:
    data = json.loads(json.dumps(table_64.to_dict()))
    assert ScheduleTable.from_dict(data) == table_64
    data["entries"][3]["keep"][5] += 1
    with pytest.raises(PlanError, match="entry 3"):
        ScheduleTable.from_dict(data)
    with pytest.raises(PlanError, match="format"):
        ScheduleTable.from_dict({"format": "something else"})


def test_table_for_plan_section() -> None:
    from prune_core.plan import AutoPruneSection

    section = AutoPruneSection(tokens=6, x0=2.0, k_step=0.1)
    assert ScheduleTable.for_section(section, 4, 16) == ScheduleTable.build(6, 4, 16, x0=2.0, k_step=0.1)


def test_table_distance(table_64: ScheduleTable) -> None:
    at_grid = table_distance(table_64, table_64.ks)
    assert at_grid.num_points == 9
    assert at_grid.max_count_diff == at_grid.max_keep_diff == 0 and at_grid.max_mean_diff == 0.0
    assert at_grid.max_budget_error == pytest.approx(0.1875)  # the k = 0 row

    ks = [round(0.005 * i, 3) for i in range(81)]
    coarse = table_distance(table_64, ks)
    fine = table_distance(ScheduleTable.build(64, **LLAVA_7B, k_step=0.01), ks)
    assert coarse.num_points == fine.num_points == 81
    assert 0 < fine.max_count_diff <= coarse.max_count_diff < 160
    assert 0 <= fine.max_keep_diff <= coarse.max_keep_diff
    # Rows with k > 0 meet T exactly, so the means differ only where one side is the k = 0 row.
    assert coarse.max_mean_diff == pytest.approx(0.1875)
    assert 0 <= coarse.worst_k <= 0.4


# -- run-time selection ---------------------------------------------------------------------------------


def test_topk_preserves_order_and_breaks_ties_by_index() -> None:
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 0.5])
    assert select_topk_preserving_order(scores, 2).tolist() == [1, 2]
    assert select_topk_preserving_order(scores, 4).tolist() == [1, 2, 3, 4]
    assert select_topk_preserving_order(scores, 0).tolist() == []
    assert select_topk_preserving_order(scores, 99).tolist() == [0, 1, 2, 3, 4, 5]
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        s = torch.randint(0, 4, (30,), generator=gen).float()  # many ties
        k = int(torch.randint(0, 31, (1,), generator=gen))
        expected = sorted(sorted(range(30), key=lambda i: (-s[i].item(), i))[:k])
        got = select_topk_preserving_order(s, k)
        assert got.dtype == torch.int64 and got.tolist() == expected
    with pytest.raises(ValueError, match="NaN"):
        select_topk_preserving_order(torch.tensor([1.0, float("nan")]), 1)


# -- recycling -----------------------------------------------------------------------------------------


def blobs(per_blob: int = 6, dim: int = 8) -> tuple[torch.Tensor, list[int]]:
    """Three tight, far-apart blobs of points, interleaved by index; returns points and blob labels."""
    gen = torch.Generator().manual_seed(2)
    centres = torch.tensor([[0.0] * dim, [50.0] * dim, [-50.0] * dim])
    labels = [i % 3 for i in range(3 * per_blob)]
    pts = torch.stack([centres[b] + 0.1 * torch.randn(dim, generator=gen) for b in labels])
    return pts, labels


def test_dpc_knn_finds_separated_blobs() -> None:
    pts, labels = blobs()
    centres, assignment = dpc_knn(pts, 3)
    assert centres.tolist() == sorted(centres.tolist())
    assert sorted(labels[c] for c in centres.tolist()) == [0, 1, 2]  # one centre per blob
    for i, a in enumerate(assignment.tolist()):
        assert labels[centres[a]] == labels[i]


def test_recycle_returns_cluster_means() -> None:
    pts, labels = blobs()
    out = recycle(pts, torch.ones(len(labels)), n_candidates=len(labels), n_clusters=3)
    centres, _ = dpc_knn(pts, 3)
    expected = torch.stack(
        [pts[[i for i, b in enumerate(labels) if b == labels[c]]].double().mean(0).float() for c in centres]
    )
    assert out.shape == (3, 8) and out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-6)


def test_recycle_count_candidates_and_determinism() -> None:
    gen = torch.Generator().manual_seed(3)
    dropped = 100  # candidates floor(30)+1 = 31, merged min(floor(31/10)+1, 31) = 4
    hidden = torch.randn(dropped, 16, generator=gen)
    scores = torch.rand(dropped, generator=gen)
    out = recycle(hidden, scores)
    assert out.shape == (merged_count(dropped), 16) == (4, 16)
    assert torch.equal(out, recycle(hidden.clone(), scores.clone()))
    # Tokens outside the top 31 by score play no part.
    outside = torch.sort(scores, stable=True).indices[:10]
    moved = hidden.clone()
    moved[outside] = 1e3
    assert torch.equal(out, recycle(moved, scores))
    assert recycle(hidden[:0], scores[:0]).shape == (0, 16)


def test_recycle_duplicate_points_are_deterministic() -> None:
    hidden = torch.ones(20, 4, dtype=torch.bfloat16)
    out = recycle(hidden, torch.zeros(20), n_clusters=3)
    assert out.shape == (3, 4) and out.dtype == torch.bfloat16
    assert torch.equal(out, torch.ones(3, 4, dtype=torch.bfloat16))
    centres, assignment = dpc_knn(hidden.float(), 3)
    assert centres.tolist() == [0, 1, 2]
    assert assignment[:3].tolist() == [0, 1, 2] and set(assignment[3:].tolist()) == {0}


def _dropped_for(candidates: int) -> int:
    """The smallest dropped count ``D`` whose recycling clusters ``candidates`` tokens."""
    return next(d for d in range(1, 1000) if recycle_candidates(d) == candidates)


@pytest.mark.parametrize("candidates", [1, 2, 7, 20])
def test_recycle_is_recycle_tokens_on_the_best_candidates(candidates: int) -> None:
    """The executor's ``recycle`` is the graphs' ``recycle_tokens`` after the candidate choice, bit for bit."""
    gen = torch.Generator().manual_seed(candidates)
    dropped = _dropped_for(candidates)
    for trial in range(3):
        hidden = torch.randn(dropped, 24, generator=gen, dtype=torch.float64)
        if trial == 2 and candidates > 2:
            hidden[1] = hidden[0]  # duplicate points: density and distance ties, broken by index
        scores = torch.rand(dropped, generator=gen, dtype=torch.float64)
        chosen = select_topk_preserving_order(scores, recycle_candidates(dropped))
        assert chosen.shape[0] == candidates
        for clusters in sorted(
            {1, 2, candidates // 2, candidates - 1, candidates} & set(range(1, candidates + 1))
        ):
            expected = recycle(hidden, scores, n_clusters=clusters)
            got = recycle_tokens(hidden[chosen], clusters)
            assert got.shape == expected.shape == (clusters, 24)
            assert got.dtype == torch.float64
            assert torch.equal(got, expected)
            centres, assignment = dpc_knn(hidden[chosen], clusters)
            members = torch.stack([hidden[chosen][assignment == i].mean(0) for i in range(clusters)])
            torch.testing.assert_close(got, members, rtol=0, atol=1e-12)
        # Every candidate its own cluster: the candidates themselves, in order.
        torch.testing.assert_close(
            recycle_tokens(hidden[chosen], candidates), hidden[chosen], rtol=0, atol=1e-12
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("candidates", [0, 1, 3])
def test_recycle_tokens_needs_no_branch_for_small_counts(candidates: int, dtype: torch.dtype) -> None:
    hidden = torch.randn(candidates, 8, dtype=dtype, generator=torch.Generator().manual_seed(0))
    assert recycle(hidden, torch.ones(candidates, dtype=dtype), n_clusters=0).shape == (0, 8)
    none = recycle_tokens(hidden, 0)
    assert none.shape == (0, 8) and none.dtype == dtype
    every = recycle_tokens(hidden, candidates)  # n_clusters = n: the candidates themselves
    assert every.dtype == dtype and torch.equal(every, hidden)
    if candidates:
        one = recycle_tokens(hidden, 1)  # n_clusters = 1: the mean of all candidates
        torch.testing.assert_close(one, hidden.mean(0, keepdim=True))
