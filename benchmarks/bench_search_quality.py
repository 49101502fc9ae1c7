"""Search quality: does the GSOP-searched plan beat random plans and a FastV-like cut at the same FLOPs?

On a small random-weight LLaVA-architecture model (the ``tiny`` demo preset at 112 px -> 64 visual tokens,
8 decoder layers) and a handful of synthetic calibration rows, run the GSOP search with the label-free
``kl`` metric (KL of the answer-token distributions from the dense model's; lower is better). Then, at each
budget B (fraction of dense prefill FLOPs kept; default 0.5 and 0.3), evaluate with the *same* evaluator:

* **searched**: the plan's shortest step prefix whose FLOPs ratio is <= B (``Plan.select(B)``), i.e. what
  ``prune-export eval --plan --budget B`` would run;
* **random**: the median over ``--random-plans`` random plans (seeds 0..N-1). Each draws operations from the
  same candidate pool the search uses (image-group ops minus the danger-to-prune ones), in a random order,
  adds them one at a time closed under the implication rules, and stops at the first set whose FLOPs ratio
  is <= B (the same stopping rule as ``Plan.select``);
* **FastV-like**: every image op (``q``, ``kv``, ``mlp`` of ``img_key`` and ``img_rest``) pruned at every layer
  >= K, with K the *latest* start layer whose FLOPs ratio is <= B (the least pruning that meets the budget).
  It is not bound by the search's danger set (it may cut key tokens in layers the search protects).

It prints the setup, the search's ladder and counters, and a table of budget / method / FLOPs ratio / KL,
and whether the searched plan beats both baselines at every budget. Everything is seeded (model weights,
data, random plans) and the search is deterministic, so the numbers are reproducible; timing does not
matter here.

Tolerance. The ``kl`` metric is read in absolute units (``tolerance_mode`` "auto" -> absolute for
lower-is-better metrics). On a random-weight model the KL scale is tiny (pruning every searchable op costs
a KL of ~2e-3 here), so a tolerance of 1.0 would accept every candidate at level 1: no rejection, no
ranking refresh, and the order would simply be the one-shot initial ranking. By default the tolerance is
therefore set from the data: ``--tolerance-factor`` (1.5) x the KL of pruning the whole candidate pool (one
extra evaluation, done before the search). The ladder can then reach the end of the pool (below B=0.3),
while each of the ``--steps`` levels (T/15) is a real constraint that triggers rejections and refreshes.
``--tolerance X`` sets T directly in KL units instead.

``--key-danger-layers 2``: the paper protects ``img_key`` ops in layers 0..5 of a 32-layer model (~19% of
the depth). With 8 layers, 6 protected layers would keep a quarter of the image tokens alive in 6 of 8
layers and put the lowest reachable FLOPs ratio above 0.3; 2 layers (25% of the depth) is the analogue
that leaves B=0.3 reachable (the script prints the pool's lowest ratio and refuses budgets below it).

Run (about 2-3 minutes on 2 cores):

    python benchmarks/bench_search_quality.py [--samples 8] [--budgets 0.5 0.3] [--random-plans 10]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import setup_threads  # noqa: E402

from calib.evaluator import CalibrationSet, ModelEvaluator  # noqa: E402
from calib.search import SearchSettings, candidate_operations, plan_from_search, run_search  # noqa: E402
from exporter.adapters import load_adapter  # noqa: E402
from exporter.demo import build_demo_data, build_demo_model  # noqa: E402
from prune_core.cost import prefill_flops  # noqa: E402
from prune_core.ops import MODULES, PRUNABLE_GROUPS, Operation, close_under_rules  # noqa: E402
from prune_core.spec import GroupSizes, ModelSpec  # noqa: E402


def flops_ratio(spec: ModelSpec, layout: GroupSizes, ops: frozenset[Operation]) -> float:
    return prefill_flops(spec, layout, ops) / prefill_flops(spec, layout)


def random_plan(pool: list[Operation], spec: ModelSpec, layout: GroupSizes, budget: float,
                seed: int) -> frozenset[Operation]:
    """Random ops from ``pool``, one at a time, closed under the rules, until the FLOPs ratio is <= budget."""
    order = sorted(pool)
    random.Random(seed).shuffle(order)
    ops: frozenset[Operation] = frozenset()
    for op in order:
        if op in ops:
            continue
        ops = frozenset(close_under_rules(ops | {op}, spec.num_layers))
        if flops_ratio(spec, layout, ops) <= budget:
            return ops
    raise SystemExit(f"random plan (seed {seed}) cannot reach budget {budget} from the candidate pool")


def fastv_ops(spec: ModelSpec, start: int) -> frozenset[Operation]:
    """Every image op at every layer >= start."""
    return frozenset(Operation(layer, g, m) for layer in range(start, spec.num_layers)
                     for g in PRUNABLE_GROUPS for m in MODULES)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=Path("out/bench-search-quality"),
                    help="where the model and data are written (rebuilt every run, deterministically)")
    ap.add_argument("--image-size", type=int, default=112, help="CLIP input size (112/14 -> 64 visual tokens)")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers")
    ap.add_argument("--samples", type=int, default=8, help="calibration rows")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3])
    ap.add_argument("--random-plans", type=int, default=10, help="random plans per budget (seeds 0..N-1)")
    ap.add_argument("--tolerance", type=float, default=None,
                    help="T in KL units (default: --tolerance-factor x KL of the whole candidate pool)")
    ap.add_argument("--tolerance-factor", type=float, default=1.5)
    ap.add_argument("--steps", type=int, default=15, help="tolerance levels")
    ap.add_argument("--key-danger-layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="model weights and data")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    setup_threads(args.threads)
    wall = time.perf_counter()

    model_dir = build_demo_model(args.work_dir / "model", "tiny", seed=args.seed, overwrite=True,
                                 image_size=args.image_size, layers=args.layers)
    data = build_demo_data(args.work_dir / "data", samples=args.samples, seed=args.seed,
                           image_size=args.image_size)
    adapter = load_adapter(model_dir)
    spec = adapter.spec
    calib = CalibrationSet.load(adapter, data, "kl")
    sizes = [item.prompt.sizes for item in calib.items]
    layout = GroupSizes(sys=sizes[0].sys, img_key=sizes[0].img_key, img_rest=sizes[0].img_rest,
                        txt=max(1, round(sum(s.txt for s in sizes) / len(sizes))))
    evaluator = ModelEvaluator(adapter, calib, prefix_reuse=True)

    settings0 = SearchSettings(steps=args.steps, key_danger_layers=args.key_danger_layers, seed=args.seed)
    pool = candidate_operations(spec, settings0)
    pool_all = frozenset(close_under_rules(pool, spec.num_layers))
    floor = flops_ratio(spec, layout, pool_all)
    image_share = (layout.img_key + layout.img_rest) / layout.total
    print(f"model: tiny preset, {args.image_size} px -> {spec.visual_tokens} visual tokens, {spec.num_layers} "
          f"layers, hidden {spec.hidden_size}; torch {torch.__version__}, {args.threads} threads")
    print(f"prompt layout: {layout.as_dict()} ({layout.total} tokens, image share {image_share:.0%}); "
          f"calibration: {len(calib)} rows, metric kl")
    print(f"FLOPs ratio with every image op pruned at every layer: "
          f"{flops_ratio(spec, layout, fastv_ops(spec, 0)):.3f}; lowest the search can reach "
          f"(all {len(pool)} candidates, key_danger_layers={args.key_danger_layers}): {floor:.3f}")
    unreachable = [b for b in args.budgets if b < floor]
    if unreachable:
        raise SystemExit(f"budget(s) {unreachable} are below what the candidate pool can reach ({floor:.3f}); "
                         "use a larger image, fewer danger layers or larger budgets")

    kl_pool = evaluator.evaluate(pool_all)
    tolerance = args.tolerance if args.tolerance is not None else args.tolerance_factor * kl_pool
    how = "--tolerance" if args.tolerance is not None else f"{args.tolerance_factor} x KL(whole pool) = " \
          f"{args.tolerance_factor} x {kl_pool:.3e}"
    print(f"tolerance: T = {tolerance:.3e} KL ({how}), {args.steps} levels of {tolerance / args.steps:.3e}")

    settings = SearchSettings(tolerance=tolerance, steps=args.steps, key_danger_layers=args.key_danger_layers,
                              seed=args.seed)
    result = run_search(evaluator, spec, layout, settings)
    plan = plan_from_search(result)
    print(f"\nsearch: baseline KL {result.baseline:.3e}, {len(result.steps)} steps ({len(result.steps[0])} ops in "
          f"the free block), {result.distinct_evaluations} evaluations ({result.phase_evaluations}), "
          f"{result.rejections} rejections, {result.refreshes} ranking refreshes, final level "
          f"{result.final_level}, {result.wall_seconds:.1f} s")
    print(f"  naive greedy would need {result.naive_evaluations} greedy-phase evaluations; layers computed "
          f"{evaluator.stats.layer_fraction:.0%} (prefix reuse)")
    print("  ladder (step: FLOPs ratio / KL): " + ", ".join(
        f"{i}: {r:.3f}/{m:.2e}" for i, (r, m) in enumerate(zip(plan.ladder[1:], result.step_metrics, strict=True))))

    rows: list[tuple[float, str, float, float, str]] = []
    verdicts: list[tuple[float, bool, bool]] = []
    for budget in args.budgets:
        sel = plan.select(budget)
        kl_search = evaluator.evaluate(sel.ops)
        rows.append((budget, "searched", sel.flops_ratio, kl_search, f"{sel.num_steps} steps, {len(sel.ops)} ops"))

        rand_kl, rand_ratio = [], []
        for seed in range(args.random_plans):
            ops = random_plan(pool, spec, layout, budget, seed)
            rand_kl.append(evaluator.evaluate(ops))
            rand_ratio.append(flops_ratio(spec, layout, ops))
        med_kl = statistics.median(rand_kl)
        wins = sum(kl_search < v for v in rand_kl)
        rows.append((budget, f"random (median of {args.random_plans})", statistics.median(rand_ratio), med_kl,
                     f"KL range {min(rand_kl):.2e}..{max(rand_kl):.2e}, ratios {min(rand_ratio):.3f}.."
                     f"{max(rand_ratio):.3f}; searched better than {wins}/{args.random_plans}"))

        start = max(k for k in range(spec.num_layers + 1) if flops_ratio(spec, layout, fastv_ops(spec, k)) <= budget)
        ops = fastv_ops(spec, start)
        kl_fastv = evaluator.evaluate(ops)
        rows.append((budget, f"FastV-like (K={start})", flops_ratio(spec, layout, ops), kl_fastv,
                     "all image ops at layers >= K"))
        verdicts.append((budget, kl_search < med_kl, kl_search < kl_fastv))

    print(f"\n{'budget':>6}  {'method':<22} {'FLOPs ratio':>11} {'KL':>10}  note")
    for budget, method, ratio, kl, note in rows:
        print(f"{budget:>6.2f}  {method:<22} {ratio:>11.3f} {kl:>10.3e}  {note}")
    print()
    for budget, vs_random, vs_fastv in verdicts:
        ok = "yes" if vs_random and vs_fastv else "NO"
        print(f"budget {budget:.2f}: searched beats random median: {'yes' if vs_random else 'no'}, "
              f"beats FastV-like: {'yes' if vs_fastv else 'no'} -> beats both: {ok}")
    print(f"\ntotal {time.perf_counter() - wall:.0f} s, {evaluator.stats.evaluations} evaluations")


if __name__ == "__main__":
    main()
