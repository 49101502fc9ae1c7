"""Exact-match evaluation of greedy answers under a plan, with dense and executed prefill FLOPs."""

from __future__ import annotations

import re
import string
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from exporter.adapters.base import VLMAdapter
from exporter.executor import PlanExecutor, TokenPolicy
from exporter.sample import prepare_sample
from prune_export.cost import prefill_flops
from prune_export.ops import Operation
from prune_export.spec import DEFAULT_KEY_FRACTION

from .data import DataRow

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Case- and punctuation-insensitive form of an answer (whitespace collapsed)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


@dataclass
class SampleResult:
    line: int
    question: str
    answer: str | None
    prediction: str
    correct: bool | None
    dense_flops: int
    pruned_flops: int
    visual_tokens_per_layer: list[int]
    token_decision: dict[str, Any] | None = None  # a stateful token policy's decision (AutoPrune: k, schedule)


@dataclass
class EvalReport:
    samples: int
    accuracy: float | None
    dense_flops: int
    pruned_flops: int
    flops_ratio: float
    mean_flops_ratio: float  # mean over samples of pruned/dense (flops_ratio is the ratio of the sums)
    mean_visual_tokens_per_layer: list[float]
    seconds: float
    results: list[SampleResult] = field(default_factory=list)

    def to_json(self, with_samples: bool = False) -> dict[str, object]:
        data = asdict(self)
        if not with_samples:
            data.pop("results")
        return data


def evaluate(
    adapter: VLMAdapter,
    rows: Iterable[DataRow],
    ops: Iterable[Operation] = (),
    policy: TokenPolicy | None = None,
    max_new_tokens: int = 16,
    key_fraction: float = DEFAULT_KEY_FRACTION,
    progress: Callable[[int], None] | None = None,
) -> EvalReport:
    """Greedy-answer every row under ``ops``/``policy``; accuracy is over rows that carry an answer."""
    executor = PlanExecutor(adapter)
    ops = frozenset(ops)
    results: list[SampleResult] = []
    start = time.perf_counter()
    for row in rows:
        sample = prepare_sample(adapter, row.load_image(), row.question, key_fraction)
        gen = executor.generate(sample, ops, policy, max_new_tokens=max_new_tokens)
        correct = None if row.answer is None else exact_match(gen.text, row.answer)
        results.append(
            SampleResult(
                line=row.line,
                question=row.question,
                answer=row.answer,
                prediction=gen.text,
                correct=correct,
                dense_flops=prefill_flops(adapter.spec, sample.sizes),
                pruned_flops=gen.prefill.flops,
                visual_tokens_per_layer=gen.prefill.visual_tokens_per_layer,
                token_decision=_policy_report(gen.prefill.policy),
            )
        )
        if progress is not None:
            progress(1)
    graded = [r.correct for r in results if r.correct is not None]
    dense = sum(r.dense_flops for r in results)
    pruned = sum(r.pruned_flops for r in results)
    layers = len(adapter.layers)
    mean_visual = [
        sum(r.visual_tokens_per_layer[i] for r in results) / max(1, len(results)) for i in range(layers)
    ]
    return EvalReport(
        samples=len(results),
        accuracy=(sum(graded) / len(graded)) if graded else None,
        dense_flops=dense,
        pruned_flops=pruned,
        flops_ratio=pruned / dense if dense else 1.0,
        mean_flops_ratio=(
            sum(r.pruned_flops / r.dense_flops for r in results) / len(results) if results else 1.0
        ),
        mean_visual_tokens_per_layer=mean_visual,
        seconds=time.perf_counter() - start,
        results=results,
    )


def _policy_report(policy: TokenPolicy | None) -> dict[str, Any] | None:
    """What a stateful token policy decided for one prompt (``report()``), or None."""
    report = getattr(policy, "report", None)
    return None if report is None else report()
