"""Answers from a build directory: ``prune-export run`` and ``eval BUILD_DIR``.

Everything here runs the built graphs through :class:`engines.generate.GenerationRunner` on ONNX Runtime;
the model folder the build came from is not needed. Builds are opened (and their files verified) by
:mod:`.open_build`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from calib.data import load_rows
from calib.evaluate import (
    EvalReport,
    ReferenceAnswer,
    SampleResult,
    check_answer_length,
    compare_answer,
    exact_match,
    first_token_logprobs,
)
from engines.batching import Request
from engines.generate import GenerationError, GenerationStats
from prune_core import defaults
from prune_core.autoprune import steepness
from prune_core.cost import prefill_flops
from prune_core.errors import BuildError
from prune_core.manifest import Manifest, check_batch_size
from prune_core.ops import PRUNABLE_GROUPS, Module, Operation
from prune_core.prompt import MAX_IMAGE_PIXELS, PromptError, check_question
from prune_core.spec import GroupSizes

from .open_build import load_runner, open_image, prefill_graph_flops


def run_build(
    build_dir: Path, image_path: Path, question: str, *, max_new_tokens: int = defaults.ANSWER_NEW_TOKENS,
    provider: str = defaults.PROVIDER,
    threads: int | None = None, on_text: Callable[[str], None] | None = None, expect_dtype: str | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> dict[str, Any]:  # fmt: skip
    """Answer ``question`` about the image at ``image_path``; ``on_text`` receives the answer as it streams.

    Returns the answer with its timings (``answer``, ``prompt_tokens``, ``new_tokens``, ``ttft_ms``,
    ``decode_ms_per_token``, ``kv_tokens_per_layer``, ``provider``, ...). ``expect_dtype``: refuse a build
    whose graphs are in another precision (``run --dtype``). An image larger than ``max_image_pixels`` is
    refused before it is decoded.
    """
    try:
        check_question(question)
    except PromptError as err:
        raise GenerationError(f"{err} (--question)") from None
    if max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    image = open_image(image_path, max_image_pixels)
    runner = load_runner(build_dir, provider=provider, threads=threads)
    if expect_dtype is not None and runner.manifest.dtype != expect_dtype:
        raise BuildError(
            f"{build_dir} holds {runner.manifest.dtype} graphs, not {expect_dtype}; a build's precision is baked "
            f"in: build another directory with `prune-export build --dtype {expect_dtype}`"
        )
    runner.check_new_tokens(max_new_tokens)
    with runner:
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
    return {"answer": text, "build": str(build_dir), **stats.to_dict()}


# -- eval through a build --------------------------------------------------------------------------------
def _kv_pruned_layers(manifest: Manifest) -> set[int]:
    """Layers where a static operation removes visual tokens' K/V (their KV count omits visual tokens)."""
    ops = (Operation.from_str(str(text)) for text in manifest.plan.get("ops", []))
    return {op.layer for op in ops if op.module is Module.KV and op.group in PRUNABLE_GROUPS}


def visual_tokens_per_layer(manifest: Manifest, kv_tokens: list[int], sys_tokens: int, text_tokens: int,
                            visual: int | None = None) -> list[int]:
    """Visual tokens entering each layer, read from the KV lengths the graph returned.

    System and text tokens always give K/V, so a layer's visual count is its KV length minus theirs; a
    layer whose visual K/V a static operation removes reports the count of the layer before it (layer 0:
    the prompt's ``visual`` tokens, by default the model's).
    """
    pruned = _kv_pruned_layers(manifest)
    out: list[int] = []
    for layer, n in enumerate(kv_tokens):
        if layer in pruned:
            out.append(out[-1] if out else int(manifest.model["visual_tokens"] if visual is None else visual))
        else:
            out.append(max(0, n - sys_tokens - text_tokens))
    return out


def eval_build(
    build_dir: Path, data_path: Path, *, max_new_tokens: int = defaults.EVAL_NEW_TOKENS, limit: int | None = None,
    provider: str = defaults.PROVIDER, threads: int | None = None, progress: Callable[[int], None] | None = None,
    reference: Any = None, observe: Callable[[Any, list[int], list[np.ndarray], SampleResult], None] | None = None,
    batch_size: int = 1,
) -> dict[str, Any]:  # fmt: skip
    """Exact-match accuracy of the build's greedy answers on a JSONL file, with dense and graph FLOPs.

    The same report as ``eval MODEL_DIR`` (keys and per-sample rows), plus ``engine`` and ``provider``.
    Pruned FLOPs are counted from the prefill graph(s) on each prompt (graph census, the LM head row left
    out as in the cost model); dense FLOPs come from the cost model for the same prompt. With a
    ``reference`` (:class:`calib.evaluate.ReferenceAnswers`, see :func:`.evaluate.load_reference`) each
    answer is compared with the dense one: ``agreement`` and the first-token KL. ``observe(row, token_ids,
    step_logits, result)`` sees every row's answer tokens, the logits of each step and the row's result (the
    sweep compares a quantized build's with its float twin's).
    """
    rows = load_rows(data_path, require_answer=True, limit=limit)
    check_answer_length(reference, max_new_tokens)
    runner = load_runner(build_dir, provider=provider, threads=threads)
    runner.check_new_tokens(max_new_tokens)
    check_batch_size(runner.manifest, batch_size)
    if batch_size > 1 and observe is not None:
        raise BuildError("observing every step's logits needs batch size 1")
    start = time.perf_counter()
    with runner, (reference if hasattr(reference, "__enter__") else contextlib.nullcontext()):
        answer = _answer_rows if batch_size == 1 else _batched_answers(batch_size)
        results = answer(runner, rows, max_new_tokens, reference, progress, observe)
        provider_name = runner.provider
    report = EvalReport.from_results(results, int(runner.manifest.model["num_layers"]), time.perf_counter() - start,
                                     None if reference is None else reference.name)  # fmt: skip
    return {"report": report, "engine": "onnxruntime", "provider": provider_name, "build": str(build_dir)}


def _answer_rows(runner: Any, rows: list[Any], max_new_tokens: int, reference: Any,
                 progress: Callable[[int], None] | None,
                 observe: Callable[[Any, list[int], list[np.ndarray], SampleResult], None] | None = None) -> list[SampleResult]:  # fmt: skip
    """Each row's result: the answer, its FLOPs and visual tokens, and its agreement with ``reference``."""
    results = []
    for row in rows:
        prompt = runner.prompt(row.load_image(), row.question)
        feeds = runner.prefill_feeds(prompt)
        stats = GenerationStats(prompt_tokens=prompt.num_tokens)
        logits: list[np.ndarray] = []
        ids = list(runner.token_ids(feeds, max_new_tokens, stats, logits))
        result = _row_result(runner, row, prompt, feeds, ids, logits[0], stats, reference)
        if observe is not None:
            observe(row, ids, logits, result)
        results.append(result)
        if progress is not None:
            progress(1)
    return results


def _batched_answers(batch_size: int) -> Callable[..., list[SampleResult]]:
    """:func:`_answer_rows` through the continuous-batching scheduler, ``batch_size`` answers per step."""

    def answer(runner: Any, rows: list[Any], max_new_tokens: int, reference: Any,
               progress: Callable[[int], None] | None, observe: Any = None) -> list[SampleResult]:  # fmt: skip
        scheduler = runner.scheduler(batch_size)
        results: list[SampleResult | None] = [None] * len(rows)
        requests = []
        for index, row in enumerate(rows):
            requests.append(scheduler.submit(_row_request(runner, index, row, max_new_tokens, reference, results, progress)))
        scheduler.run()
        for request in requests:
            if request.error is not None:
                raise request.error
        return [r for r in results if r is not None]

    return answer


def _row_request(runner: Any, index: int, row: Any, max_new_tokens: int, reference: Any,
                 results: list[SampleResult | None], progress: Callable[[int], None] | None) -> Request:  # fmt: skip
    """One row as a scheduler request whose result lands in ``results[index]`` when it finishes."""
    prompt = runner.prompt(row.load_image(), row.question)
    kept: dict[str, Any] = {}

    def finish(request: Request, error: BaseException | None) -> None:
        if error is None:
            stats.take_request(request)
            results[index] = _row_result(runner, row, prompt, kept["feeds"], list(request.tokens),
                                         kept["logits"], stats, reference)  # fmt: skip
        kept.clear()
        if progress is not None:
            progress(1)

    request, stats = runner.request(prompt, max_new_tokens, on_finish=finish,
                                    on_prefill=lambda feeds, first: kept.update(feeds=feeds, logits=first.logits))  # fmt: skip
    return request


def _row_result(runner: Any, row: Any, prompt: Any, feeds: dict[str, np.ndarray], ids: list[int],
                first_logits: np.ndarray, stats: GenerationStats, reference: Any) -> SampleResult:  # fmt: skip
    manifest = runner.manifest
    spec = manifest.model_spec()
    text = runner.tokenizer.decode(ids, skip_special_tokens=True)
    sys_n, txt_n = prompt.image_start, prompt.num_tokens - prompt.image_end
    vis_n = prompt.image_end - prompt.image_start  # this image's (any-resolution models: by its size)
    result = SampleResult(
        line=row.line, question=row.question, answer=row.answer, prediction=text,
        correct=None if row.answer is None else exact_match(text, row.answer),
        dense_flops=prefill_flops(spec, GroupSizes.for_prompt(spec, sys_n, txt_n, visual=vis_n)),
        pruned_flops=prefill_graph_flops(runner, feeds),
        visual_tokens_per_layer=visual_tokens_per_layer(manifest, stats.kv_tokens_per_layer, sys_n, txt_n, vis_n),
        token_decision=_autoprune_decision(manifest, stats.autoprune),
    )  # fmt: skip
    if reference is not None:
        compare_answer(result, first_token_logprobs(first_logits), reference.answer(row))
    return result


class BuildReference:
    """Dense greedy answers from a dense build's graphs (``eval --reference DENSE_BUILD``); a context manager
    that holds its runner's sessions while it is entered."""

    def __init__(self, runner: Any, max_new_tokens: int, name: str) -> None:
        runner.check_new_tokens(max_new_tokens)
        self.runner = runner
        self.max_new_tokens = max_new_tokens
        self.name = name

    def __enter__(self) -> BuildReference:
        self.runner.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.runner.deactivate()

    def answer(self, row: Any, sample: Any = None) -> Any:
        out = self.runner.generate(row.load_image(), row.question, self.max_new_tokens, keep_logits=True)
        return ReferenceAnswer(out.text, first_token_logprobs(out.step_logits[0]))


def _autoprune_decision(manifest: Manifest, decided: dict[str, Any] | None) -> dict[str, Any] | None:
    """An AutoPrune build's per-prompt decision in the executor's report keys (table mode: what graphs do)."""
    if decided is None or manifest.autoprune is None:
        return None
    section = manifest.autoprune
    return {"method": "autoprune", "mode": "table", "tokens": section["tokens"], "n0": section["n0"],
            "i1": decided["i1"], "k": steepness(decided["i1"], section["k0"], section["gamma"]),
            "keep": decided["keep"], "merged": decided["merged"]}  # fmt: skip
