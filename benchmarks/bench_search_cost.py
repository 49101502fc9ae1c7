"""Search cost: evaluations of a full GSOP search vs a naive greedy, and the speed-up of prefix reuse.

Part 1, the search. On the ``bench`` demo model (576 visual tokens, 8 layers, hidden 1024; ``--model`` to
use another folder) and ``--samples`` synthetic calibration rows (default 16), run the whole GSOP search
with prefix reuse and report the distinct evaluations it needed (per phase), what a naive greedy would
need for the same greedy phase (re-score every remaining candidate before every accepted step:
``SearchResult.naive_evaluations``), their ratio, the wall time and the seconds per evaluation. One
evaluation is one pass over the calibration set.

Part 2, prefix reuse on candidate scoring. The situation of a ranking sweep: policy = the search's step 0
(free block), candidates = ``--candidates`` single candidate ops spread evenly over the layers, each
``policy + op`` closed under the implication rules. Each candidate is evaluated by two evaluators on the
same calibration set: ``ModelEvaluator(prefix_reuse=True)``, which has evaluated the policy once first (it
is an anchor, timed separately), so a candidate at layer l recomputes layers l..last only, and
``ModelEvaluator(prefix_reuse=False)``, which recomputes every layer. The two are interleaved per candidate
(the order alternates), so load on the machine hits both alike. Reported: total seconds of each, their
ratio, the share of layers computed, and whether the values are bit-identical (they must be: reuse only
skips work whose result is already known).

Tolerance. With ``--tolerance`` unset, T is ``--tolerance-factor`` (1.5) x the loss of pruning the whole
candidate pool (one extra evaluation before the search, not counted in the search), in the units of the
metric's tolerance mode (absolute for kl/nll, a fraction of the baseline for accuracy). A random-weight
model's KL scale is tiny, so a fixed T such as the CLI's 0.3 would accept every candidate at the first
level (no rejection, no refresh) and flatter the count; scaled to the model, the levels bite and ranking
refreshes happen as in a real search. ``--key-danger-layers`` defaults to 2 for the 8-layer demo models
(the paper's 6 of 32 layers is ~19% of the depth).

Runs (the full one takes minutes on 2 cores; --quick is a smoke test):

    python benchmarks/bench_search_cost.py [--model out/bench-model] [--samples 16] [--metric kl]
    python benchmarks/bench_search_cost.py --quick --model /tmp/tiny-model
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ensure_bench_model, setup_threads  # noqa: E402

from calib.evaluator import CalibrationSet, ModelEvaluator  # noqa: E402
from calib.search import SearchSettings, candidate_operations, run_search  # noqa: E402
from exporter.adapters import load_adapter  # noqa: E402
from exporter.demo import build_demo_data  # noqa: E402
from prune_core.ops import Operation, close_under_rules  # noqa: E402
from prune_core.spec import GroupSizes  # noqa: E402


def spread(pool: list[Operation], n: int) -> list[Operation]:
    """``n`` ops evenly spaced over ``pool`` (canonical order = by layer), first and last included."""
    if n >= len(pool):
        return list(pool)
    if n == 1:
        return [pool[len(pool) // 2]]
    return [pool[round(i * (len(pool) - 1) / (n - 1))] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: build the bench preset)")
    ap.add_argument("--calib", type=Path, default=None,
                    help="calibration JSONL (default: synthetic rows written to --data-dir)")
    ap.add_argument("--data-dir", type=Path, default=Path("out/bench-search-cost-data"))
    ap.add_argument("--image-size", type=int, default=336, help="synthetic image size")
    ap.add_argument("--samples", type=int, default=None, help="calibration rows [default: 16; --quick: 2]")
    ap.add_argument("--metric", choices=["kl", "nll", "accuracy"], default="kl")
    ap.add_argument("--tolerance", type=float, default=None,
                    help="T in the metric's tolerance units (default: --tolerance-factor x loss of the whole pool)")
    ap.add_argument("--tolerance-factor", type=float, default=1.5)
    ap.add_argument("--steps", type=int, default=None, help="tolerance levels [default: 15; --quick: 3]")
    ap.add_argument("--key-danger-layers", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=None, help="candidates timed in part 2 [default: 12; --quick: 4]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 2 rows, 3 tolerance levels, 4 timed candidates (use a tiny --model)")
    args = ap.parse_args()
    samples = args.samples or (2 if args.quick else 16)
    steps = args.steps or (3 if args.quick else 15)
    n_cand = args.candidates or (4 if args.quick else 12)
    setup_threads(args.threads)

    model_dir = args.model or ensure_bench_model()
    calib_path = args.calib or build_demo_data(args.data_dir, samples=samples, seed=args.seed,
                                               image_size=args.image_size)
    t0 = time.perf_counter()
    adapter = load_adapter(model_dir)
    spec = adapter.spec
    calib = CalibrationSet.load(adapter, calib_path, args.metric, limit=samples)
    load_s = time.perf_counter() - t0
    sizes = [item.prompt.sizes for item in calib.items]
    layout = GroupSizes(sys=sizes[0].sys, img_key=sizes[0].img_key, img_rest=sizes[0].img_rest,
                        txt=max(1, round(sum(s.txt for s in sizes) / len(sizes))))
    print(f"model: {model_dir} ({spec.num_layers} layers, hidden {spec.hidden_size}, {spec.visual_tokens} visual "
          f"tokens); prompt {layout.as_dict()}; torch {torch.__version__}, {args.threads} threads")
    print(f"calibration: {len(calib)} rows of {calib_path}, metric {args.metric} "
          f"({'higher' if calib.metric.higher_is_better else 'lower'} is better); loaded in {load_s:.1f} s"
          + (" [--quick]" if args.quick else ""))

    # -- tolerance ------------------------------------------------------------------------------------
    base_settings = SearchSettings(steps=steps, key_danger_layers=args.key_danger_layers, seed=args.seed)
    pool = candidate_operations(spec, base_settings)
    plain = ModelEvaluator(adapter, calib, prefix_reuse=False)
    t = time.perf_counter()
    baseline = plain.evaluate(frozenset())
    one_eval = time.perf_counter() - t
    first = 1 + len(pool)  # the baseline and the first ranking sweep; the free block and refreshes add more
    print(f"one evaluation (all layers): {one_eval:.2f} s; the search needs at least {first} evaluations "
          f"(~{first * one_eval / 60:.1f} min before prefix reuse), typically 2-4x that")
    if args.tolerance is None:
        whole = plain.evaluate(frozenset(close_under_rules(pool, spec.num_layers)))
        loss = abs(baseline - whole)
        relative = calib.metric.higher_is_better  # tolerance_mode "auto"
        tolerance = args.tolerance_factor * (loss / abs(baseline) if relative and baseline else loss)
        print(f"tolerance: T = {tolerance:.4g} ({args.tolerance_factor} x loss of the whole pool, {loss:.4g} in "
              f"metric units{', relative to the baseline' if relative else ''}), {steps} levels")
    else:
        tolerance = args.tolerance
        print(f"tolerance: T = {tolerance:.4g} (--tolerance), {steps} levels")
    settings = SearchSettings(tolerance=tolerance, steps=steps, key_danger_layers=args.key_danger_layers,
                              seed=args.seed)

    # -- part 1: the search ------------------------------------------------------------------------
    searcher = ModelEvaluator(adapter, calib, prefix_reuse=True)
    result = run_search(searcher, spec, layout, settings)
    greedy = result.phase_evaluations["greedy"]
    per_eval = result.eval_seconds / max(1, result.evaluations_run)
    print(f"\n== search (prefix reuse on), {len(pool)} candidate ops ==")
    print(f"{'steps found':<34} {len(result.steps)} (free block {len(result.steps[0])} ops), "
          f"{result.rejections} rejections, {result.refreshes} ranking refreshes")
    print(f"{'evaluations':<34} {result.distinct_evaluations} (baseline {result.phase_evaluations['baseline']}, "
          f"free block {result.phase_evaluations['free']}, greedy {greedy})")
    print(f"{'naive greedy (greedy phase)':<34} {result.naive_evaluations}")
    ratio = f"{result.naive_evaluations / greedy:.2f}x" if greedy else "n/a (no greedy evaluation)"
    print(f"{'naive / ours (greedy phase)':<34} {ratio}")
    total_naive = result.naive_evaluations + result.phase_evaluations["baseline"] + result.phase_evaluations["free"]
    print(f"{'naive / ours (whole search)':<34} {total_naive / max(1, result.distinct_evaluations):.2f}x "
          f"({total_naive} vs {result.distinct_evaluations})")
    print(f"{'wall time':<34} {result.wall_seconds:.1f} s ({result.eval_seconds:.1f} s evaluating, "
          f"{per_eval:.2f} s per evaluation = {per_eval / len(calib) * 1e3:.0f} ms per row)")
    print(f"{'decoder layers computed':<34} {searcher.stats.layer_fraction:.0%} (prefix reuse)")

    # -- part 2: prefix reuse on candidate scoring ---------------------------------------------------
    policy = frozenset(result.steps[0])
    free_pool = [op for op in pool if op not in policy]
    chosen = spread(free_pool, n_cand)
    trials = [frozenset(close_under_rules(policy | {op}, spec.num_layers)) for op in chosen]
    reuse = ModelEvaluator(adapter, calib, prefix_reuse=True)
    t = time.perf_counter()
    anchor_value = reuse.evaluate(policy)
    anchor_s = time.perf_counter() - t
    plain_check = plain.evaluate(policy)
    reuse.stats.layers_run = reuse.stats.layers_full = 0  # count the candidates only
    secs = {"reuse": 0.0, "plain": 0.0}
    rows = []
    for i, (op, ops) in enumerate(zip(chosen, trials, strict=True)):
        order = [("reuse", reuse), ("plain", plain)] if i % 2 == 0 else [("plain", plain), ("reuse", reuse)]
        vals, times = {}, {}
        for name, ev in order:
            t = time.perf_counter()
            vals[name] = ev.evaluate(ops)
            times[name] = time.perf_counter() - t
            secs[name] += times[name]
        rows.append((op, len(ops) - len(policy), vals, times))

    print(f"\n== prefix reuse on candidate scoring: policy = step 0 ({len(policy)} ops), {len(chosen)} candidates ==")
    print(f"anchor: policy evaluated once with reuse in {anchor_s:.2f} s (value identical without reuse: "
          f"{anchor_value == plain_check})")
    print(f"{'candidate':<22} {'+ops':>4} {'reuse s':>8} {'plain s':>8} {'value (reuse)':>14} {'identical':>9}")
    for op, added, vals, times in rows:
        print(f"{str(op):<22} {added:>4} {times['reuse']:>8.2f} {times['plain']:>8.2f} {vals['reuse']:>14.6g} "
              f"{str(vals['reuse'] == vals['plain']):>9}")
    identical = all(v["reuse"] == v["plain"] for _, _, v, _ in rows)
    max_diff = max(abs(v["reuse"] - v["plain"]) for _, _, v, _ in rows)
    print(f"total: reuse {secs['reuse']:.2f} s, plain {secs['plain']:.2f} s -> speed-up "
          f"{secs['plain'] / secs['reuse']:.2f}x; layers computed with reuse {reuse.stats.layer_fraction:.0%} "
          f"(ideal speed-up {1 / reuse.stats.layer_fraction:.2f}x)")
    print(f"values identical: {identical} (max |diff| {max_diff:.3g})")


if __name__ == "__main__":
    main()
