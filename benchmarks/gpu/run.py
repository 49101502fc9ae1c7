"""The prepared GPU benchmark: one command, prefill and decode at LLaVA-1.5-7B shapes, one JSON, one table.

    python benchmarks/gpu/run.py [--out-dir out/gpu] [--time-budget-s 480]     # on one H100/H200, fp16
    python benchmarks/gpu/run.py --smoke                                         # the same code on CPU, tiny

What it runs, in one process (the random model is built on the device, nothing is read from disk):

1. ``bench_prefill.py``: prefill latency of dense, GSOP at 0.3, AutoPrune T=64 and a combined plan (GSOP at
   0.7 plus AutoPrune T=64) through the executor and the baked module, eager and ``torch.compile`` (CUDA
   graphs where shapes allow), CUDA events, interleaved, medians, each next to its FLOPs speedup; no compile
   starts after ``--prefill-deadline-s``;
2. ``bench_decode.py``: decode ms/token of the decode module after each of those prefills (the pruned caches
   are shorter), next to HuggingFace's decoder.

It writes ``OUT_DIR/gpu-bench.json`` (everything both scripts measured, with the GPU, dtype and versions) and
``OUT_DIR/gpu-bench.md`` (the tables), rewritten after each part, so a run cut short keeps what it measured.
Install a CUDA build of torch, then the project (``pip install -e .``); docs/benchmarks.md says how, also for
a GPU machine without internet.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_decode  # noqa: E402
import bench_prefill  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny preset on CPU in fp32, 2 rounds, no compile")
    ap.add_argument("--out-dir", type=Path, default=Path("out/gpu"))
    ap.add_argument("--time-budget-s", type=float, default=480.0, help="decode is skipped past this")
    ap.add_argument("--prefill-deadline-s", type=float, default=270.0, help="no prefill compile starts after this")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        common = ["--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--tokens", "4", "--sys-tokens", "5",
                  "--text-tokens", "8"]  # fmt: skip
        prefill_args = [*common, "--rounds", "2", "--warmup", "1", "--no-compile", "--budget", "0.9", "--combined-budget", "0.95"]
        decode_args = [*common, "--rounds", "2", "--warmup", "1", "--new-tokens", "4", "--budget", "0.9", "--combined-budget", "0.95"]
    else:
        prefill_args = ["--rounds", "10", "--warmup", "3", "--deadline-s", str(args.prefill_deadline_s)]
        decode_args = ["--rounds", "5", "--warmup", "1", "--new-tokens", "16"]
    doc: dict = {"command": " ".join(["benchmarks/gpu/run.py", *(argv if argv is not None else sys.argv[1:])])}

    def save() -> None:
        doc["wall_s"] = time.perf_counter() - started
        (out / "gpu-bench.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        parts = ["# GPU benchmark", "", f"`{doc['command']}`, {doc['wall_s']:.0f} s", ""]
        if "prefill" in doc:
            parts += ["## Prefill", doc["prefill"].get("markdown", "(no timing phase finished)"), ""]
        if "decode" in doc:
            parts += ["## Decode (ms/token after each prefill)", "", doc["decode"]["markdown"], ""]
        parts += [f"skipped: {doc['skipped']}"] if doc.get("skipped") else []
        (out / "gpu-bench.md").write_text("\n".join(parts) + "\n")

    doc["prefill"] = bench_prefill.main([*prefill_args, "--out", str(out / "prefill.json")])
    save()
    _release()
    if time.perf_counter() - started > args.time_budget_s:
        doc["skipped"] = f"decode: the time budget of {args.time_budget_s:.0f} s was spent"
    else:
        doc["decode"] = bench_decode.main([*decode_args, "--out", str(out / "decode.json")])
    save()
    print(f"\nwrote {out / 'gpu-bench.json'} and {out / 'gpu-bench.md'} in {doc['wall_s']:.0f} s", flush=True)
    return doc


def _release() -> None:
    """Free the prefill part's model and compiled graphs before the decode part builds its own."""
    import torch

    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
