"""LLaVA-NeXT on ONNX Runtime: does a baked plan's FLOPs ratio show up as measured time at ~2,900 visual tokens?

Builds (once, into ``out/next-builds``) the ``next-bench`` preset (the ``bench`` decoder, hidden 1024 x 8
layers, behind LLaVA-1.6's tiling: a 672x672 image gives 576 + 2,352 = 2,928 visual tokens) dense, with the
heuristic GSOP plan of ``benchmarks/common.py`` at budget 0.3 and with AutoPrune at T=320 (the reference
code's middle LLaVA-NeXT budget), each through ``prune-export build`` (export, passes, parity check). Then,
on one 672x672 image and the bench question (3,063 prompt tokens):

- the prefill graphs of each pruned build against dense, interleaved after warm-up (``prune-export bench``'s
  code): speedup, FLOPs speedup from the graphs, efficiency = speedup / FLOPs speedup;
- the time to first token end to end (processor, vision graph on 5 tower inputs, packing, embed, prefill),
  all builds interleaved (``sweep --latency``'s code).

Run it alone on the machine (no tests or other benchmarks beside it).

    python benchmarks/bench_next.py [--runs 5] [--threads 2] [--rebuild]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import BENCH_QUESTION, heuristic_plan  # noqa: E402
from PIL import Image  # noqa: E402

MODEL = Path("out/next-bench-model")
BUILDS = Path("out/next-builds")
IMAGE_SIDE = 672


def ensure_model() -> Path:
    if (MODEL / "config.json").is_file():
        return MODEL
    from exporter.demo import build_demo_model

    print(f"building the next-bench demo model in {MODEL} (once)")
    return build_demo_model(MODEL, "next-bench", seed=0, overwrite=True)


def ensure_builds(model: Path, budget: float, tokens: float, rebuild: bool) -> dict[str, Path]:
    from exporter.adapters import load_spec
    from prune_core.manifest import MANIFEST_NAME
    from prune_core.plan import AutoPruneSection
    from prune_export.workflows.build import BuildSettings, build
    from prune_export.workflows.selection import PlanChoice

    BUILDS.mkdir(parents=True, exist_ok=True)
    plan = heuristic_plan(load_spec(model))
    plan_path = BUILDS / "heuristic-plan.json"
    plan.save(plan_path)
    selection = plan.select(budget)
    choices = {
        "dense": PlanChoice(),
        f"gsop-{budget:g}": PlanChoice(selection.ops, None, {"path": str(plan_path), "budget": budget,
                                                             "flops_ratio": selection.flops_ratio}),
        f"autoprune-{tokens:g}": PlanChoice(frozenset(), AutoPruneSection(tokens=tokens), {"tokens": tokens}),
    }  # fmt: skip
    out = {}
    for name, choice in choices.items():
        target = BUILDS / name
        if rebuild or not (target / MANIFEST_NAME).is_file():
            t0 = time.perf_counter()
            print(f"building {target}")
            build(model, target, choice, BuildSettings(overwrite=True, provider="cpu"), lambda m: print("  " + m))
            print(f"  built in {time.perf_counter() - t0:.0f} s")
        out[name] = target
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--tokens", type=float, default=320.0, help="AutoPrune T")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from calib.data import DataRow
    from exporter.adapters import load_adapter
    from exporter.baked import BakedPrefill
    from exporter.sample import prepare_sample
    from prune_export.workflows.measure import bench_builds, time_first_token

    model = ensure_model()
    builds = ensure_builds(model, args.budget, args.tokens, args.rebuild)
    image = Image.fromarray((np.random.RandomState(0).rand(IMAGE_SIDE, IMAGE_SIDE, 3) * 255).astype("uint8"))
    image_path = BUILDS / "image-672.png"
    image.save(image_path)
    adapter = load_adapter(model)
    sample = prepare_sample(adapter, image, BENCH_QUESTION)
    visual = sample.image_end - sample.image_start
    feed = BakedPrefill.feeds_from_sample(sample)
    del adapter
    print(f"prompt: {sample.num_tokens} tokens, {visual} visual ({IMAGE_SIDE}x{IMAGE_SIDE} image)")
    rows = {}
    for name, path in builds.items():
        if name == "dense":
            continue
        report = bench_builds(path, builds["dense"], runs=args.runs, warmup=args.warmup, provider="cpu",
                              threads=args.threads, feed=feed)  # fmt: skip
        rows[name] = report.to_dict()
        print(f"\n== prefill: {name}")
        print(report.format_table())
    row = DataRow(line=1, image_path=image_path.resolve(), question=BENCH_QUESTION, answer=None)
    ttft = time_first_token(builds, row, rounds=args.runs, warmup=args.warmup, provider="cpu", threads=args.threads,
                            log=print)  # fmt: skip
    if args.json:
        print(json.dumps({"prefill": rows, "ttft": ttft}, indent=2))
    print(f"\nprompt {sample.num_tokens} tokens ({visual} visual), ONNX Runtime CPU, {args.threads} threads, "
          f"{args.runs} interleaved rounds after {args.warmup} warm-up")
    print("\n| build | FLOPs ratio | dense prefill ms | prefill ms | speedup | FLOPs speedup | efficiency |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {1 / r['flops_speedup']:.4f} | {r['dense_ms']:.1f} | {r['pruned_ms']:.1f} | "
              f"{r['speedup']:.3f} | {r['flops_speedup']:.3f} | **{r['efficiency']:.3f}** |")
    print("\n| build | TTFT ms | TTFT speed-up | FLOPs ratio (prefill graph) |")
    print("| --- | --- | --- | --- |")
    for name, r in ttft["results"].items():
        print(f"| {name} | {r['ttft_ms']:.1f} | {r['ttft_speedup']:.2f}x | {r['flops_ratio']:.4f} |")


if __name__ == "__main__":
    main()
