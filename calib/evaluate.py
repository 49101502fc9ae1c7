"""Exact-match evaluation of greedy answers under a plan, with dense and executed prefill FLOPs, and the
label-free fidelity of those answers to the dense model's (agreement, first-token KL)."""

from __future__ import annotations

import re
import string
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from exporter.adapters.base import VLMAdapter
from exporter.executor import PlanExecutor, TokenPolicy
from exporter.sample import prepare_sample
from prune_core.cost import prefill_flops
from prune_core.errors import DataError
from prune_core.ops import Operation
from prune_core.spec import DEFAULT_KEY_FRACTION

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
    agrees: bool | None = None  # prediction identical to the dense model's greedy answer (None: no reference)
    first_token_kl: float | None = None  # KL(dense || this) of the first answer token's distribution, nats


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
    #: fraction of rows whose answer is identical to the dense model's greedy answer (None: no reference)
    agreement: float | None = None
    #: mean over rows of KL(dense || this) of the first answer token's distribution, in nats
    mean_first_token_kl: float | None = None
    #: what the answers were compared with ("dense executor", a build directory, ...)
    reference: str | None = None
    results: list[SampleResult] = field(default_factory=list)

    @classmethod
    def from_results(cls, results: list[SampleResult], num_layers: int, seconds: float,
                     reference: str | None = None) -> EvalReport:
        """Accuracy (over rows that carry an answer), agreement, FLOPs totals and means of per-sample results."""
        graded = [r.correct for r in results if r.correct is not None]
        compared = [r for r in results if r.agrees is not None]
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
            agreement=(sum(r.agrees for r in compared) / len(compared)) if compared else None,
            mean_first_token_kl=(
                sum(r.first_token_kl for r in compared) / len(compared) if compared else None  # type: ignore[misc]
            ),
            reference=reference if compared else None,
            results=results,
        )

    def to_json(self, with_samples: bool = False) -> dict[str, object]:
        data = asdict(self)
        if not with_samples:
            data.pop("results")
        return data


# -- fidelity to the dense model ---------------------------------------------------------------------------
def first_token_logprobs(logits: Any) -> np.ndarray:
    """Log-probabilities of one row of logits (a torch tensor or a numpy array): log-softmax computed in
    float64, kept as float32 (the precision a sweep stores them in, so a stored reference compares exactly as
    the one computed in memory)."""
    x = np.asarray(logits.detach().float().cpu() if hasattr(logits, "detach") else logits, dtype=np.float64)
    x = x.reshape(-1)
    top = x.max()
    return (x - (top + np.log(np.exp(x - top).sum()))).astype(np.float32)


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> float:
    """KL(P || Q) in nats of two log-probability vectors (summed in float64): P the reference (dense), Q the
    pruned model."""
    if reference.shape != other.shape:
        raise DataError(f"cannot compare distributions over {other.size} and {reference.size} tokens: the "
                        "reference answers come from another model (vocabulary size differs)")
    p, q = reference.astype(np.float64), other.astype(np.float64)
    return float(max(0.0, np.sum(np.exp(p) * (p - q))))


@dataclass(frozen=True)
class ReferenceAnswer:
    """The dense model's greedy answer to one row and its first answer token's log-probabilities."""

    text: str
    first_logprobs: np.ndarray


class ReferenceAnswers(Protocol):
    """Where the dense answers that ``agreement`` compares with come from."""

    name: str
    max_new_tokens: int

    def answer(self, row: DataRow, sample: Any = None) -> ReferenceAnswer:
        """The dense answer to ``row`` (``sample``: the row already prepared for the executor, when there is one)."""
        ...


class ExecutorReference:
    """Dense greedy answers of the PyTorch executor on ``adapter`` (what ``eval`` compares with by default)."""

    def __init__(self, adapter: VLMAdapter, max_new_tokens: int, key_fraction: float = DEFAULT_KEY_FRACTION,
                 name: str = "dense executor") -> None:
        self.adapter = adapter
        self.max_new_tokens = max_new_tokens
        self.key_fraction = key_fraction
        self.name = name
        self._executor = PlanExecutor(adapter)

    def answer(self, row: DataRow, sample: Any = None) -> ReferenceAnswer:
        if sample is None:
            sample = prepare_sample(self.adapter, row.load_image(), row.question, self.key_fraction)
        gen = self._executor.generate(sample, (), None, max_new_tokens=self.max_new_tokens)
        return ReferenceAnswer(gen.text, first_token_logprobs(gen.step_logits[0]))


class StoredReference:
    """Dense answers computed earlier, by data-file line (a sweep keeps its dense run's answers)."""

    def __init__(self, answers: Mapping[int, ReferenceAnswer], max_new_tokens: int, name: str = "dense executor") -> None:
        self.answers = dict(answers)
        self.max_new_tokens = max_new_tokens
        self.name = name

    def answer(self, row: DataRow, sample: Any = None) -> ReferenceAnswer:
        try:
            return self.answers[row.line]
        except KeyError:
            raise DataError(f"line {row.line}: the stored dense answers have no answer for this row; they were "
                            "computed on other data") from None


def check_answer_length(reference: ReferenceAnswers | None, max_new_tokens: int) -> None:
    """Refuse dense answers generated with another token limit than this run's (they could not agree)."""
    if reference is not None and reference.max_new_tokens != max_new_tokens:
        raise DataError(f"the dense answers were generated with at most {reference.max_new_tokens} new tokens, "
                        f"this run with {max_new_tokens}; answers of different lengths cannot agree")


def compare_answer(result: SampleResult, first_logprobs: np.ndarray, reference: ReferenceAnswer) -> None:
    """Fill ``result``'s ``agrees`` and ``first_token_kl`` against the dense ``reference`` answer."""
    result.agrees = result.prediction == reference.text
    result.first_token_kl = kl_divergence(reference.first_logprobs, first_logprobs)


#: ``evaluate(reference=DENSE)``: compare with the same model's dense answers, computed on the way.
DENSE: Literal["dense"] = "dense"


def evaluate(
    adapter: VLMAdapter,
    rows: Iterable[DataRow],
    ops: Iterable[Operation] = (),
    policy: TokenPolicy | None = None,
    max_new_tokens: int = 16,
    key_fraction: float = DEFAULT_KEY_FRACTION,
    progress: Callable[[int], None] | None = None,
    reference: ReferenceAnswers | Literal["dense"] | None = DENSE,
    answers_out: dict[int, ReferenceAnswer] | None = None,
) -> EvalReport:
    """Greedy-answer every row under ``ops``/``policy``; accuracy is over rows that carry an answer.

    ``reference`` gives the dense answers that ``agreement`` and the first-token KL compare with: ``DENSE``
    runs the same adapter without pruning on each row (nothing extra when ``ops`` and ``policy`` prune
    nothing: the run is its own reference), None skips the comparison. ``answers_out`` receives this run's
    own answers by line, to serve as a later run's :class:`StoredReference`.
    """
    executor = PlanExecutor(adapter)
    ops = frozenset(ops)
    prunes = bool(ops) or policy is not None
    is_dense = reference == DENSE and not prunes  # the run is its own reference
    if reference == DENSE:
        reference = ExecutorReference(adapter, max_new_tokens, key_fraction) if prunes else None
    check_answer_length(reference, max_new_tokens)  # type: ignore[arg-type]
    results: list[SampleResult] = []
    start = time.perf_counter()
    for row in rows:
        sample = prepare_sample(adapter, row.load_image(), row.question, key_fraction)
        gen = executor.generate(sample, ops, policy, max_new_tokens=max_new_tokens)
        correct = None if row.answer is None else exact_match(gen.text, row.answer)
        result = SampleResult(
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
        own = ReferenceAnswer(gen.text, first_token_logprobs(gen.step_logits[0]))
        if is_dense:
            compare_answer(result, own.first_logprobs, own)
        elif reference is not None:
            compare_answer(result, own.first_logprobs, reference.answer(row, sample))  # type: ignore[union-attr]
        if answers_out is not None:
            answers_out[row.line] = own
        results.append(result)
        if progress is not None:
            progress(1)
    name = "this run (dense)" if is_dense else getattr(reference, "name", None)
    return EvalReport.from_results(results, len(adapter.layers), time.perf_counter() - start, name)


def _policy_report(policy: TokenPolicy | None) -> dict[str, Any] | None:
    """What a stateful token policy decided for one prompt (``report()``), or None."""
    report = getattr(policy, "report", None)
    return None if report is None else report()
