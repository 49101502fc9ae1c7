"""Exported graphs on ONNX Runtime: does a baked plan's FLOPs ratio show up as measured prefill time?

Builds (once, into ``out/bench-builds``) the bench preset dense, with a GSOP plan at budget 0.3 and with
AutoPrune at T=64, each through ``prune-export build`` (export, passes, parity check), then measures each
pruned build against the dense one with ``prune-export bench``'s code: the same prompt (the bench image and
a ~100-token question, 685 tokens), interleaved runs after warm-up, medians, FLOPs counted from the graphs.

The GSOP plan is not searched (a search on the bench preset takes hours on 2 cores): its steps prune the
image groups' mlp, then q, then kv, layer by layer from the last layer down, and the budget picks the prefix
with at most 30% of the dense FLOPs. Latency depends on which operations are gone, not on how well they
were chosen, so this measures the same thing a searched plan would.

    python benchmarks/bench_build.py [--runs 20] [--threads 2] [--rebuild] [--provider cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BENCH_QUESTION,
    DEFAULT_BENCH_MODEL,
    bench_image,
    ensure_bench_builds,
    ensure_bench_model,
)

from exporter.adapters import load_adapter  # noqa: E402
from exporter.baked import BakedPrefill  # noqa: E402
from exporter.sample import prepare_sample  # noqa: E402
from prune_export.workflows.measure import bench_builds  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_BENCH_MODEL)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--tokens", type=float, default=64.0, help="AutoPrune T")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    model = ensure_bench_model(args.model)
    dense_dir, builds = ensure_bench_builds(model, args.budget, args.tokens, args.rebuild)

    adapter = load_adapter(model)
    sample = prepare_sample(adapter, bench_image(0), BENCH_QUESTION)
    feed = BakedPrefill.feeds_from_sample(sample)
    del adapter
    rows = {}
    for label, path in builds.items():
        report = bench_builds(path, dense_dir, runs=args.runs, warmup=args.warmup, provider=args.provider,
                              threads=args.threads, text_tokens=None, feed=feed)
        rows[label] = report.to_dict()
        print(f"\n== {label} (prompt {sample.num_tokens} tokens)")
        print(report.format_table())
    if args.json:
        print(json.dumps(rows, indent=2))
    print("\n| config | FLOPs ratio | dense ms | pruned ms | speedup | FLOPs speedup | efficiency | provider |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, r in rows.items():
        print(f"| {label} | {1 / r['flops_speedup']:.4f} | {r['dense_ms']:.1f} | {r['pruned_ms']:.1f} | "
              f"{r['speedup']:.3f} | {r['flops_speedup']:.3f} | **{r['efficiency']:.3f}** | {r['provider']} |")


if __name__ == "__main__":
    main()
