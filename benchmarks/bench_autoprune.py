"""AutoPrune prefill time vs dense on the bench model: does the FLOPs ratio show up as time?

Runs the plan executor's prefill (with KV cache) on one prompt of the bench preset (576 visual tokens,
~100 text tokens): dense (empty plan) and AutoPrune at T = 64, 128, 192, in interleaved rounds (median).
Prints, per configuration, the mean visual tokens entering a layer, the executed FLOPs ratio (counted by the
executor) and the time ratio against dense. The vision tower is outside every timing.

    python benchmarks/bench_autoprune.py [--model out/bench-model] [--rounds 5] [--threads 2] [--mode table]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BENCH_QUESTION,
    DEFAULT_BENCH_MODEL,
    bench_image,
    ensure_bench_model,
    interleaved_medians,
    setup_threads,
)

from exporter.adapters import load_adapter  # noqa: E402
from exporter.autoprune_policy import AutoPrunePolicy  # noqa: E402
from exporter.executor import PlanExecutor  # noqa: E402
from exporter.sample import prepare_sample  # noqa: E402
from prune_core.plan import AutoPruneSection  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_BENCH_MODEL,
                    help=f"bench-preset model folder, built there if missing (default: {DEFAULT_BENCH_MODEL})")
    ap.add_argument("--tokens", type=float, nargs="+", default=[64, 128, 192], help="AutoPrune budgets T")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", choices=["exact", "table"], default="table",
                    help="schedule: table lookup (what an engine does) or per-prompt bisection")
    args = ap.parse_args()
    setup_threads(args.threads)
    model_dir = ensure_bench_model(args.model)
    adapter = load_adapter(model_dir)
    spec = adapter.spec
    sample = prepare_sample(adapter, bench_image(), BENCH_QUESTION)
    executor = PlanExecutor(adapter)
    policies = {
        f"T={t:g}": AutoPrunePolicy(AutoPruneSection(tokens=t), spec, mode=args.mode) for t in args.tokens
    }

    def prefill(policy: AutoPrunePolicy | None):
        return lambda: executor.prefill(sample, (), policy, with_cache=True)

    fns = {"dense": prefill(None), **{name: prefill(p) for name, p in policies.items()}}
    results = {name: fn() for name, fn in fns.items()}
    med = interleaved_medians(fns, rounds=args.rounds, warmup=args.warmup)

    dense = results["dense"]
    print(f"model: {model_dir} ({spec.num_layers} layers, hidden {spec.hidden_size}, MLP {spec.intermediate_size}, "
          f"{sample.num_tokens} prompt tokens, {spec.visual_tokens} visual), torch {torch.__version__}, "
          f"{args.threads} threads, {args.rounds} interleaved rounds (median), schedule mode {args.mode}")
    print(f"{'config':>8} {'k':>7} {'visual/layer':>12} {'FLOPs ratio':>11} {'median ms':>10} {'time ratio':>10}")
    for name, res in results.items():
        decision = getattr(res.policy, "decision", None)
        k = "-" if decision is None else f"{decision.k:.4f}"
        visual = sum(res.visual_tokens_per_layer) / len(res.visual_tokens_per_layer)
        print(f"{name:>8} {k:>7} {visual:>12.1f} {res.flops / dense.flops:>11.4f} {med[name] * 1e3:>10.1f} "
              f"{med[name] / med['dense']:>10.4f}")
    for name, res in results.items():
        if res.policy is not None:
            d = res.policy.decision
            print(f"{name}: N0={d.n0}, visual tokens entering layers: {res.visual_tokens_per_layer} "
                  f"(schedule mean {d.schedule.mean:.2f})")


if __name__ == "__main__":
    main()
