"""Pruning x int8: do the savings multiply? TTFT and decode ms/token of four builds of the bench model.

Builds (``out/bench-builds``, made once through ``prune-export build``'s code, parity check included):
dense fp32, dense int8, AutoPrune T=64 fp32, AutoPrune T=64 int8 (static Q/DQ, calibrated on
``--calib-rows`` synthetic demo rows). Each round runs the four builds once, from image and question to
``--new-tokens`` greedy tokens (EOS does not stop a run), in an order that rotates between rounds; medians
after ``--warmup`` rounds. Run it alone on the machine.

Reported: TTFT and decode ms/token of each; the speed-ups against dense fp32; and the target
``(pruned int8 vs dense fp32) >= 0.8 x (pruned fp32 vs dense fp32) x (dense int8 vs dense fp32)``, on TTFT.
Then accuracy: the greedy answers of each int8 build against its fp32 build on ``--answer-rows`` demo rows
not used for calibration (how many changed).

    python benchmarks/bench_quantize.py [--rounds 5] [--new-tokens 16] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_QUESTION, BUILDS, DEFAULT_BENCH_MODEL, bench_image, ensure_bench_model  # noqa: E402

from engines.benchmark import time_interleaved  # noqa: E402


def ensure_builds(model: Path, tokens: float, calib: Path, rows: int, rebuild: bool) -> dict[str, Path]:
    from prune_core.manifest import MANIFEST_NAME, Manifest
    from prune_core.plan import AutoPruneSection
    from prune_export.workflows.build import BuildSettings, build
    from prune_export.workflows.selection import PlanChoice

    autoprune = PlanChoice(frozenset(), AutoPruneSection(tokens=tokens), {"tokens": tokens})
    wanted = {
        "dense fp32": ("dense", PlanChoice(), None),
        "dense int8": ("dense-int8", PlanChoice(), "int8"),
        f"AutoPrune T={tokens:g} fp32": (f"autoprune-{tokens:g}", autoprune, None),
        f"AutoPrune T={tokens:g} int8": (f"autoprune-{tokens:g}-int8", autoprune, "int8"),
    }
    out = {}
    for label, (name, choice, quantize) in wanted.items():
        path = BUILDS / name
        ok = (path / MANIFEST_NAME).is_file() and not rebuild
        if ok:
            m = Manifest.load(path, verify="none")
            ok = m.generation is not None and (m.quantization or {}).get("mode") == quantize
        if not ok:
            print(f"building {path}")
            settings = BuildSettings(overwrite=True, provider="cpu", quantize=quantize,
                                     calib=calib if quantize else None, calib_rows=rows)
            build(model, path, choice, settings, lambda m: print("  " + m))
        out[label] = path
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_BENCH_MODEL)
    ap.add_argument("--tokens", type=float, default=64.0, help="AutoPrune T")
    ap.add_argument("--calib-rows", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--answer-rows", type=int, default=16, help="demo rows whose answers int8 vs fp32 are compared")
    ap.add_argument("--answer-tokens", type=int, default=8)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from engines.generate import GenerationStats
    from exporter.demo import build_demo_data
    from prune_export.workflows.open_build import load_runner

    model = ensure_bench_model(args.model)
    calib = build_demo_data(BUILDS / "calib-data", samples=args.calib_rows + args.answer_rows, seed=1)
    builds = ensure_builds(model, args.tokens, calib, args.calib_rows, args.rebuild)
    image_path = BUILDS / "bench-image.png"
    bench_image(0).save(image_path)
    from PIL import Image

    image = Image.open(image_path).convert("RGB")
    runners = {label: load_runner(path, provider="cpu", threads=args.threads) for label, path in builds.items()}
    labels = list(runners)

    def answer(runner) -> tuple[GenerationStats, list[int]]:
        started = time.perf_counter()
        prompt = runner.prompt(image, BENCH_QUESTION)
        stats = GenerationStats(prompt_tokens=prompt.num_tokens)
        ids = list(runner.token_ids(runner.prefill_feeds(prompt), args.new_tokens, stats, started=started,
                                    stop_at_eos=False))
        return stats, ids

    with contextlib.ExitStack() as stack:
        for runner in runners.values():
            stack.enter_context(runner)
        timed = time_interleaved({label: (lambda r=runner: answer(r)) for label, runner in runners.items()},
                                 rounds=args.rounds, warmup=args.warmup,
                                 progress=lambda done, total: print(f"round {done}/{total}", flush=True))
    samples = {label: [stats for stats, _ in timed.results[label]] for label in labels}
    answers = {label: timed.results[label][-1][1] for label in labels}
    med = {label: {"ttft_ms": statistics.median(s.ttft_ms for s in rows),
                   "decode_ms_per_token": statistics.median(statistics.median(s.decode_ms) for s in rows)}
           for label, rows in samples.items()}  # fmt: skip
    base = med[labels[0]]
    print(f"\n{args.threads} threads, prompt {samples[labels[0]][0].prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"medians of {args.rounds} rounds")
    print("| build | TTFT ms | TTFT speed-up vs dense fp32 | decode ms/token | decode speed-up | same tokens as its fp32 build |")
    print("| --- | --- | --- | --- | --- | --- |")
    for j, label in enumerate(labels):
        m = med[label]
        twin = labels[j - 1] if label.endswith("int8") else label
        print(f"| {label} | {m['ttft_ms']:.1f} | {base['ttft_ms'] / m['ttft_ms']:.2f}x | {m['decode_ms_per_token']:.2f} | "
              f"{base['decode_ms_per_token'] / m['decode_ms_per_token']:.2f}x | {answers[label] == answers[twin]} |")
    s = {label: base["ttft_ms"] / med[label]["ttft_ms"] for label in labels}
    dense_int8, pruned_fp32, pruned_int8 = s[labels[1]], s[labels[2]], s[labels[3]]
    target = 0.8 * pruned_fp32 * dense_int8
    print(f"\nTTFT: pruned int8 {pruned_int8:.2f}x vs target 0.8 x {pruned_fp32:.2f} x {dense_int8:.2f} = {target:.2f}x: "
          f"{'met' if pruned_int8 >= target else 'NOT met'} (product without the 0.8: {pruned_fp32 * dense_int8:.2f}x)")
    changed = answers_changed(runners, labels, calib, args.answer_rows, args.answer_tokens)
    if args.json is not None:
        args.json.write_text(json.dumps({"medians": med, "speedups_ttft": s, "target": target,
                                         "threads": args.threads, "rounds": args.rounds,
                                         "answers_changed": changed}, indent=2))


def answers_changed(runners: dict, labels: list[str], data: Path, rows: int, tokens: int) -> dict:
    """Greedy answers of each int8 build against its fp32 build on the demo rows: how many differ."""
    from calib.data import load_rows

    items = load_rows(data, require_answer=False)[-rows:]  # the last rows: calibration used the first ones
    out = {}
    print(f"\nanswers ({tokens} greedy tokens) of the int8 builds against their fp32 builds, {len(items)} demo rows:")
    for fp32, int8 in ((labels[0], labels[1]), (labels[2], labels[3])):
        differ = []
        for row in items:
            image = row.load_image()
            a, b = (runners[x].generate(image, row.question, tokens).token_ids for x in (fp32, int8))
            if a != b:
                differ.append(row.line)
        out[int8] = {"rows": len(items), "changed": len(differ), "lines": differ}
        print(f"  {int8}: {len(differ)} of {len(items)} answers changed (lines {differ})")
    return out


if __name__ == "__main__":
    main()
