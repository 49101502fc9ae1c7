"""Helpers shared by the benchmark scripts: the bench model, a sample, interleaved timing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DEFAULT_BENCH_MODEL = Path("out/bench-model")


def ensure_bench_model(path: Path = DEFAULT_BENCH_MODEL, seed: int = 0) -> Path:
    """The bench-preset demo model, built once and reused."""
    if (path / "config.json").is_file():
        return path
    from exporter.demo import build_demo_model

    print(f"building the bench demo model in {path} (once)")
    return build_demo_model(path, "bench", seed=seed, overwrite=True)


def bench_image(seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(336, 336, 3) * 255).astype("uint8"))


#: A question of ~100 tokens after the image, like the reference prompt of docs/methods.md (35 + 576 + 100).
BENCH_QUESTION = (
    "Look at the picture carefully and describe the objects you can see, their colors, their shapes, "
    "how many of each there are, and where they are placed relative to each other in the scene. "
    "Answer the question using a single word or phrase."
)


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, measured by the project's one interleaved timer
    (:func:`engines.benchmark.time_interleaved`: rotating order after warm-up)."""
    from engines.benchmark import time_interleaved

    timed = time_interleaved(fns, rounds=rounds, warmup=warmup)
    return {name: timed.stats(name).median_ms / 1e3 for name in fns}


def setup_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def heuristic_plan(spec):
    """A GSOP plan that is not searched: image-group ops from the last layer down, per step the mlp, then
    the q, then the kv op of both image groups. A search on a big model takes hours; latency depends on which
    operations are gone, not on how well they were chosen, so benchmarks use this ordering."""
    from prune_core.ops import Group, Module, Operation
    from prune_core.plan import Plan
    from prune_core.spec import GroupSizes

    steps = []
    for layer in range(spec.num_layers - 1, 0, -1):
        for module in (Module.MLP, Module.Q, Module.KV):
            steps.append({Operation(layer, g, module) for g in (Group.IMG_KEY, Group.IMG_REST)})
    return Plan.new(spec, GroupSizes.default(spec), steps)


#: Where the benchmark scripts keep their builds (made once, reused).
BUILDS = Path("out/bench-builds")


def ensure_bench_builds(model: Path, budget: float, tokens: float, rebuild: bool = False) -> tuple[Path, dict[str, Path]]:
    """The dense build and the GSOP (heuristic plan at ``budget``) and AutoPrune (T = ``tokens``) builds of
    ``model`` in :data:`BUILDS`, each made through ``prune-export build``'s code unless already there (a build
    without decode graphs, from an older version, is remade)."""
    from exporter.adapters import load_spec
    from prune_core.manifest import MANIFEST_NAME, Manifest
    from prune_core.plan import AutoPruneSection
    from prune_export.workflows.build import BuildSettings, build
    from prune_export.workflows.selection import PlanChoice

    def ensure(name: str, choice: PlanChoice) -> Path:
        out = BUILDS / name
        if (out / MANIFEST_NAME).is_file() and not rebuild and "max_batch" in (Manifest.load(out, verify="none").generation or {}):
            return out
        print(f"building {out}")
        build(model, out, choice, BuildSettings(overwrite=True, provider="cpu"), lambda m: print("  " + m))
        return out

    plan = heuristic_plan(load_spec(model))
    BUILDS.mkdir(parents=True, exist_ok=True)
    plan_path = BUILDS / "heuristic-plan.json"
    plan.save(plan_path)
    selection = plan.select(budget)
    gsop = PlanChoice(selection.ops, None, {"path": str(plan_path), "budget": budget,
                                            "flops_ratio": selection.flops_ratio, "operations": len(selection.ops)})
    autoprune = PlanChoice(frozenset(), AutoPruneSection(tokens=tokens), {"tokens": tokens})
    dense = ensure("dense", PlanChoice())
    return dense, {
        f"GSOP budget {budget}": ensure(f"gsop-{budget}", gsop),
        f"AutoPrune T={tokens:g}": ensure(f"autoprune-{tokens:g}", autoprune),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def send_requests(url: str, model: str, image: bytes, concurrency: int, requests: int, new_tokens: int) -> dict[str, list[float]]:
    """``requests`` requests from ``concurrency`` threads, each its own client (a gRPC stream for a decoupled
    model, where the time to first token is measured; else an HTTP or gRPC call): ``wall`` seconds,
    latencies ``lat`` and times to first token ``ttft`` (ms, None where not streamed)."""
    out: dict[str, list[float]] = {"lat": [], "ttft": []}
    lock = threading.Lock()
    remaining = [requests]
    errors: list[BaseException] = []

    def client() -> None:
        try:
            from engines.triton.client import TritonAsker

            with TritonAsker(url, model=model) as asker:
                while True:
                    with lock:
                        if remaining[0] == 0:
                            return
                        remaining[0] -= 1
                    result = asker.ask(image, BENCH_QUESTION, max_new_tokens=new_tokens, ignore_eos=True)
                    assert result.new_tokens == new_tokens, result
                    with lock:
                        out["lat"].append(result.latency_ms)
                        out["ttft"].append(result.ttft_ms)
        except BaseException as exc:  # reported after the round
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["wall"] = [time.perf_counter() - start]
    if errors:
        raise errors[0]
    return out
