"""Measuring builds: ``inspect`` (what a prefill graph holds and computes), ``bench`` (interleaved prefill
latency next to graph FLOPs), ``bench --generate`` (time to first token and decode ms/token) and the time to
first token of ``sweep --latency``.

Every timing goes through the one interleaved timer, :func:`engines.benchmark.time_interleaved`: builds
take turns in rotating order after warm-up, on the same inputs, and the reports keep medians (and p90)
next to the FLOPs counted from the graphs themselves.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from engines.benchmark import LatencyStats, SpeedupReport, compare_latency, time_interleaved
from engines.generate import GenerationStats
from engines.prefill import PrefillRunner
from graph_passes import census
from graph_passes.quantize import weight_matmuls, weight_matmuls_after
from prune_core import defaults, memory
from prune_core.errors import BuildError
from prune_core.manifest import Manifest

from .open_build import (
    cast_feeds,
    check_same_model,
    graph_flops,
    load_runner,
    open_image,
    prefill_graph_flops,
    prompt_feeds,
    synthetic_image,
)

Log = Callable[[str], None]

#: The question ``bench --generate`` asks when none is given (the build check's longer prompt).
BENCH_QUESTION = "How many dogs are there in this picture, and where are they standing? Answer in one sentence."


# -- inspect -----------------------------------------------------------------------------------------------
def inspect_build(build_dir: Path, text_tokens: int | None = None, *, run: bool = True,
                  image_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Op counts and matmul FLOPs of the prefill graph(s) for one prompt, computed from the graphs.

    With ``run=False`` the graphs are never run: the FLOPs come from shape inference alone (ONNX's, then
    ONNX Runtime's symbolic one: census method ``static``; no weights are loaded, for builds too large to
    run on this machine, a 7B fp16 graph on a CPU), and the per-layer KV lengths (read from a run) are None.
    Shapes that depend on the prompt's values (AutoPrune) cannot be inferred: such a build is refused.
    ``image_size`` (height, width): any-resolution builds, the check image at that size (:func:`prompt_feeds`).
    """
    manifest = Manifest.load(build_dir, verify="full")
    feed = prompt_feeds(build_dir, text_tokens, image_size=image_size, run=run, manifest=manifest)
    names = ["prefill"] if manifest.prefill_layout == "single" else ["prefill_head", "prefill_tail"]
    out: dict[str, np.ndarray] = {}
    if run:
        memory.check_fits(f"inspect {build_dir} (running its prefill)", memory.estimate(memory.graphs_bytes(build_dir, names)),
                          "inspect it with --no-run, which counts the FLOPs by shape inference without loading weights")  # fmt: skip
        with PrefillRunner(build_dir, provider="cpu", manifest=manifest) as prefill:
            flops = graph_flops(prefill, feed)
            out = prefill.infer(cast_feeds(prefill, feed))
    elif manifest.prefill_layout != "single" or manifest.autoprune is not None:
        raise BuildError(
            f"inspect --no-run cannot count {build_dir}: its AutoPrune prefill keeps a number of tokens that "
            "depends on the prompt, which shape inference cannot know without running the graph; inspect "
            "it without --no-run"
        )
    else:
        try:
            flops = census(manifest.graph_path(build_dir, "prefill"), input_values=feed, method="static").matmul_flops
        except BuildError:
            why = ("an any-resolution GSOP build splits each image's key and other visual tokens by a count computed "
                   "from the image's visual count at run time" if manifest.model_spec().any_resolution and
                   manifest.plan.get("ops") else "a matmul's shape depends on the inputs' values")  # fmt: skip
            raise BuildError(f"inspect --no-run cannot count {build_dir}: {why}, which shape inference cannot "
                             "know without running the graph; inspect it without --no-run") from None
    op_counts: dict[str, dict[str, int]] = {}
    counts_total: dict[str, int] = {}
    weight_mm = quantized_mm = 0
    for name in names:
        model = onnx.load(str(manifest.graph_path(build_dir, name)), load_external_data=False)
        quantized_mm += len(weight_matmuls_after(model))
        weight_mm += len(weight_matmuls(model)) + len(weight_matmuls_after(model))
        counts: dict[str, int] = {}
        for node in model.graph.node:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            counts[key] = counts.get(key, 0) + 1
        op_counts[name] = dict(sorted(counts.items()))
        for k, v in counts.items():
            counts_total[k] = counts_total.get(k, 0) + v
    kv = [int(out[f"present.{layer}.key"].shape[2]) for layer in range(manifest.model["num_layers"])] if run else None
    sys_len, txt_len = feed["sys_embeds"].shape[1], feed["text_embeds"].shape[1]
    doc: dict[str, Any] = {
        "build": str(build_dir),
        "target": manifest.target,
        "dtype": manifest.dtype,
        "prefill_layout": manifest.prefill_layout,
        "prompt": {"sys_tokens": int(sys_len), "visual_tokens": int(feed["image_embeds"].shape[1]),
                   "text_tokens": int(txt_len)},  # fmt: skip
        "matmul_flops": int(flops),
        "kv_tokens_per_layer": kv,
        "op_counts": dict(sorted(counts_total.items())),
        "op_counts_per_graph": op_counts,
        "plan": manifest.plan,
        "quantization": manifest.quantization["mode"] if manifest.quantization else None,
        "weight_matmuls": weight_mm,
        "quantized_matmuls": quantized_mm,
    }
    if "autoprune.keep" in out:
        doc["autoprune"] = {"complexity": float(out["autoprune.complexity"].reshape(-1)[0]),
                            "keep": [int(x) for x in out["autoprune.keep"]],
                            "merged": [int(x) for x in out["autoprune.merged"]]}  # fmt: skip
    return doc


# -- bench: the prefill --------------------------------------------------------------------------------------
def bench_builds(
    pruned_dir: Path, dense_dir: Path, *, runs: int = defaults.BENCH_RUNS, warmup: int = defaults.BENCH_WARMUP,
    provider: str = defaults.PROVIDER, threads: int | None = None, text_tokens: int | None = None,
    image_size: tuple[int, int] | None = None, progress: Callable[[int, int], None] | None = None,
    feed: Mapping[str, np.ndarray] | None = None,
) -> SpeedupReport:  # fmt: skip
    """Interleaved prefill latency of two builds on the same inputs, next to their graph FLOPs.

    The inputs are ``feed`` when given, else the pruned build's check prompt (``text_tokens``: with that many
    text rows instead; ``image_size``: an any-resolution build's check image at that size).
    """
    pruned_m, dense_m = Manifest.load(pruned_dir, verify="full"), Manifest.load(dense_dir, verify="full")
    check_same_model(pruned_dir, pruned_m, dense_dir, dense_m)
    feed = dict(feed) if feed is not None else prompt_feeds(pruned_dir, text_tokens, image_size=image_size,
                                                            manifest=pruned_m)  # fmt: skip
    with (PrefillRunner(pruned_dir, provider=provider, threads=threads, manifest=pruned_m) as pruned,  # type: ignore[arg-type]
          PrefillRunner(dense_dir, provider=provider, threads=threads, manifest=dense_m) as dense):  # type: ignore[arg-type]  # fmt: skip
        if pruned.provider != dense.provider:
            raise BuildError(f"the two builds run on different providers ({pruned.provider} vs {dense.provider})")
        pruned_feed, dense_feed = cast_feeds(pruned, feed), cast_feeds(dense, feed)
        dense_flops = graph_flops(dense, feed)
        pruned_flops = graph_flops(pruned, feed)
        dense_stats, pruned_stats = compare_latency(
            lambda: dense.infer(dense_feed), lambda: pruned.infer(pruned_feed), runs=runs, warmup=warmup,
            progress=progress,
        )
        provider_name = pruned.provider
    meta = {
        "prompt_tokens": int(feed["sys_embeds"].shape[1] + feed["image_embeds"].shape[1] + feed["text_embeds"].shape[1]),
        "threads": threads,
        "pruned_build": str(pruned_dir),
        "dense_build": str(dense_dir),
        "dtype": pruned_m.dtype,
    }
    return SpeedupReport(dense_stats, pruned_stats, dense_flops, pruned_flops, provider_name, meta)


# -- whole answers: bench --generate and the sweep's time to first token --------------------------------------
def timed_answer(runner: Any, image: Any, question: str, new_tokens: int) -> GenerationStats:
    """The timings of exactly ``new_tokens`` greedy tokens from image and question (EOS does not stop it:
    every build does the same work), as the benchmarks time them."""
    started = time.perf_counter()
    prompt = runner.prompt(image, question)
    stats = GenerationStats(prompt_tokens=prompt.num_tokens)
    for _ in runner.token_ids(runner.prefill_feeds(prompt), new_tokens, stats, started=started, stop_at_eos=False):
        pass
    return stats


@dataclass(frozen=True)
class AnswerTimings:
    """Interleaved answer timings of several builds on one prompt (milliseconds; medians and p90 over the
    measured rounds), with the prefill FLOPs each build's graph executes on that prompt."""

    builds: dict[str, Path]
    rounds: int
    warmup: int
    new_tokens: int
    prompt_tokens: int
    provider: str
    ttft: dict[str, LatencyStats]
    prefill: dict[str, LatencyStats]
    decode_per_token: dict[str, LatencyStats | None]
    flops: dict[str, int]
    kv_tokens: dict[str, list[int]]


def time_answers(
    build_dirs: Mapping[str, Path], image: Any, question: str, *, new_tokens: int, rounds: int, warmup: int,
    provider: str = defaults.PROVIDER, threads: int | None = None, progress: Callable[[int, int], None] | None = None,
) -> AnswerTimings:  # fmt: skip
    """Time ``new_tokens``-token answers of every build, interleaved (:func:`time_interleaved`), on one prompt.

    All builds must be of the same model and run on the same provider.
    """
    runners = {name: load_runner(path, provider=provider, threads=threads) for name, path in build_dirs.items()}
    names = list(runners)
    first = runners[names[0]]
    for name in names[1:]:
        check_same_model(build_dirs[name], runners[name].manifest, build_dirs[names[0]], first.manifest)
    for runner in runners.values():
        runner.check_new_tokens(new_tokens)
    with contextlib.ExitStack() as active:
        for runner in runners.values():
            active.enter_context(runner)
        if len({r.provider for r in runners.values()}) > 1:
            raise BuildError("the builds run on different providers; pass --provider")
        timed = time_interleaved(
            {name: (lambda r=runner: timed_answer(r, image, question, new_tokens)) for name, runner in runners.items()},
            rounds=rounds, warmup=warmup, progress=progress,
        )  # fmt: skip
        prompt = first.prompt(image, question)
        flops = {name: prefill_graph_flops(r, r.prefill_feeds(prompt)) for name, r in runners.items()}
        provider_name = first.provider
    stats = timed.results

    def decode(rows: list[GenerationStats]) -> LatencyStats | None:
        per_round = [float(np.median(s.decode_ms)) for s in rows if s.decode_ms]
        return LatencyStats.from_ms(per_round) if per_round else None

    return AnswerTimings(
        builds=dict(build_dirs), rounds=rounds, warmup=warmup, new_tokens=new_tokens,
        prompt_tokens=prompt.num_tokens, provider=provider_name,
        ttft={n: LatencyStats.from_ms([s.ttft_ms for s in stats[n]]) for n in names},
        prefill={n: LatencyStats.from_ms([s.prefill_ms for s in stats[n]]) for n in names},
        decode_per_token={n: decode(stats[n]) for n in names}, flops=flops,
        kv_tokens={n: stats[n][0].kv_tokens_per_layer for n in names},
    )  # fmt: skip


@dataclass
class GenerateBench:
    """Interleaved end-to-end timings of a pruned and a dense build (medians, milliseconds)."""

    rounds: int
    new_tokens: int
    prompt_tokens: int
    provider: str
    dense: dict[str, float]
    pruned: dict[str, float]
    dense_flops: int
    pruned_flops: int
    meta: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        d, p = self.dense, self.pruned
        return {
            "rounds": self.rounds,
            "new_tokens": self.new_tokens,
            "prompt_tokens": self.prompt_tokens,
            "provider": self.provider,
            "dense_ttft_ms": d["ttft_ms"],
            "pruned_ttft_ms": p["ttft_ms"],
            "dense_ttft_p90_ms": d["ttft_p90_ms"],
            "pruned_ttft_p90_ms": p["ttft_p90_ms"],
            "ttft_speedup": d["ttft_ms"] / p["ttft_ms"],
            "dense_prefill_ms": d["prefill_ms"],
            "pruned_prefill_ms": p["prefill_ms"],
            "prefill_speedup": d["prefill_ms"] / p["prefill_ms"],
            "dense_decode_ms_per_token": d["decode_ms_per_token"],
            "pruned_decode_ms_per_token": p["decode_ms_per_token"],
            "decode_speedup": d["decode_ms_per_token"] / p["decode_ms_per_token"],
            "dense_prefill_flops": self.dense_flops,
            "pruned_prefill_flops": self.pruned_flops,
            "prefill_flops_speedup": self.dense_flops / self.pruned_flops,
            "prefill_efficiency": (d["prefill_ms"] / p["prefill_ms"]) / (self.dense_flops / self.pruned_flops),
            "dense_kv_tokens": self.meta["dense_kv_tokens"],
            "pruned_kv_tokens": self.meta["pruned_kv_tokens"],
            **{k: v for k, v in self.meta.items() if not k.endswith("kv_tokens")},
        }

    def format_table(self) -> str:
        r = self.to_dict()
        lines = [
            f"prompt {self.prompt_tokens} tokens, {self.new_tokens} new tokens, {self.rounds} interleaved rounds "
            f"on {self.provider} (medians)",
            f"{'':24}{'dense':>12}{'pruned':>12}{'speedup':>10}",
            f"{'time to first token ms':24}{r['dense_ttft_ms']:12.2f}{r['pruned_ttft_ms']:12.2f}{r['ttft_speedup']:9.2f}x",
            f"{'  of which prefill ms':24}{r['dense_prefill_ms']:12.2f}{r['pruned_prefill_ms']:12.2f}{r['prefill_speedup']:9.2f}x",
            f"{'decode ms/token':24}{r['dense_decode_ms_per_token']:12.2f}{r['pruned_decode_ms_per_token']:12.2f}"
            f"{r['decode_speedup']:9.2f}x",
            f"{'prefill TFLOPs':24}{self.dense_flops / 1e12:12.4f}{self.pruned_flops / 1e12:12.4f}"
            f"{r['prefill_flops_speedup']:9.2f}x",
            f"prefill efficiency (measured / FLOPs speedup): {r['prefill_efficiency']:.2f}",
            f"KV tokens per layer: dense {sum(r['dense_kv_tokens'])}, pruned {sum(r['pruned_kv_tokens'])} in total",
        ]
        return "\n".join(lines)


def bench_generate(
    pruned_dir: Path, dense_dir: Path, *, new_tokens: int, rounds: int = defaults.BENCH_RUNS,
    warmup: int = defaults.BENCH_WARMUP, provider: str = defaults.PROVIDER, threads: int | None = None,
    image_path: Path | None = None, question: str | None = None, progress: Callable[[int, int], None] | None = None,
) -> GenerateBench:  # fmt: skip
    """Time to first token and decode ms/token of two builds of one model, interleaved on one prompt.

    Each round runs the dense and the pruned build once (order alternating), from the image and question to
    ``new_tokens`` greedy tokens (EOS does not stop a benchmark run: both builds do the same number of
    steps). The prompt is ``image_path`` + ``question``, or the build check's image and longer question.
    """
    if new_tokens < 2:
        raise BuildError(f"--generate needs at least 2 new tokens (one decode step) to time decoding, got {new_tokens}")
    image = open_image(image_path) if image_path is not None else synthetic_image(0)
    t = time_answers({"dense": dense_dir, "pruned": pruned_dir}, image, question or BENCH_QUESTION,
                     new_tokens=new_tokens, rounds=rounds, warmup=warmup, provider=provider, threads=threads,
                     progress=progress)  # fmt: skip

    def medians(name: str) -> dict[str, float]:
        decode = t.decode_per_token[name]
        assert decode is not None  # new_tokens >= 2: every round made a decode step
        return {"ttft_ms": t.ttft[name].median_ms, "ttft_p90_ms": t.ttft[name].p90_ms,
                "prefill_ms": t.prefill[name].median_ms, "decode_ms_per_token": decode.median_ms}  # fmt: skip

    return GenerateBench(
        rounds=rounds, new_tokens=new_tokens, prompt_tokens=t.prompt_tokens, provider=t.provider,
        dense=medians("dense"), pruned=medians("pruned"), dense_flops=t.flops["dense"], pruned_flops=t.flops["pruned"],
        meta={"dense_kv_tokens": t.kv_tokens["dense"], "pruned_kv_tokens": t.kv_tokens["pruned"],
              "threads": threads, "pruned_build": str(pruned_dir), "dense_build": str(dense_dir),
              "dtype": Manifest.load(pruned_dir).dtype},
    )  # fmt: skip


def time_first_token(build_dirs: dict[str, Path], row: Any, *, rounds: int, warmup: int, provider: str,
                     threads: int | None, log: Log) -> dict[str, Any]:  # fmt: skip
    """Median time to first token of each build on one data row, builds interleaved (order rotating per round).

    The dense build must be one of them (key ``dense``): each build's ratio is its median over dense's.
    """
    names = list(build_dirs)
    log(f"timing the first token of {len(names)} builds: {warmup + rounds} interleaved rounds on data line {row.line}")
    t = time_answers(build_dirs, row.load_image(), row.question, new_tokens=1, rounds=rounds, warmup=warmup,
                     provider=provider, threads=threads)  # fmt: skip
    out: dict[str, Any] = {"builds": names, "rounds": rounds, "warmup": warmup, "provider": t.provider,
                           "threads": threads, "line": row.line, "prompt_tokens": t.prompt_tokens, "results": {}}  # fmt: skip
    for name in names:
        out["results"][name] = {"ttft_ms": t.ttft[name].median_ms, "ttft_p90_ms": t.ttft[name].p90_ms,
                                "prefill_ms": t.prefill[name].median_ms, "graph_flops": t.flops[name]}  # fmt: skip
    dense = out["results"]["dense"]
    for r in out["results"].values():
        r["ttft_ratio"] = r["ttft_ms"] / dense["ttft_ms"]
        r["ttft_speedup"] = dense["ttft_ms"] / r["ttft_ms"]
        r["flops_ratio"] = r["graph_flops"] / dense["graph_flops"]
    return out
