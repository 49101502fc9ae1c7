"""Stub evaluators for the calib tests (no real model: every metric is a formula).

The stub metric is additive over the pruned operations: ``accuracy = 1 - sum(weight(op))`` (or, for a
lower-is-better metric, ``kl = sum(weight(op))``), optionally with a pairwise interaction term, so tests
know the right answer of the free-block binary search and of the greedy order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prune_core.ops import Group, Module, Operation

Weights = Callable[[Operation], float]


class Killed(Exception):
    """Stands in for kill -9: raised by a stub evaluator after a set number of calls."""


@dataclass(frozen=True)
class StubMetric:
    name: str
    higher_is_better: bool


class StubEvaluator:
    """``value(ops)`` from per-op weights; records every call; can "die" after ``fail_after`` calls."""

    def __init__(self, weights: Weights, higher_is_better: bool = True, fail_after: int | None = None,
                 interaction: float = 0.0) -> None:
        self.weights = weights
        self.metric = StubMetric("accuracy" if higher_is_better else "kl", higher_is_better)
        self.fail_after = fail_after
        self.interaction = interaction
        self.calls: list[frozenset[Operation]] = []

    def value(self, ops: frozenset[Operation]) -> float:
        loss = sum(self.weights(op) for op in sorted(ops))
        if self.interaction:
            # pruning kv and q of the same group at the same layer hurts more than the sum of both
            loss += self.interaction * sum(
                1 for op in ops if op.module is Module.KV and Operation(op.layer, op.group, Module.Q) in ops
            )
        return 1.0 - loss if self.metric.higher_is_better else loss

    def evaluate(self, ops: frozenset[Operation]) -> float:
        assert isinstance(ops, frozenset)
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise Killed(f"killed after {len(self.calls)} evaluations")
        self.calls.append(ops)
        return self.value(ops)


class BatchStubEvaluator(StubEvaluator):
    """The same metric with ``evaluate_many``; records the chunk sizes it was handed."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.chunks: list[int] = []

    def evaluate_many(self, op_sets: list[frozenset[Operation]]) -> list[float]:
        self.chunks.append(len(op_sets))
        return [self.evaluate(ops) for ops in op_sets]


def free_from(rest: dict[Module, int], key: dict[Module, int], cost: float = 0.01) -> Weights:
    """Weights where ``rest[m]``/``key[m]`` is the first layer from which module m of that group is free."""

    def weight(op: Operation) -> float:
        table = rest if op.group is Group.IMG_REST else key
        return 0.0 if op.layer >= table[op.module] else cost

    return weight
