"""Serving throughput through a local Triton server: dense vs AutoPrune T=64, at concurrency 1, 4 and 8.

On the bench preset (random fp32 weights, 8 layers, hidden 1024, 576 visual tokens) with the bench prompt
(the bench image and a ~100-token question: ~685 tokens), the dense and the AutoPrune T=64 builds are
deployed (``prune-export deploy``) and served by one local ``tritonserver`` (``prune-export serve``'s
server: the Python-based onnxruntime backend, one instance per model). Each request asks for exactly
``--new-tokens`` tokens (``ignore_eos``), so both builds do the same decode work.

For each concurrency C, C client threads (each its own HTTP client) send requests back to back; the
configurations alternate in rounds (dense, pruned, dense, pruned, ...) so noise hits both alike. Reported:
requests/s (requests / wall time of the round), p50 and p99 request latency, and

- the single-request end-to-end speedup: dense p50 / pruned p50 at concurrency 1;
- the throughput gain at each C: pruned req/s / dense req/s, and its ratio to that speedup (target >= 0.8:
  serving must not eat the savings).

Run it alone on the machine (no test run, no other benchmark):

    python benchmarks/bench_triton.py [--rounds 2] [--requests 12] [--new-tokens 8] [--out out/bench-triton]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DEFAULT_BENCH_MODEL,
    bench_image,
    ensure_bench_builds,
    ensure_bench_model,
    percentile,
    send_requests,
)

from engines.triton.server import LocalTritonServer  # noqa: E402
from prune_export.workflows.deploy import deploy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_BENCH_MODEL)
    ap.add_argument("--tokens", type=float, default=64, help="AutoPrune T of the pruned build")
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per concurrency")
    ap.add_argument("--requests", type=int, default=12, help="requests per round (at least the concurrency)")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("out/bench-triton"))
    ap.add_argument("--port", type=int, default=18100, help="HTTP port; gRPC and metrics take the next two")
    args = ap.parse_args()

    model = ensure_bench_model(args.model)
    dense, pruned = ensure_bench_builds(model, 0.3, args.tokens)
    builds = {"dense": dense, f"autoprune_t{args.tokens:g}": pruned[f"AutoPrune T={args.tokens:g}"]}
    args.out.mkdir(parents=True, exist_ok=True)
    repos = []
    for name, build in builds.items():
        repo = args.out / f"repo-{name}"
        deploy(build, repo, name=name, overwrite=True)
        repos.append(repo)
    import io

    buffer = io.BytesIO()
    bench_image().save(buffer, format="PNG")
    image = buffer.getvalue()
    levels = [int(c) for c in args.concurrency.split(",")]
    log = open(args.out / "server.log", "w")  # noqa: SIM115
    server = LocalTritonServer(repos, http_port=args.port, grpc_port=args.port + 1, metrics_port=args.port + 2, log_file=log)
    results: dict[str, dict[str, dict[str, float]]] = {}
    with server:
        url = server.http_url
        for name in builds:  # warm-up: first requests load pages and make ORT's allocations
            send_requests(url, name, image, 1, 2, args.new_tokens)
        for c in levels:
            per: dict[str, dict[str, list[float]]] = {name: {"wall": [], "lat": [], "n": []} for name in builds}
            for r in range(args.rounds):
                order = list(builds) if r % 2 == 0 else list(reversed(builds))
                for name in order:
                    n = max(args.requests, c)
                    got = send_requests(url, name, image, c, n, args.new_tokens)
                    wall, lat = got["wall"][0], got["lat"]
                    per[name]["wall"].append(wall)
                    per[name]["lat"].extend(lat)
                    per[name]["n"].append(n)
                    print(f"  concurrency {c} round {r + 1} {name}: {n / wall:.2f} req/s, p50 {statistics.median(lat):.0f} ms", flush=True)
            results[str(c)] = {
                name: {"requests_per_s": sum(v["n"]) / sum(v["wall"]), "p50_ms": statistics.median(v["lat"]),
                       "p99_ms": percentile(v["lat"], 99), "requests": sum(v["n"])}
                for name, v in per.items()
            }  # fmt: skip
    log.close()
    dense_name, pruned_name = list(builds)
    speedup = results[str(levels[0])][dense_name]["p50_ms"] / results[str(levels[0])][pruned_name]["p50_ms"]
    summary = {}
    print(f"\nbench preset, {args.new_tokens} new tokens per request, local Triton (CPU); single-request speedup "
          f"(dense p50 / pruned p50 at concurrency {levels[0]}): {speedup:.2f}x")  # fmt: skip
    print(f"{'C':>3} | {'dense req/s':>11} {'p50':>7} {'p99':>7} | {'pruned req/s':>12} {'p50':>7} {'p99':>7} | gain | gain/speedup")
    for c in levels:
        d, p = results[str(c)][dense_name], results[str(c)][pruned_name]
        gain = p["requests_per_s"] / d["requests_per_s"]
        summary[str(c)] = {"throughput_gain": gain, "gain_over_speedup": gain / speedup}
        print(f"{c:>3} | {d['requests_per_s']:>11.2f} {d['p50_ms']:>7.0f} {d['p99_ms']:>7.0f} | {p['requests_per_s']:>12.2f} "
              f"{p['p50_ms']:>7.0f} {p['p99_ms']:>7.0f} | {gain:.2f}x | {gain / speedup:.2f}")  # fmt: skip
    doc = {"builds": {k: str(v) for k, v in builds.items()}, "new_tokens": args.new_tokens, "rounds": args.rounds,
           "single_request_speedup": speedup, "levels": results, "summary": summary}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
