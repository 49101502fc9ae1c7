"""Distributed GSOP search: the greedy phase on 1 vs 2 Ray workers, and a projection to LLaVA-1.5-7B.

Part 1, measured. The ``bench`` demo model (576 visual tokens, hidden 1024, 8 layers; ``--model`` to use
another folder), ``--rows`` synthetic calibration rows (default 8), metric ``kl``. For each worker count
(``--workers``, default ``1,2``; every worker one CPU thread) a fresh local Ray instance starts, the
workers load the model and prepare their shards of the rows, and the search runs. Step 0 is skipped
(``free_block_module_sets=()``), so after the baseline the search goes straight into the greedy phase:
its first ranking sweep (every candidate scored against the unpruned model, handed to the evaluator 8 at a
time as in a real search), which is timed; the search is then stopped (``--evals N`` stops after N
greedy evaluations instead). Every evaluation is split over the workers by rows alike, so the sweep's
speed-up is the greedy phase's. Worker counts alternate between rounds (``--rounds``, default 2: ``1,2``
then ``2,1``), and the script must run alone on the machine.

Reported per run: pool start (Ray, model load, calibration shards), the baseline evaluation, the greedy
evaluations' wall time and seconds per evaluation, the time the slowest worker computed (so wall minus it
is what Ray and the driver add per call), and the largest difference of the greedy values from the first
run (0 when the workers use the same thread count: the rows are summed in the serial order).
Then the speed-up of each worker count over 1 worker (medians over rounds).

Part 2, projected. A GSOP search of LLaVA-1.5-7B with ``--project-rows`` rows (500) and
``--project-evaluations`` evaluations (500, the paper's count) on 1 and 8 GPUs, from a per-row cost of
``--gpu-row-ms`` (default 68.8 ms: the executor's dense prefill of a 711-token prompt, fp16, measured on an
NVIDIA H100 in docs/benchmarks.md; a ``kl`` row is one such forward) and the per-call overhead measured
in part 1 (the wall-minus-slowest-worker time per call of the largest worker count). No prefix reuse (its
states do not fit at 500 rows of 7B), no batching:
``T(N) = E * (ceil(R / N) * t_row + overhead)``.

Part 3, batched calibration (``--batch-sizes 1,4,8``; ``--batch-sizes ''`` skips it). In this process
with one thread: the evaluation of the dense model and of one pruned op set (img_rest pruned from layer 2
on) with each batch size, interleaved over ``--rounds`` rounds; medians, and the largest per-row value
difference from batch size 1.

    python benchmarks/bench_search_ray.py [--rows 8] [--evals N] [--rounds 2] [--json out.json]
    python benchmarks/bench_search_ray.py --quick --model /tmp/tiny    # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ensure_bench_model  # noqa: E402

from calib.distributed import RayEvaluator, WorkerConfig  # noqa: E402
from calib.evaluator import metric_info  # noqa: E402
from calib.search import SearchEvent, SearchSettings, candidate_operations, run_search  # noqa: E402
from exporter.adapters import load_spec  # noqa: E402
from exporter.demo import build_demo_data  # noqa: E402
from prune_core.spec import GroupSizes  # noqa: E402


class _Stop(Exception):
    pass


class _Recorder:
    """Wraps the Ray evaluator: records each call's op sets, values and wall time."""

    def __init__(self, inner: RayEvaluator) -> None:
        self.inner = inner
        self.metric = inner.metric
        self.calls: list[tuple[list, list[float], float]] = []

    @property
    def workers_alive(self) -> int:
        return self.inner.workers_alive

    @property
    def workers_total(self) -> int:
        return self.inner.workers_total

    def evaluate(self, ops):
        return self.evaluate_many([ops])[0]

    def evaluate_many(self, op_sets):
        start = time.perf_counter()
        values = self.inner.evaluate_many(op_sets)
        self.calls.append((list(op_sets), values, time.perf_counter() - start))
        return values


def one_run(model: Path, data: Path, rows: int, workers: int, evals: int, metric: str) -> dict:
    spec = load_spec(model)
    settings = SearchSettings(tolerance=1e-3, steps=15, key_danger_layers=2, free_block_module_sets=())
    evals = evals or len(candidate_operations(spec, settings))
    config = WorkerConfig(str(model), str(data), metric, threads=1)
    t0 = time.perf_counter()
    with RayEvaluator(config, workers, rows, metric_info(metric)) as pool:
        start_s = time.perf_counter() - t0
        rec = _Recorder(pool)
        s = pool.sizes[0]
        layout = GroupSizes(s.sys, s.img_key, s.img_rest, round(sum(z.txt for z in pool.sizes) / rows))
        critical_before: list[float] = []

        def stop(event: SearchEvent) -> None:
            critical_before.append(pool.stats.critical_seconds)
            if event.phase == "greedy" and event.evaluations >= 1 + evals:
                raise _Stop

        try:
            run_search(rec, spec, layout, settings, progress=stop)
        except _Stop:
            pass
        base_s = rec.calls[0][2]
        greedy_ops = [o for c in rec.calls[1:] for o in c[0]]
        greedy_vals = [v for c in rec.calls[1:] for v in c[1]]
        greedy_s = sum(c[2] for c in rec.calls[1:])
        critical = pool.stats.critical_seconds - critical_before[0]
    return {
        "workers": workers, "rows": rows, "evals": len(greedy_ops), "pool_start_s": start_s,
        "baseline_s": base_s, "greedy_s": greedy_s, "s_per_eval": greedy_s / len(greedy_ops),
        "greedy_slowest_worker_s": critical, "calls": len(rec.calls) - 1,
        "overhead_per_call_s": (greedy_s - critical) / (len(rec.calls) - 1),
        "values": greedy_vals, "ops": [sorted(map(str, o)) for o in greedy_ops],
    }


def batched(model: Path, data: Path, sizes: list[int], rounds: int, metric: str) -> dict:
    import torch

    from calib.evaluator import CalibrationSet, ModelEvaluator
    from exporter.adapters import load_adapter
    from prune_core.ops import Group, Module, Operation, close_under_rules

    torch.set_num_threads(1)
    adapter = load_adapter(model)
    calib = CalibrationSet.load(adapter, data, metric)
    n = adapter.spec.num_layers
    pruned = frozenset(close_under_rules(
        {Operation(layer, Group.IMG_REST, m) for layer in range(2, n) for m in Module}, n))
    evaluators = {b: ModelEvaluator(adapter, calib, prefix_reuse=False, batch_size=b) for b in sizes}
    times: dict[int, list[float]] = {b: [] for b in sizes}
    values: dict[int, list[float]] = {}
    for r in range(rounds):
        for b in sizes if r % 2 == 0 else sizes[::-1]:
            start = time.perf_counter()
            vals = evaluators[b].evaluate_rows(frozenset()) + evaluators[b].evaluate_rows(pruned)
            times[b].append(time.perf_counter() - start)
            values[b] = vals
    med = {b: statistics.median(t) for b, t in times.items()}
    diff = {b: max(abs(x - y) for x, y in zip(values[b], values[sizes[0]], strict=True)) for b in sizes}
    print(f"\n| batch size | 2 evaluations x {len(calib)} rows (median) | speed-up vs {sizes[0]} | max value diff |")
    print("| --- | --- | --- | --- |")
    for b in sizes:
        print(f"| {b} | {med[b]:.2f} s | {med[sizes[0]] / med[b]:.2f}x | {diff[b]:.1e} |")
    return {"median_s": med, "max_value_diff": diff}


def project(rows: int, evaluations: int, row_ms: float, overhead_s: float, gpus: int) -> float:
    return evaluations * (math.ceil(rows / gpus) * row_ms / 1000 + overhead_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="model folder [default: the bench demo model]")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--evals", type=int, default=0,
                    help="greedy evaluations timed per run [default: 0, the whole first ranking sweep]")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--metric", default="kl")
    ap.add_argument("--gpu-row-ms", type=float, default=68.76)
    ap.add_argument("--project-rows", type=int, default=500)
    ap.add_argument("--project-evaluations", type=int, default=500)
    ap.add_argument("--batch-sizes", default="1,4,8")
    ap.add_argument("--skip-workers", action="store_true", help="only part 3")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="smoke test: 4 rows, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.rounds = 4, 1
    model = args.model or ensure_bench_model()
    data = build_demo_data(Path("out/bench-search-ray-data"), samples=args.rows, seed=0)
    counts = [int(w) for w in args.workers.split(",")]
    runs: list[dict] = []
    report: dict = {}
    if args.batch_sizes:
        report["batched"] = batched(model, data, [int(b) for b in args.batch_sizes.split(",")], args.rounds,
                                    args.metric)
    if args.skip_workers:
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        return
    for r in range(args.rounds):
        for w in counts if r % 2 == 0 else counts[::-1]:
            print(f"round {r + 1}: {w} worker(s)...", flush=True)
            run = one_run(model, data, args.rows, w, args.evals, args.metric)
            ref = runs[0] if runs else run
            assert run["ops"] == ref["ops"], "the runs evaluated different op sets"
            run["max_value_diff"] = max(abs(a - b) for a, b in zip(run["values"], ref["values"], strict=True))
            run["round"] = r + 1
            runs.append(run)
            print(f"  pool start {run['pool_start_s']:.1f} s, baseline {run['baseline_s']:.1f} s, "
                  f"{run['evals']} greedy evaluations {run['greedy_s']:.1f} s ({run['s_per_eval']:.2f} s each; "
                  f"slowest worker {run['greedy_slowest_worker_s']:.1f} s), values vs first run: "
                  f"max diff {run['max_value_diff']:.1e}", flush=True)
    med = {w: statistics.median(x["greedy_s"] for x in runs if x["workers"] == w) for w in counts}
    n_evals = runs[0]["evals"]
    print(f"\n| workers | {n_evals} greedy evaluations, wall (median) | s / evaluation | speed-up vs 1 |")
    print("| --- | --- | --- | --- |")
    base = med[counts[0]]
    for w in counts:
        print(f"| {w} | {med[w]:.1f} s | {med[w] / n_evals:.2f} | {base / med[w]:.2f}x |")
    widest = max(counts)
    overhead = statistics.median(x["overhead_per_call_s"] for x in runs if x["workers"] == widest)
    print(f"\nRay + driver per call ({widest} workers): {overhead * 1000:.1f} ms")
    t1 = project(args.project_rows, args.project_evaluations, args.gpu_row_ms, overhead, 1)
    t8 = project(args.project_rows, args.project_evaluations, args.gpu_row_ms, overhead, 8)
    print(f"projected LLaVA-1.5-7B search, {args.project_rows} rows x {args.project_evaluations} evaluations at "
          f"{args.gpu_row_ms} ms/row: 1 GPU {t1 / 3600:.2f} h, 8 GPUs {t8 / 3600:.2f} h ({t1 / t8:.2f}x)")
    if args.json:
        report.update({"runs": runs, "median_greedy_s": med, "overhead_s": overhead,
                       "projection_s": {"1": t1, "8": t8}})
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
