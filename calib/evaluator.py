"""The model side of the search: a calibration set prepared once, three metrics, and fast evaluation.

* **Calibration set**: rows of the ``eval`` JSONL format, images preprocessed and run through the vision
  tower once; label-free mode (no answers) works with the ``kl`` metric.
* **Metrics** (:data:`METRICS`): ``accuracy`` (exact match of greedy answers, the paper's; higher is
  better), ``nll`` (mean negative log-likelihood of the reference answers' tokens; lower is better) and
  ``kl`` (KL divergence of the answer-token distributions from the dense model's, on the dense model's own
  greedy answers: label-free; lower is better).
  ``nll`` and ``kl`` score answers teacher-forced in one pass (prompt + answer as text tokens). For GSOP
  operations this equals prefill-then-decode exactly: answer tokens are text, never pruned, and see the
  same keys and values a decode step would see in the pruned KV cache.
* **Prefix reuse**: an operation set that agrees with an earlier-evaluated one on every layer below ``l``
  has the same hidden states entering layer ``l``. The evaluator keeps the per-layer states (and, for
  ``accuracy``, the KV caches) of a few recent evaluations ("anchors", least recently used dropped) and
  starts each new evaluation from the anchor that shares the longest prefix. During a greedy ranking
  sweep every candidate ``policy + c`` resumes from the policy's states at ``c``'s layer.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from exporter.adapters.base import VLMAdapter
from exporter.executor import LayerCache, PlanExecutor, PrefillState, prefill_batch
from exporter.sample import Sample, build_sample, prepare_sample
from prune_core.errors import DataError, PruneExportError
from prune_core.ops import Operation
from prune_core.spec import DEFAULT_KEY_FRACTION

from .data import DataRow, data_fingerprint, load_rows
from .evaluate import exact_match


@dataclass(frozen=True)
class MetricInfo:
    """A calibration metric: its name, direction and whether it needs reference answers."""

    name: str
    higher_is_better: bool
    needs_labels: bool
    description: str


METRICS: dict[str, MetricInfo] = {
    "accuracy": MetricInfo("accuracy", True, True, "exact-match accuracy of greedy answers (higher is better)"),
    "nll": MetricInfo("nll", False, True, "mean negative log-likelihood of the answer tokens (lower is better)"),
    "kl": MetricInfo("kl", False, False, "KL(dense || pruned) of the answer-token distributions, label-free (lower is better)"),
}


def metric_info(name: str) -> MetricInfo:
    if name not in METRICS:
        raise PruneExportError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")
    return METRICS[name]


@dataclass
class CalibrationItem:
    """One calibration row, prepared: the prompt sample and, for teacher-forced metrics, the answer.

    ``index`` is the row's position among the file's rows (0-based, after ``limit``)."""

    row: DataRow
    prompt: Sample
    answer_ids: list[int]  # the reference answer (labels) or the dense greedy answer (kl)
    forced: Sample | None = None  # prompt + answer[:-1], for nll / kl
    dense_logprobs: torch.Tensor | None = None  # [len(answer), vocab], kl only
    index: int = 0


@dataclass
class CalibrationSet:
    items: list[CalibrationItem]
    fingerprint: str
    metric: MetricInfo

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def load(
        cls,
        adapter: VLMAdapter,
        path: str | Path,
        metric: str,
        limit: int | None = None,
        key_fraction: float = DEFAULT_KEY_FRACTION,
        max_new_tokens: int = 8,
        progress: Callable[[int], None] | None = None,
        indices: Sequence[int] | None = None,
    ) -> CalibrationSet:
        """Load rows, preprocess images and run the vision tower once per row.

        ``indices`` prepares only those rows (a worker's shard); the fingerprint is always that of every
        row, so all shards of one data file name the same data.
        """
        info = metric_info(metric)
        all_rows = load_rows(path, require_answer=info.needs_labels, limit=limit)
        if indices is None:
            indices = range(len(all_rows))
        bad = [i for i in indices if not 0 <= i < len(all_rows)]
        if bad:
            raise DataError(f"{path} has {len(all_rows)} rows; no row {bad[0]} to prepare")
        executor = PlanExecutor(adapter)
        tokenizer = adapter.processor.tokenizer  # type: ignore[attr-defined]
        eos = list(adapter.eos_token_ids)[:1]
        items: list[CalibrationItem] = []
        for index in indices:
            row = all_rows[index]
            prompt = prepare_sample(adapter, row.load_image(), row.question, key_fraction)
            if info.name == "kl":
                gen = executor.generate(prompt, max_new_tokens=max_new_tokens)
                stopped = len(gen.token_ids) < max_new_tokens
                answer = gen.token_ids + (eos if stopped else [])
            else:
                assert row.answer is not None
                answer = tokenizer(" " + row.answer.strip(), add_special_tokens=False).input_ids + eos
            if not answer:
                raise DataError(f"line {row.line}: the answer tokenizes to nothing")
            item = CalibrationItem(row, prompt, answer, index=index)
            if info.name in ("nll", "kl"):
                item.forced = _teacher_forced(adapter, prompt, answer, key_fraction)
            if info.name == "kl":
                assert item.forced is not None
                logits = executor.prefill(item.forced, with_cache=False, logits_rows=len(answer)).row_logits
                item.dense_logprobs = torch.log_softmax(logits.float(), dim=-1)  # metrics in fp32, on the device
            items.append(item)
            if progress is not None:
                progress(1)
        return cls(items, data_fingerprint(all_rows), info)


def _teacher_forced(adapter: VLMAdapter, prompt: Sample, answer: list[int], key_fraction: float) -> Sample:
    ids = torch.cat([prompt.input_ids, torch.tensor(answer[:-1], dtype=torch.long)])
    features = prompt.embeds[prompt.image_start : prompt.image_end]
    return build_sample(adapter, ids, prompt.image_start, prompt.image_end, features, prompt.cls_attention, key_fraction)


@dataclass
class _Anchor:
    """States entering each layer (and KV caches of each layer) of one evaluated op set, per evaluation
    unit (one row, or one batch of rows with ``batch_size > 1``)."""

    ops: frozenset[Operation]
    states: list[dict[int, Any]]  # PrefillState per row, or BatchState per batch
    caches: list[list[Any]] | None  # LayerCache per layer per row, or BatchLayerCache per layer per batch


@dataclass
class EvaluatorStats:
    evaluations: int = 0
    seconds: float = 0.0
    layers_run: int = 0
    layers_full: int = 0

    @property
    def layer_fraction(self) -> float:
        """Share of decoder layers actually computed (1.0 without any prefix reuse)."""
        return self.layers_run / self.layers_full if self.layers_full else 1.0


@dataclass
class ModelEvaluator:
    """Evaluates op sets on a calibration set with the executor (the search's :class:`Evaluator`).

    ``batch_size`` rows go through one forward (:func:`exporter.executor.prefill_batch`: packed tokens,
    attention padded and masked per row); the values equal row-by-row evaluation up to float summation
    order (within 1e-6). Batches are consecutive rows of the calibration set, so a set sharded on batch
    boundaries (the Ray workers') forms the very same batches.
    """

    adapter: VLMAdapter
    calib: CalibrationSet
    prefix_reuse: bool = True
    max_anchors: int = 3
    batch_size: int = 1
    stats: EvaluatorStats = field(default_factory=EvaluatorStats)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise PruneExportError(f"--batch-size must be >= 1, got {self.batch_size}")
        self.executor = PlanExecutor(self.adapter)
        self.metric = self.calib.metric
        self._anchors: OrderedDict[frozenset[Operation], _Anchor] = OrderedDict()
        self._layers = self.adapter.spec.num_layers
        items = self.calib.items
        self._units = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]

    def evaluate_many(self, op_sets: Sequence[frozenset[Operation]]) -> list[float]:
        return [self.evaluate(ops) for ops in op_sets]

    def evaluate(self, ops: frozenset[Operation]) -> float:
        values = self.evaluate_rows(ops)
        return float(sum(values) / len(values))

    def evaluate_rows(self, ops: frozenset[Operation]) -> list[float]:
        """The metric of every calibration row (in the set's order) with ``ops`` pruned; their mean is
        :meth:`evaluate`'s value."""
        start = time.perf_counter()
        ops = frozenset(ops)
        anchor, layer = self._best_anchor(ops)
        values: list[float] = []
        states: list[dict[int, Any]] = []
        caches: list[list[Any]] = []
        for u, unit in enumerate(self._units):
            if self.batch_size == 1:
                value, st, ca = self._evaluate_item(u, unit[0], ops, anchor, layer)
                values.append(value)
            else:
                vals, st, ca = self._evaluate_batch(u, unit, ops, anchor, layer)
                values.extend(vals)
            states.append(st)
            if ca is not None:
                caches.append(ca)
        if self.prefix_reuse and self.max_anchors > 0:
            self._anchors[ops] = _Anchor(ops, states, caches or None)
            while len(self._anchors) > self.max_anchors:
                self._anchors.popitem(last=False)
        self.stats.evaluations += 1
        self.stats.layers_run += (self._layers - layer) * len(self.calib)
        self.stats.layers_full += self._layers * len(self.calib)
        self.stats.seconds += time.perf_counter() - start
        return values

    # -- internals -------------------------------------------------------------------------------------
    def _best_anchor(self, ops: frozenset[Operation]) -> tuple[_Anchor | None, int]:
        best: _Anchor | None = None
        best_layer = 0
        for anchor in self._anchors.values():
            diff = anchor.ops ^ ops
            layer = min(op.layer for op in diff) if diff else self._layers
            layer = min(layer, self._layers - 1)  # always run at least the last layer (logits)
            if layer > best_layer:
                best, best_layer = anchor, layer
        if best is not None:
            self._anchors.move_to_end(best.ops)
        return best, best_layer

    def _resume(
        self, index: int, anchor: _Anchor | None, layer: int
    ) -> tuple[list[int], dict[int, Any], tuple[int, Any] | None, list[Any] | None]:
        """Where evaluation unit ``index`` starts: the layers whose entry states to keep, the states already
        known (the anchor's below ``layer``), and the anchor's state and KV caches to resume from."""
        keep = list(range(layer, self._layers)) if self.prefix_reuse else []
        out: dict[int, Any] = {}
        start = None
        start_cache = None
        if anchor is not None:
            start = (layer, anchor.states[index][layer])
            out.update({j: s for j, s in anchor.states[index].items() if j < layer})
            if anchor.caches is not None:
                start_cache = anchor.caches[index][:layer]
        return keep, out, start, start_cache

    def _evaluate_item(
        self, index: int, item: CalibrationItem, ops: frozenset[Operation], anchor: _Anchor | None, layer: int
    ) -> tuple[float, dict[int, PrefillState], list[LayerCache] | None]:
        keep, out, start, start_cache = self._resume(index, anchor, layer)
        if self.metric.name == "accuracy":
            result = self.executor.prefill(
                item.prompt, ops, with_cache=True, start=start, start_cache=start_cache,
                keep_states=keep, states_out=out,
            )
            assert result.cache is not None
            full_cache = [LayerCache(c.keys, c.values, c.next_position) for c in result.cache]
            ids = self.executor.continue_greedy(result, max_new_tokens=len(item.answer_ids) + 2)
            text = self.adapter.decode(ids)
            assert item.row.answer is not None
            return float(exact_match(text, item.row.answer)), out, full_cache
        assert item.forced is not None
        result = self.executor.prefill(
            item.forced, ops, with_cache=False, start=start, keep_states=keep, states_out=out,
            logits_rows=len(item.answer_ids),
        )
        assert result.row_logits is not None
        return self._score(item, result.row_logits), out, None

    def _score(self, item: CalibrationItem, row_logits: torch.Tensor) -> float:
        """``nll`` or ``kl`` of one row from its answer rows' logits."""
        logprobs = torch.log_softmax(row_logits.float(), dim=-1)
        if self.metric.name == "nll":
            target = torch.tensor(item.answer_ids, device=logprobs.device)
            value = -logprobs.gather(1, target.view(-1, 1)).mean()
        else:
            assert item.dense_logprobs is not None
            p = item.dense_logprobs
            value = (p.exp() * (p - logprobs)).sum(dim=-1).mean()
        return float(value)

    def _evaluate_batch(
        self, index: int, items: list[CalibrationItem], ops: frozenset[Operation], anchor: _Anchor | None, layer: int
    ) -> tuple[list[float], dict[int, Any], list[Any] | None]:
        """Rows of one batch in a single forward; the batched counterpart of :meth:`_evaluate_item`."""
        keep, out, start, start_cache = self._resume(index, anchor, layer)
        if self.metric.name == "accuracy":
            result = prefill_batch(
                self.executor, [item.prompt for item in items], ops, with_cache=True, start=start,
                start_cache=start_cache, keep_states=keep, states_out=out,
            )
            assert result.cache is not None
            values = []
            for b, item in enumerate(items):
                ids = self.executor.continue_greedy(result.row_result(b), max_new_tokens=len(item.answer_ids) + 2)
                assert item.row.answer is not None
                values.append(float(exact_match(self.adapter.decode(ids), item.row.answer)))
            return values, out, result.cache
        forced = []
        for item in items:
            assert item.forced is not None
            forced.append(item.forced)
        result = prefill_batch(
            self.executor, forced, ops, with_cache=False, start=start, keep_states=keep, states_out=out,
            logits_rows=[len(item.answer_ids) for item in items],
        )
        return [self._score(item, rows) for item, rows in zip(items, result.row_logits, strict=True)], out, None
