"""Answers from a build directory: ``prune-export run``, ``eval BUILD_DIR`` and ``bench --generate``.

Everything here runs the built graphs through :class:`engines.generate.GenerationRunner` on ONNX Runtime;
the model folder the build came from is not needed. Build files are verified against the manifest's
sha256 digests before any session is made, so a damaged build is named in one line instead of failing
inside ONNX Runtime.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prune_core.errors import BuildError, DataError
from prune_core.manifest import Manifest

#: The question ``bench --generate`` asks when none is given (the build check's longer prompt).
BENCH_QUESTION = "How many dogs are there in this picture, and where are they standing? Answer in one sentence."


def require_file(path: str | Path, what: str = "image") -> Path:
    """``path`` if it is a file, else one line saying whether it is missing or not a file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
    return path


def open_image(path: str | Path) -> Any:
    """A PIL image from ``path``, or one line saying why it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    path = require_file(path)
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}; pass a PNG, JPEG or another format Pillow reads") from None


def load_runner(build_dir: str | Path, *, provider: str = "auto", threads: int | None = None) -> Any:
    """A verified build's :class:`~engines.generate.GenerationRunner` (sessions made)."""
    from engines.generate import GenerationRunner

    manifest = Manifest.load(build_dir, verify="full")
    return GenerationRunner(build_dir, provider=provider, threads=threads, manifest=manifest).activate()  # type: ignore[arg-type]


def prefill_graph_flops(runner: Any, feeds: dict[str, np.ndarray]) -> int:
    """Matmul FLOPs a runner's prefill graph(s) execute on ``feeds``, counted from the graph, without the one
    logits row of the LM head (the cost model leaves it out, so the two compare)."""
    from .build import _graph_flops

    model = runner.manifest.model
    return _graph_flops(runner.prefill_runner, feeds) - 2 * int(model["hidden_size"]) * int(model["vocab_size"])


def timed_answer(runner: Any, image: Any, question: str, new_tokens: int) -> Any:
    """The timings (:class:`~engines.generate.GenerationStats`) of exactly ``new_tokens`` greedy tokens from
    image and question (EOS does not stop it: every build does the same work), as benchmarks time them."""
    from engines.generate import GenerationStats

    started = time.perf_counter()
    prompt = runner.prompt(image, question)
    stats = GenerationStats(prompt_tokens=prompt.num_tokens)
    for _ in runner.token_ids(runner.prefill_feeds(prompt), new_tokens, stats, started=started, stop_at_eos=False):
        pass
    return stats


def run_build(
    build_dir: Path, image_path: Path, question: str, *, max_new_tokens: int = 64, provider: str = "auto",
    threads: int | None = None, on_text: Callable[[str], None] | None = None, expect_dtype: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Answer ``question`` about the image at ``image_path``; ``on_text`` receives the answer as it streams.

    Returns the answer with its timings (``answer``, ``prompt_tokens``, ``new_tokens``, ``ttft_ms``,
    ``decode_ms_per_token``, ``kv_tokens_per_layer``, ``provider``, ...). ``expect_dtype``: refuse a build
    whose graphs are in another precision (``run --dtype``).
    """
    from engines.generate import GenerationError, GenerationStats

    if not question.strip():
        raise GenerationError("the question is empty; pass --question with the text to ask about the image")
    if max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    image = open_image(image_path)
    runner = load_runner(build_dir, provider=provider, threads=threads)
    if expect_dtype is not None and runner.manifest.dtype != expect_dtype:
        raise BuildError(
            f"{build_dir} holds {runner.manifest.dtype} graphs, not {expect_dtype}; a build's precision is baked "
            f"in: build another directory with `prune-export build --dtype {expect_dtype}`"
        )
    if on_text is None:
        answer = runner.generate(image, question, max_new_tokens)
        text, stats = answer.text, answer.stats
    else:
        stats = GenerationStats(prompt_tokens=0)
        pieces = []
        for piece in runner.stream(image, question, max_new_tokens, stats=stats):
            pieces.append(piece)
            on_text(piece)
        text = "".join(pieces)
    runner.deactivate()
    return {"answer": text, "build": str(build_dir), **stats.to_dict()}


# -- eval through a build --------------------------------------------------------------------------------
_OP = re.compile(r"^L(\d+):(img_key|img_rest)\.kv$")


def _kv_pruned_layers(manifest: Manifest) -> set[int]:
    """Layers where a static operation removes visual tokens' K/V (their KV count omits visual tokens)."""
    return {int(m.group(1)) for op in manifest.plan.get("ops", []) if (m := _OP.match(str(op)))}


def visual_tokens_per_layer(manifest: Manifest, kv_tokens: list[int], sys_tokens: int, text_tokens: int) -> list[int]:
    """Visual tokens entering each layer, read from the KV lengths the graph returned.

    System and text tokens always give K/V, so a layer's visual count is its KV length minus theirs; a
    layer whose visual K/V a static operation removes reports the count of the layer before it.
    """
    pruned = _kv_pruned_layers(manifest)
    out: list[int] = []
    for layer, n in enumerate(kv_tokens):
        if layer in pruned:
            out.append(out[-1] if out else int(manifest.model["visual_tokens"]))
        else:
            out.append(max(0, n - sys_tokens - text_tokens))
    return out


def eval_build(
    build_dir: Path, data_path: Path, *, max_new_tokens: int = 16, limit: int | None = None,
    provider: str = "auto", threads: int | None = None, progress: Callable[[int], None] | None = None,
    reference: Any = None,
) -> dict[str, Any]:  # fmt: skip
    """Exact-match accuracy of the build's greedy answers on a JSONL file, with dense and graph FLOPs.

    The same report as ``eval MODEL_DIR`` (keys and per-sample rows), plus ``engine`` and ``provider``.
    Pruned FLOPs are counted from the prefill graph(s) on each prompt (graph census, the LM head row left
    out as in the cost model); dense FLOPs come from the cost model for the same prompt. With a
    ``reference`` (:class:`calib.evaluate.ReferenceAnswers`, see :func:`.evaluate.load_reference`) each
    answer is compared with the dense one: ``agreement`` and the first-token KL.
    """
    from calib.data import load_rows
    from calib.evaluate import (
        EvalReport,
        SampleResult,
        check_answer_length,
        compare_answer,
        exact_match,
        first_token_logprobs,
    )
    from engines.generate import GenerationStats
    from prune_core.cost import prefill_flops
    from prune_core.spec import GroupSizes, ModelSpec

    rows = load_rows(data_path, require_answer=True, limit=limit)
    check_answer_length(reference, max_new_tokens)
    runner = load_runner(build_dir, provider=provider, threads=threads)
    manifest = runner.manifest
    spec = ModelSpec(**{k: v for k, v in manifest.model.items() if k not in ("path", "fingerprint")})
    tokenizer = runner.tokenizer
    results = []
    start = time.perf_counter()
    for row in rows:
        prompt = runner.prompt(row.load_image(), row.question)
        feeds = runner.prefill_feeds(prompt)
        stats = GenerationStats(prompt_tokens=prompt.num_tokens)
        logits: list[np.ndarray] = []
        ids = list(runner.token_ids(feeds, max_new_tokens, stats, logits))
        text = tokenizer.decode(ids, skip_special_tokens=True)
        sys_n, txt_n = prompt.image_start, prompt.num_tokens - prompt.image_end
        graph = prefill_graph_flops(runner, feeds)
        result = SampleResult(
            line=row.line, question=row.question, answer=row.answer, prediction=text,
            correct=None if row.answer is None else exact_match(text, row.answer),
            dense_flops=prefill_flops(spec, GroupSizes.for_prompt(spec, sys_n, txt_n)), pruned_flops=graph,
            visual_tokens_per_layer=visual_tokens_per_layer(manifest, stats.kv_tokens_per_layer, sys_n, txt_n),
            token_decision=_autoprune_decision(manifest, stats.autoprune),
        )  # fmt: skip
        if reference is not None:
            compare_answer(result, first_token_logprobs(logits[0]), reference.answer(row))
        results.append(result)
        if progress is not None:
            progress(1)
    report = EvalReport.from_results(results, spec.num_layers, time.perf_counter() - start,
                                     None if reference is None else reference.name)
    provider_name = runner.provider
    runner.deactivate()
    return {"report": report, "engine": "onnxruntime", "provider": provider_name, "build": str(build_dir)}


class BuildReference:
    """Dense greedy answers from a dense build's graphs (``eval --reference DENSE_BUILD``)."""

    def __init__(self, runner: Any, max_new_tokens: int, name: str) -> None:
        self.runner = runner
        self.max_new_tokens = max_new_tokens
        self.name = name

    def answer(self, row: Any, sample: Any = None) -> Any:
        from calib.evaluate import ReferenceAnswer, first_token_logprobs

        out = self.runner.generate(row.load_image(), row.question, self.max_new_tokens, keep_logits=True)
        return ReferenceAnswer(out.text, first_token_logprobs(out.step_logits[0]))


def _autoprune_decision(manifest: Manifest, decided: dict[str, Any] | None) -> dict[str, Any] | None:
    """An AutoPrune build's per-prompt decision in the executor's report keys (table mode: what graphs do)."""
    if decided is None or manifest.autoprune is None:
        return None
    from prune_core.autoprune import steepness

    section = manifest.autoprune
    return {"method": "autoprune", "mode": "table", "tokens": section["tokens"], "n0": section["n0"],
            "i1": decided["i1"], "k": steepness(decided["i1"], section["k0"], section["gamma"]),
            "keep": decided["keep"], "merged": decided["merged"]}  # fmt: skip


# -- bench --generate ------------------------------------------------------------------------------------
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
    pruned_dir: Path, dense_dir: Path, *, new_tokens: int, rounds: int = 10, warmup: int = 2,
    provider: str = "auto", threads: int | None = None, image_path: Path | None = None,
    question: str | None = None, progress: Callable[[int, int], None] | None = None,
) -> GenerateBench:  # fmt: skip
    """Time to first token and decode ms/token of two builds of one model, interleaved on one prompt.

    Each round runs the dense and the pruned build once (order alternating), from the image and question to
    ``new_tokens`` greedy tokens (EOS does not stop a benchmark run: both builds do the same number of
    steps). The prompt is ``image_path`` + ``question``, or the build check's image and longer question.
    """
    from engines.generate import GenerationStats

    from .build import check_same_model

    if new_tokens < 2:
        raise BuildError(f"--generate needs at least 2 new tokens (one decode step) to time decoding, got {new_tokens}")
    from .build import _check_image

    image = open_image(image_path) if image_path is not None else _check_image(0)
    question = question or BENCH_QUESTION
    runners = {"dense": load_runner(dense_dir, provider=provider, threads=threads),
               "pruned": load_runner(pruned_dir, provider=provider, threads=threads)}  # fmt: skip
    dm, pm = runners["dense"].manifest, runners["pruned"].manifest
    check_same_model(pruned_dir, pm, dense_dir, dm)
    if runners["dense"].provider != runners["pruned"].provider:
        raise BuildError("the two builds run on different providers; pass --provider")

    samples: dict[str, list[GenerationStats]] = {"dense": [], "pruned": []}
    total = warmup + rounds
    for i in range(total):
        order = ["dense", "pruned"] if i % 2 == 0 else ["pruned", "dense"]
        for name in order:
            stats = timed_answer(runners[name], image, question, new_tokens)
            if i >= warmup:
                samples[name].append(stats)
        if progress is not None:
            progress(i + 1, total)

    def medians(rows: list[GenerationStats]) -> dict[str, float]:
        return {
            "ttft_ms": statistics.median(s.ttft_ms for s in rows),
            "prefill_ms": statistics.median(s.prefill_ms for s in rows),
            "decode_ms_per_token": statistics.median(float(np.median(s.decode_ms)) for s in rows),
        }

    prompt = runners["dense"].prompt(image, question)
    flops = {}
    for name, runner in runners.items():
        flops[name] = prefill_graph_flops(runner, runner.prefill_feeds(prompt))
    report = GenerateBench(
        rounds=rounds, new_tokens=new_tokens, prompt_tokens=prompt.num_tokens, provider=runners["dense"].provider,
        dense=medians(samples["dense"]), pruned=medians(samples["pruned"]),
        dense_flops=flops["dense"], pruned_flops=flops["pruned"],
        meta={"dense_kv_tokens": samples["dense"][0].kv_tokens_per_layer,
              "pruned_kv_tokens": samples["pruned"][0].kv_tokens_per_layer,
              "threads": threads, "pruned_build": str(pruned_dir), "dense_build": str(dense_dir), "dtype": pm.dtype},
    )  # fmt: skip
    for runner in runners.values():
        runner.deactivate()
    return report
