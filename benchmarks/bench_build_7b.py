"""7B-shaped builds on a small machine: peak resident memory and wall time of each build.

Makes (once) the ``llava-7b`` demo model (LLaVA-1.5-7B's shapes, 7.06 B random fp16 parameters), or with
``--preset next-7b`` LLaVA-1.6-vicuna-7B's (the same tensors plus ``image_newline``, any-resolution tiling),
then runs ``prune-export build`` three times, each in its own process: dense, a GSOP plan at budget 0.3 and
AutoPrune at T=64 (next-7b: T=320, the reference code's middle LLaVA-NeXT budget), all
``--dtype fp16 --low-memory --skip-check`` (a 7B fp16 graph cannot run on ONNX Runtime's CPU provider in
24 GB: it would cast every weight to fp32). Each build's peak resident set size comes from the kernel's
accounting of that process (``wait4``), its wall time from the clock. Then it counts the static builds'
prefill FLOPs with ``prune-export inspect --no-run`` (shape inference, no weights loaded) and compares them
with the cost model (``prune-export info``, and ``prefill_flops`` for the GSOP operations) on the same
prompt: 4 system + 576 visual + 100 text tokens with the demo tokenizer (next-7b: a 672x672 image, 2,928
visual tokens; ``inspect --image-size 672x672``).

The GSOP plan is not searched (a 7B search needs a GPU for hours): it is the benchmarks' heuristic ordering
(image groups' mlp, q, kv from the last layer down); memory and FLOPs depend on which operations are gone,
not on how well they were chosen. A build is about 27 GB on disk; each is deleted after it is measured
unless ``--keep`` is given.

    python benchmarks/bench_build_7b.py [--preset llava-7b|next-7b] [--model DIR] [--work DIR] [--keep]
                                        [--configs dense,gsop,autoprune]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import heuristic_plan  # noqa: E402

TEXT_TOKENS = 100
#: next-7b: the image of the measured prompt, the one that gives LLaVA-1.6 the most visual tokens (2,928).
IMAGE_SIZE = "672x672"


def timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` with its output in ``log``; its wall seconds and peak resident set size (GiB)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed with exit code {code}; see {log}")
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "prune_export.cli", *map(str, args)]


def size_gb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["llava-7b", "next-7b"], default="llava-7b")
    ap.add_argument("--model", type=Path, default=None, help="[default: out/m7b, or out/next7b for next-7b]")
    ap.add_argument("--work", type=Path, default=None, help="[default: out/bench-7b or out/bench-next7b]")
    ap.add_argument("--configs", default="dense,gsop,autoprune")
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--tokens", type=float, default=None, help="AutoPrune T [default: 64, next-7b: 320]")
    ap.add_argument("--keep", action="store_true", help="keep the builds (about 27 GB each)")
    ap.add_argument("--out", type=Path, default=None, help="[default: out/bench-build-7b.json or -next7b.json]")
    args = ap.parse_args()
    nxt = args.preset == "next-7b"
    args.model = args.model or Path("out/next7b" if nxt else "out/m7b")
    args.work = args.work or Path("out/bench-next7b" if nxt else "out/bench-7b")
    args.tokens = args.tokens or (320.0 if nxt else 64.0)
    args.out = args.out or Path("out/bench-build-next7b.json" if nxt else "out/bench-build-7b.json")
    image = ["--image-size", IMAGE_SIZE] if nxt else []

    from exporter.adapters import load_spec
    from prune_core.cost import prefill_flops
    from prune_core.spec import GroupSizes

    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"model": str(args.model), "preset": args.preset, "builds": {}}
    if not (args.model / "config.json").is_file():
        print(f"making the {args.preset} demo model in {args.model}")
        results["demo_model"] = timed(cli("demo-model", args.model, "--preset", args.preset), args.work / "demo-model.log")
        print(f"  {results['demo_model']}")
    spec = load_spec(args.model)
    plan = heuristic_plan(spec)
    plan_path = args.work / "heuristic-plan.json"
    plan.save(plan_path)
    selection = plan.select(args.budget)
    configs = {
        "dense": ([], ()),
        f"gsop-{args.budget:g}": (["--plan", plan_path, "--budget", args.budget], selection.ops),
        f"autoprune-T{args.tokens:g}": (["--autoprune-tokens", args.tokens], None),
    }
    wanted = set(args.configs.split(","))
    info = json.loads(subprocess.run(cli("info", args.model, "--json", "--text-tokens", TEXT_TOKENS, *image),
                                     check=True, capture_output=True, text=True).stdout)  # fmt: skip
    results["info"] = {"prompt_tokens": info["prompt_tokens"], "dense_prefill_flops": info["dense_prefill_flops"]}
    lm_head = 2 * spec.hidden_size * spec.vocab_size
    for name, (extra, ops) in configs.items():
        if name.split("-")[0] not in wanted:
            continue
        out = args.work / name
        print(f"building {name} into {out}")
        entry = timed(cli("build", args.model, "--out", out, "--dtype", "fp16", "--low-memory", "--skip-check",
                          "--overwrite", *extra), args.work / f"{name}.log")  # fmt: skip
        entry["size_gb"] = size_gb(out)
        inspected = None
        if ops is not None:
            inspected = subprocess.run(cli("inspect", out, "--no-run", "--json", "--text-tokens", TEXT_TOKENS, *image),
                                       capture_output=True, text=True)  # fmt: skip
            if inspected.returncode != 0:  # e.g. an any-resolution GSOP graph that counts its key tokens at run time
                entry["inspect"] = {"refused": inspected.stdout.strip() or inspected.stderr.strip()}
        if inspected is not None and inspected.returncode == 0:
            doc = json.loads(inspected.stdout)
            p = doc["prompt"]
            sizes = GroupSizes.for_prompt(spec, p["sys_tokens"], p["text_tokens"], visual=p["visual_tokens"])
            expected = prefill_flops(spec, sizes, ops)
            entry["inspect"] = {"prompt": p, "matmul_flops": doc["matmul_flops"], "lm_head_row": lm_head,
                                "cost_model_flops": expected,
                                "relative_difference": (doc["matmul_flops"] - lm_head - expected) / expected}  # fmt: skip
            if name == "dense":
                entry["inspect"]["info_dense_flops"] = info["dense_prefill_flops"]
                entry["inspect"]["info_prompt_tokens"] = info["prompt_tokens"]
        results["builds"][name] = entry
        print(f"  {json.dumps(entry)}")
        if not args.keep:
            shutil.rmtree(out)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
