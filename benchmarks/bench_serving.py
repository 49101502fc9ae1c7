"""Batched serving through a local Triton server: dense vs AutoPrune T=64 at 1, 4, 8 and 16 concurrent clients.

The bench preset (random fp32 weights, 8 layers, hidden 1024, 576 visual tokens) and the bench prompt (the
bench image and a ~100-token question: ~685 prompt tokens). The dense and the AutoPrune T=64 builds are
deployed with ``prune-export deploy --stream --max-batch 16`` (the continuous-batching orchestrator) and served
by one local ``tritonserver`` (``prune-export serve``'s). Each request asks for exactly ``--new-tokens``
tokens (``ignore_eos``), so both builds do the same decode work; each client streams over gRPC, so its time
to first token is measured where the user sees it.

For each concurrency C, C client threads send requests back to back; dense and pruned alternate within
each level (order reversed in the second round) so noise hits both alike. Reported per build and C:
requests/s, generated tokens/s, p50/p99 latency and time to first token, and

- the dense build's token throughput at C=8 over its C=1 (goal >= 3x);
- the pruned build's throughput gain over dense at each C, over the single-request speedup (dense p50 /
  pruned p50 at C=1) (goal >= 0.8);
- the KV memory one request holds (its caches after the prefill, and grown by every new token) and the
  largest batch that fits a fixed KV budget (``--kv-budget-mb``) under the scheduler's own rule.

Run it alone on the machine (no test run, no other benchmark):

    python benchmarks/bench_serving.py [--rounds 1] [--requests 2] [--new-tokens 32] [--out out/bench-serving]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BENCH_QUESTION,
    DEFAULT_BENCH_MODEL,
    bench_image,
    ensure_bench_builds,
    ensure_bench_model,
    percentile,
    send_requests,
)

from engines.batching import batch_kv_bytes, slot_bytes  # noqa: E402
from engines.generate import GenerationRunner  # noqa: E402
from engines.triton.server import LocalTritonServer  # noqa: E402
from prune_export.workflows.deploy import deploy  # noqa: E402


def kv_per_request(build: Path, image, new_tokens: int) -> dict[str, float]:
    """One request's KV caches on this build: tokens per layer after the prefill, its bytes then, and the
    most it holds (every layer grown by the answer's tokens)."""
    with GenerationRunner(build, provider="cpu") as runner:
        prompt = runner.prompt(image, BENCH_QUESTION)
        first = runner.prefilled(runner.prefill_feeds(prompt))
        per_slot = slot_bytes(first.cache, runner.num_layers)
        tokens = [int(first.cache[3 * layer].shape[2]) for layer in range(runner.num_layers)]
    return {"kv_tokens": sum(tokens), "kv_tokens_per_layer": tokens,
            "prefill_mib": sum(a.nbytes for a in first.cache) / 2**20,
            "full_mib": batch_kv_bytes([(tokens, new_tokens - 1)], per_slot) / 2**20,
            "slot_bytes": per_slot}  # fmt: skip


def engine_steps(build: Path, image, batches: list[int], steps: int = 6) -> dict[str, float]:
    """The decode graph alone, in this process (ONNX Runtime, IO binding): ms per step at each batch of
    copies of the bench prompt's caches (the engine's scaling, without serving or prefills)."""
    import numpy as np

    from engines.batching import PaddedCache

    out = {}
    with GenerationRunner(build, provider="cpu") as runner:
        first = runner.prefilled(runner.prefill_feeds(runner.prompt(image, BENCH_QUESTION)))
        t0 = time.perf_counter()
        runner.prefilled(runner.prefill_feeds(runner.prompt(image, BENCH_QUESTION)))
        out["prefill_ms"] = (time.perf_counter() - t0) * 1e3
        for batch in batches:
            padded = PaddedCache(runner.num_layers)
            for _ in range(batch):
                padded.add(first.cache)
            cache, ids, times = padded.arrays, np.ones((batch, 1), dtype=np.int64), []
            for _ in range(steps):
                t0 = time.perf_counter()
                _, cache = runner.decode(ids, cache)
                times.append(time.perf_counter() - t0)
            out[str(batch)] = statistics.median(times[2:]) * 1e3
    return out


def fits(kv: dict, new_tokens: int, budget_mib: float) -> int:
    """The largest batch of this request that fits ``budget_mib`` under the scheduler's rule."""
    n = 0
    while batch_kv_bytes([(kv["kv_tokens_per_layer"], new_tokens - 1)] * (n + 1), kv["slot_bytes"]) <= budget_mib * 2**20:
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_BENCH_MODEL)
    ap.add_argument("--tokens", type=float, default=64, help="AutoPrune T of the pruned build")
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds per concurrency")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per round")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16, help="deploy --max-batch")
    ap.add_argument("--kv-budget-mb", type=float, default=256.0, help="the fixed KV budget of the 'fits' column")
    ap.add_argument("--out", type=Path, default=Path("out/bench-serving"))
    ap.add_argument("--port", type=int, default=18200, help="HTTP port; gRPC and metrics take the next two")
    args = ap.parse_args()

    model = ensure_bench_model(args.model)
    dense, pruned = ensure_bench_builds(model, 0.3, args.tokens)
    builds = {"dense": dense, f"autoprune_t{args.tokens:g}": pruned[f"AutoPrune T={args.tokens:g}"]}
    args.out.mkdir(parents=True, exist_ok=True)
    kv = {name: kv_per_request(build, bench_image(), args.new_tokens) for name, build in builds.items()}
    levels = [int(c) for c in args.concurrency.split(",")]
    engine = {name: engine_steps(build, bench_image(), levels) for name, build in builds.items()}
    repos = []
    for name, build in builds.items():
        repo = args.out / f"repo-{name}"
        deploy(build, repo, name=name, stream=True, max_batch=args.max_batch, overwrite=True)
        repos.append(repo)
    buffer = io.BytesIO()
    bench_image().save(buffer, format="PNG")
    image = buffer.getvalue()
    log = open(args.out / "server.log", "w")  # noqa: SIM115
    server = LocalTritonServer(repos, http_port=args.port, grpc_port=args.port + 1, metrics_port=args.port + 2, log_file=log)
    results: dict[str, dict[str, dict[str, float]]] = {}
    with server:
        url = f"grpc://{server.grpc_url}"
        for name in builds:  # warm-up: first requests load pages and make ORT's allocations
            send_requests(url, name, image, 2, 2, args.new_tokens)
        for c in levels:
            per: dict[str, dict[str, list[float]]] = {name: {"wall": [], "lat": [], "ttft": [], "n": []} for name in builds}
            for r in range(args.rounds):
                for name in list(builds) if r % 2 == 0 else list(reversed(builds)):
                    n = c * args.requests
                    got = send_requests(url, name, image, c, n, args.new_tokens)
                    for key in ("wall", "lat", "ttft"):
                        per[name][key].extend(got[key])
                    per[name]["n"].append(n)
                    print(f"  C={c} round {r + 1} {name}: {n / got['wall'][0]:.2f} req/s, "
                          f"{n * args.new_tokens / got['wall'][0]:.1f} tok/s, p50 {statistics.median(got['lat']):.0f} ms, "
                          f"TTFT p50 {statistics.median(got['ttft']):.0f} ms", flush=True)  # fmt: skip
            results[str(c)] = {
                name: {"requests_per_s": sum(v["n"]) / sum(v["wall"]),
                       "tokens_per_s": sum(v["n"]) * args.new_tokens / sum(v["wall"]),
                       "p50_ms": statistics.median(v["lat"]), "p99_ms": percentile(v["lat"], 99),
                       "ttft_p50_ms": statistics.median(v["ttft"]), "ttft_p99_ms": percentile(v["ttft"], 99),
                       "requests": sum(v["n"])}
                for name, v in per.items()
            }  # fmt: skip
    log.close()
    accounts = [line.split('"')[1] for line in (args.out / "server.log").read_text().splitlines() if "decode steps" in line]
    dense_name, pruned_name = list(builds)
    first = str(levels[0])
    speedup = results[first][dense_name]["p50_ms"] / results[first][pruned_name]["p50_ms"]
    print(f"\nbench preset, {args.new_tokens} new tokens per request, local Triton (CPU), deploy --stream --max-batch "
          f"{args.max_batch}; single-request speedup (dense p50 / pruned p50 at C={levels[0]}): {speedup:.2f}x")  # fmt: skip
    print(f"{'C':>3} | {'build':<16} {'req/s':>6} {'tok/s':>7} {'p50':>7} {'p99':>7} {'TTFT50':>7} {'TTFT99':>7} | gain | gain/speedup")
    summary: dict[str, dict[str, float]] = {}
    for c in levels:
        d, p = results[str(c)][dense_name], results[str(c)][pruned_name]
        gain = p["tokens_per_s"] / d["tokens_per_s"]
        summary[str(c)] = {"throughput_gain": gain, "gain_over_speedup": gain / speedup,
                           "dense_tokens_per_s_over_c1": d["tokens_per_s"] / results[first][dense_name]["tokens_per_s"]}  # fmt: skip
        for name, row in ((dense_name, d), (pruned_name, p)):
            tail = f"| {gain:.2f}x | {gain / speedup:.2f}" if name == pruned_name else "|"
            print(f"{c:>3} | {name:<16} {row['requests_per_s']:>6.2f} {row['tokens_per_s']:>7.1f} {row['p50_ms']:>7.0f} "
                  f"{row['p99_ms']:>7.0f} {row['ttft_p50_ms']:>7.0f} {row['ttft_p99_ms']:>7.0f} {tail}")  # fmt: skip
    if "8" in summary:
        print(f"dense token throughput at C=8 over C=1: {summary['8']['dense_tokens_per_s_over_c1']:.2f}x (goal >= 3x)")
    for name in builds:
        k = kv[name]
        print(f"KV per request, {name}: {k['kv_tokens']} tokens over the layers after the prefill, {k['prefill_mib']:.1f} MiB; "
              f"{k['full_mib']:.1f} MiB with {args.new_tokens} new tokens; a {args.kv_budget_mb:g} MiB budget fits "
              f"{fits(k, args.new_tokens, args.kv_budget_mb)} such requests")  # fmt: skip
    for name, row in engine.items():
        cells = ", ".join(f"B={b}: {row[str(b)]:.1f} ms ({b / row[str(b)] * 1e3:.0f} tok/s)" for b in levels)
        print(f"decode graph alone, in process, {name}: prefill {row['prefill_ms']:.0f} ms; step {cells}")
    for line in accounts[-2:]:
        print(f"server: {line}")
    doc = {"builds": {k: str(v) for k, v in builds.items()}, "new_tokens": args.new_tokens, "rounds": args.rounds,
           "max_batch": args.max_batch, "single_request_speedup": speedup, "levels": results, "summary": summary,
           "kv": {name: {k: v for k, v in row.items() if k != "slot_bytes"} | {"fits_budget": fits(row, args.new_tokens, args.kv_budget_mb)}
                  for name, row in kv.items()},
           "kv_budget_mb": args.kv_budget_mb, "server_accounts": accounts, "engine_steps_ms": engine}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
