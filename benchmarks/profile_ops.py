"""Where a pruned prefill's time goes, op type by op type, next to the dense build's (ONNX Runtime CPU profiler).

``bench`` says how close a pruned build's speedup comes to its FLOPs speedup (the efficiency); this says why
it falls short. It runs each build's prefill graph with ONNX Runtime's profiler on the same prompt (the check
prompt, or with ``--image-size`` an any-resolution build's check image at that size), the builds
interleaved, and sums the profiler's node times by op type over the measured runs. Matmul time should shrink
by the FLOPs ratio; what does not (gathers and scatters of per-group rows, concatenations, norms, softmax
over the tokens that are left) is the gap.

Run it alone on the machine (no tests or other benchmarks beside it).

    python benchmarks/profile_ops.py out/next-builds/gsop-0.3 --baseline out/next-builds/dense \\
        --image-size 672x672 [--runs 3] [--threads 2] [--top 12]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import onnxruntime as ort

MATMUL_OPS = {"MatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "MatMulIntegerToFloat"}


def session(build: Path, threads: int, folder: str):
    from prune_core.manifest import Manifest

    manifest = Manifest.load(build, verify="full")
    if manifest.prefill_layout != "single":
        raise SystemExit(f"{build}: a split prefill (TensorRT layout); profile a --target onnxruntime build")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(folder) / build.name)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(manifest.graph_path(build, "prefill")), options, providers=["CPUExecutionProvider"])


def by_op(profile: Path, skip_runs: int) -> tuple[dict[str, float], float]:
    """Microseconds per op type over the runs after the first ``skip_runs``, and the runs' total."""
    events = json.loads(profile.read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = runs[skip_runs]["ts"] if len(runs) > skip_runs else 0
    ops: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            ops[e["args"].get("op_name", "?")] += e["dur"]
    total = sum(r["dur"] for r in runs[skip_runs:])
    return dict(ops), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pruned", type=Path)
    ap.add_argument("--baseline", type=Path, required=True)
    ap.add_argument("--image-size", default=None, help="WIDTHxHEIGHT (any-resolution builds)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()

    from engines.onnxruntime import OrtRunner
    from prune_export.options import ImageSize
    from prune_export.workflows.open_build import cast_feeds, prompt_feeds

    size = ImageSize().convert(args.image_size, None, None) if args.image_size else None
    feed = prompt_feeds(args.pruned, image_size=size)
    with tempfile.TemporaryDirectory() as folder:
        sessions = {"dense": session(args.baseline, args.threads, folder), "pruned": session(args.pruned, args.threads, folder)}
        feeds = {name: cast_feeds(OrtRunner(s), feed) for name, s in sessions.items()}
        for _ in range(args.warmup + args.runs):  # interleaved: dense, pruned, dense, ...
            for name, s in sessions.items():
                s.run(None, feeds[name])
        results = {name: by_op(Path(s.end_profiling()), args.warmup) for name, s in sessions.items()}
    (dense_ops, dense_total), (pruned_ops, pruned_total) = results["dense"], results["pruned"]
    visual = feed["image_embeds"].shape[1]
    tokens = feed["sys_embeds"].shape[1] + visual + feed["text_embeds"].shape[1]
    print(f"prompt {tokens} tokens ({visual} visual); {args.runs} runs each after {args.warmup} warm-up, "
          f"{args.threads} threads; ms per run")
    mm = {name: sum(v for k, v in ops.items() if k in MATMUL_OPS) for name, ops in (("dense", dense_ops), ("pruned", pruned_ops))}
    print(f"\nwhole run: dense {dense_total / args.runs / 1e3:.1f}, pruned {pruned_total / args.runs / 1e3:.1f} "
          f"(ratio {pruned_total / dense_total:.4f})")
    print(f"matmuls:   dense {mm['dense'] / args.runs / 1e3:.1f}, pruned {mm['pruned'] / args.runs / 1e3:.1f} "
          f"(ratio {mm['pruned'] / mm['dense']:.4f})")
    rest = {n: sum(ops.values()) - mm[n] for n, ops in (("dense", dense_ops), ("pruned", pruned_ops))}
    print(f"other ops: dense {rest['dense'] / args.runs / 1e3:.1f}, pruned {rest['pruned'] / args.runs / 1e3:.1f}")
    print("\n| op type | dense ms | pruned ms | pruned share of its run |")
    print("| --- | --- | --- | --- |")
    kinds = sorted(set(dense_ops) | set(pruned_ops), key=lambda k: -pruned_ops.get(k, 0.0))
    for kind in kinds[: args.top]:
        d, p = dense_ops.get(kind, 0.0), pruned_ops.get(kind, 0.0)
        print(f"| {kind} | {d / args.runs / 1e3:.1f} | {p / args.runs / 1e3:.1f} | {p / max(pruned_total, 1):.3f} |")


if __name__ == "__main__":
    main()
