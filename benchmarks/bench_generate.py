"""Answers end to end through the builds on ONNX Runtime: decode speed, and whether pruning reaches TTFT.

On the bench preset (random fp32 weights, 8 layers, hidden 1024, 576 visual tokens) and the bench prompt
(the bench image and a ~100-token question: ~685 tokens), with the same threads for every engine:

(a) the dense build's decode ms/token against HuggingFace ``generate``'s per-token time on the same model
    (``(t(N tokens) - t(1 token)) / (N - 1)``, greedy, sdpa attention), interleaved;
(b) time to first token (image + question in, first token out) of GSOP at budget 0.3 and AutoPrune at
    T=64 against the dense build, next to the prefill FLOPs speedup counted from the graphs;
(c) decode ms/token of the pruned builds against dense after that ~685-token prompt (the pruned caches are
    shorter).

Builds go to ``out/bench-builds`` (made once, through ``prune-export build``: export, passes, parity check
including greedy answers). Run it alone on the machine.

    python benchmarks/bench_generate.py [--new-tokens 16] [--rounds 5] [--threads 2] [--rebuild]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BENCH_QUESTION,
    BUILDS,
    DEFAULT_BENCH_MODEL,
    bench_image,
    ensure_bench_builds,
    ensure_bench_model,
)

from engines.benchmark import time_interleaved  # noqa: E402
from prune_export.workflows.measure import bench_generate  # noqa: E402
from prune_export.workflows.open_build import load_runner  # noqa: E402


def hf_vs_graph_decode(model: Path, dense: Path, image_path: Path, new_tokens: int, rounds: int, threads: int) -> dict:
    """(a): per-token time of HF generate and of the dense build's decode steps, interleaved rounds."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from engines.generate import GenerationStats
    from prune_core.prompt import prompt_text

    torch.set_num_threads(threads)
    hf = LlavaForConditionalGeneration.from_pretrained(str(model), local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(str(model), local_files_only=True)
    from PIL import Image

    image = Image.open(image_path).convert("RGB")
    inputs = processor(images=image, text=prompt_text(processor, BENCH_QUESTION), return_tensors="pt")
    runner = load_runner(dense, provider="cpu", threads=threads)

    def hf_time(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        elapsed = time.perf_counter() - start
        assert out.shape[1] - inputs["input_ids"].shape[1] == n
        return elapsed

    def graph_per_token() -> float:
        stats = GenerationStats(prompt_tokens=0)
        feeds = runner.prefill_feeds(runner.prompt(image, BENCH_QUESTION))
        for _ in runner.token_ids(feeds, new_tokens, stats, stop_at_eos=False):
            pass
        return statistics.median(stats.decode_ms)

    def hf_per_token() -> float:
        return (hf_time(new_tokens) - hf_time(1)) * 1e3 / (new_tokens - 1)

    with runner:
        timed = time_interleaved({"hf": hf_per_token, "graph": graph_per_token}, rounds=rounds, warmup=1)
    hf_ms, graph_ms = statistics.median(timed.results["hf"]), statistics.median(timed.results["graph"])
    return {"hf_generate_ms_per_token": hf_ms, "graph_decode_ms_per_token": graph_ms, "ratio": graph_ms / hf_ms,
            "rounds": rounds, "new_tokens": new_tokens, "threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_BENCH_MODEL)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--tokens", type=float, default=64.0, help="AutoPrune T")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    model = ensure_bench_model(args.model)
    dense, pruned = ensure_bench_builds(model, args.budget, args.tokens, args.rebuild)
    image_path = BUILDS / "bench-image.png"
    bench_image(0).save(image_path)

    results: dict = {"a": hf_vs_graph_decode(model, dense, image_path, args.new_tokens, args.rounds, args.threads)}
    a = results["a"]
    print(f"\n(a) decode ms/token, {args.threads} threads: dense build {a['graph_decode_ms_per_token']:.2f}, "
          f"HF generate {a['hf_generate_ms_per_token']:.2f}: ratio {a['ratio']:.3f} (target <= 1.0)")
    for label, path in pruned.items():
        report = bench_generate(path, dense, new_tokens=args.new_tokens, rounds=args.rounds, warmup=1,
                                provider="cpu", threads=args.threads, image_path=image_path, question=BENCH_QUESTION)
        results[label] = report.to_dict()
        print(f"\n== {label}")
        print(report.format_table())
    print("\n| config | prompt | dense TTFT ms | pruned TTFT ms | TTFT speedup | prefill speedup | prefill FLOPs "
          "speedup | prefill efficiency | TTFT efficiency | dense decode ms/token | pruned decode ms/token |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label in pruned:
        r = results[label]
        print(f"| {label} | {r['prompt_tokens']} | {r['dense_ttft_ms']:.1f} | {r['pruned_ttft_ms']:.1f} | "
              f"{r['ttft_speedup']:.2f} | {r['prefill_speedup']:.2f} | {r['prefill_flops_speedup']:.2f} | "
              f"{r['prefill_efficiency']:.2f} | {r['ttft_speedup'] / r['prefill_flops_speedup']:.2f} | "
              f"{r['dense_decode_ms_per_token']:.2f} | {r['pruned_decode_ms_per_token']:.2f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
