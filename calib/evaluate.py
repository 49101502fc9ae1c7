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

#: Removed outright: apostrophes ("don't" == "dont"; the VQA evaluation maps contractions instead), and as
#: there a comma inside a number ("1,000" == "1000") and a period not followed by a digit ("U.S.A." == "usa";
#: "3.5" stays).
_REMOVED = re.compile(r"['\u2018\u2019`]|(?<=\d),(?=\d)|\.(?!\d)")
#: Every other ASCII punctuation mark separates words ("red-white" == "red white").
_SPACED = re.compile("[" + re.escape(string.punctuation.replace(".", "").replace("'", "").replace("`", "")) + "]")
_ARTICLES = frozenset({"a", "an", "the"})
#: Number words as digits, as the VQA evaluation maps them ("none" counts as 0 there too).
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip


def normalize_answer(text: str) -> str:
    """The form exact match compares, after the VQA evaluation: lower case; apostrophes, commas inside numbers
    and periods not followed by a digit removed; other punctuation turned into spaces; the articles
    a/an/the dropped (unless the answer is nothing but articles: "A" stays "a"); number words none/zero..ten
    as digits; whitespace collapsed."""
    words = _SPACED.sub(" ", _REMOVED.sub("", text.lower())).split()
    content = [w for w in words if w not in _ARTICLES]
    return " ".join(_NUMBER_WORDS.get(w, w) for w in (content or words))


def exact_match(prediction: str, answer: str) -> bool:
    """Whether ``prediction`` equals ``answer`` after :func:`normalize_answer` of both."""
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

    @classmethod
    def from_results(cls, results: list[SampleResult], num_layers: int, seconds: float) -> EvalReport:
        """Accuracy (over rows that carry an answer), FLOPs totals and means of per-sample results."""
        graded = [r.correct for r in results if r.correct is not None]
        dense = sum(r.dense_flops for r in results)
        pruned = sum(r.pruned_flops for r in results)
        return cls(
            samples=len(results),
            accuracy=(sum(graded) / len(graded)) if graded else None,
            dense_flops=dense,
            pruned_flops=pruned,
            flops_ratio=pruned / dense if dense else 1.0,
            mean_flops_ratio=(
                sum(r.pruned_flops / r.dense_flops for r in results) / len(results) if results else 1.0
            ),
            mean_visual_tokens_per_layer=[
                sum(r.visual_tokens_per_layer[i] for r in results) / max(1, len(results)) for i in range(num_layers)
            ],
            seconds=seconds,
            results=results,
        )

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
    return EvalReport.from_results(results, len(adapter.layers), time.perf_counter() - start)


def _policy_report(policy: TokenPolicy | None) -> dict[str, Any] | None:
    """What a stateful token policy decided for one prompt (``report()``), or None."""
    report = getattr(policy, "report", None)
    return None if report is None else report()
