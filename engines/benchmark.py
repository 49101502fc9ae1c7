"""Latency measurement: dense against pruned, interleaved, and the speedup report built from it.

The figure prune-export exists to report is *efficiency*: measured speedup divided by FLOPs speedup. On a
small machine, order effects (caches, clocks, a neighbour's threads) easily move one graph's time by more
than pruning does, so both graphs are measured in the same loop, alternating which goes first, and the
report keeps the medians next to the FLOPs ratio they are judged against.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

from prune_core.errors import BuildError

__all__ = ["InterleavedRuns", "LatencyStats", "SpeedupReport", "compare_latency", "time_interleaved", "wall_clock"]


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Summary of repeated timings of one callable, in milliseconds.

    Attributes:
        median_ms: the figure speedups are computed from (robust to the odd slow run).
        mean_ms: arithmetic mean.
        min_ms: fastest run, the best the machine managed.
        p90_ms: 90th percentile (linear interpolation between order statistics, numpy's default).
        runs: number of timings summarized.
    """

    median_ms: float
    mean_ms: float
    min_ms: float
    p90_ms: float
    runs: int

    @classmethod
    def from_seconds(cls, seconds: Sequence[float]) -> LatencyStats:
        """Summarize timings given in seconds (as ``time.perf_counter`` differences are)."""
        return cls.from_ms([float(value) * 1000.0 for value in seconds])

    @classmethod
    def from_ms(cls, millis: Sequence[float]) -> LatencyStats:
        """Summarize timings given in milliseconds (as the generation runtime's stats are)."""
        if len(millis) == 0:
            raise BuildError("no timings to summarize: measure at least one run")
        millis = [float(value) for value in millis]
        if any(not math.isfinite(value) or value < 0 for value in millis):
            raise BuildError(f"timings must be finite and non-negative, got {millis} ms")
        return cls(
            median_ms=statistics.median(millis),
            mean_ms=statistics.fmean(millis),
            min_ms=min(millis),
            p90_ms=float(np.percentile(millis, 90)),
            runs=len(millis),
        )


T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class InterleavedRuns(Generic[T]):
    """What :func:`time_interleaved` measured: for each name, the wall seconds and the return value of every
    measured call, in call order."""

    seconds: dict[str, list[float]]
    results: dict[str, list[T]]

    def stats(self, name: str) -> LatencyStats:
        """Median, mean, min and p90 of ``name``'s wall times."""
        return LatencyStats.from_seconds(self.seconds[name])


def wall_clock(fn: Callable[[], T]) -> tuple[float, T]:
    """Seconds one call of ``fn`` takes on ``time.perf_counter``, and what it returned."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def time_interleaved(
    fns: Mapping[str, Callable[[], T]],
    *,
    rounds: int,
    warmup: int = 0,
    progress: Callable[[int, int], None] | None = None,
    clock: Callable[[Callable[[], T]], tuple[float, T]] = wall_clock,
) -> InterleavedRuns[T]:
    """Time several callables in one interleaved loop: the one timer of ``bench``, ``bench --generate``,
    ``sweep --latency`` and the benchmark scripts.

    Each callable first runs ``warmup`` times (unmeasured: lazy allocation, kernel selection), in the given
    order. Then measured round ``i`` calls them in the given order rotated by ``i`` (two callables: A B, B A,
    A B, ...; three: A B C, B C A, C A B, ...), so whatever favours the first (or last) call of a round
    favours each callable equally. ``progress(done, rounds)`` is called after each measured round.
    ``clock(fn)`` times one call and returns (seconds, result): :func:`wall_clock` by default; a GPU
    benchmark passes one that reads CUDA events.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise BuildError(f"runs must be an integer >= 1, got {rounds!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise BuildError(f"warmup must be an integer >= 0, got {warmup!r}")
    if not fns:
        raise BuildError("nothing to time: pass at least one callable")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, list[T]] = {name: [] for name in names}
    for i in range(rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed, result = clock(fns[name])
            seconds[name].append(elapsed)
            results[name].append(result)
        if progress is not None:
            progress(i + 1, rounds)
    return InterleavedRuns(seconds, results)


def compare_latency(
    baseline: Callable[[], object],
    candidate: Callable[[], object],
    *,
    runs: int = 20,
    warmup: int = 3,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[LatencyStats, LatencyStats]:
    """Time ``baseline`` and ``candidate`` with :func:`time_interleaved`; returns their stats in that order."""
    timed = time_interleaved({"baseline": baseline, "candidate": candidate}, rounds=runs, warmup=warmup,
                             progress=progress)  # fmt: skip
    return timed.stats("baseline"), timed.stats("candidate")


#: Keys of :meth:`SpeedupReport.to_dict` that metadata may not overwrite.
_REPORT_KEYS = (
    "dense_ms",
    "pruned_ms",
    "dense_p90_ms",
    "pruned_p90_ms",
    "speedup",
    "dense_flops",
    "pruned_flops",
    "flops_speedup",
    "efficiency",
    "provider",
    "runs",
)


@dataclasses.dataclass(frozen=True)
class SpeedupReport:
    """Measured dense and pruned latencies next to their FLOPs, and the ratios judged from them.

    Attributes:
        dense: latency of the unpruned graph.
        pruned: latency of the pruned graph, measured in the same interleaved loop.
        dense_flops: matrix-multiply FLOPs of the dense graph at the measured inputs (computed, e.g. by a
            graph census, never typed in).
        pruned_flops: the same for the pruned graph.
        provider: the execution provider that really ran both graphs.
        metadata: anything else worth keeping with the figures (prompt tokens, threads, versions); merged
            into :meth:`to_dict`, so its keys must not clash with the report's own.
    """

    dense: LatencyStats
    pruned: LatencyStats
    dense_flops: int
    pruned_flops: int
    provider: str
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("dense_flops", "pruned_flops"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
                raise BuildError(f"{name} must be a positive integer, got {value!r}")
        if self.pruned.median_ms <= 0:
            raise BuildError(f"pruned median latency must be positive, got {self.pruned.median_ms} ms")
        clashes = sorted(set(self.metadata) & set(_REPORT_KEYS))
        if clashes:
            raise BuildError(f"metadata keys {clashes} clash with the report's own keys; rename them")
        object.__setattr__(self, "metadata", dict(self.metadata))

    @property
    def speedup(self) -> float:
        """Measured speedup: dense median over pruned median."""
        return self.dense.median_ms / self.pruned.median_ms

    @property
    def flops_speedup(self) -> float:
        """Speedup promised by the FLOPs: dense FLOPs over pruned FLOPs."""
        return self.dense_flops / self.pruned_flops

    @property
    def efficiency(self) -> float:
        """How much of the FLOPs speedup became real speedup (1.0: all of it)."""
        return self.speedup / self.flops_speedup

    def to_dict(self) -> dict[str, Any]:
        """Flat, JSON-ready record of the figures and the metadata."""
        record: dict[str, Any] = {
            "dense_ms": self.dense.median_ms,
            "pruned_ms": self.pruned.median_ms,
            "dense_p90_ms": self.dense.p90_ms,
            "pruned_p90_ms": self.pruned.p90_ms,
            "speedup": self.speedup,
            "dense_flops": int(self.dense_flops),
            "pruned_flops": int(self.pruned_flops),
            "flops_speedup": self.flops_speedup,
            "efficiency": self.efficiency,
            "provider": self.provider,
            "runs": self.dense.runs,
        }
        record.update(self.metadata)
        return record

    def format_table(self) -> str:
        """A few lines for a terminal: medians and p90 side by side, speedup against FLOPs speedup."""
        lines = [
            f"{'':<12}{'dense':>12}{'pruned':>12}",
            f"{'median ms':<12}{self.dense.median_ms:>12.3f}{self.pruned.median_ms:>12.3f}",
            f"{'p90 ms':<12}{self.dense.p90_ms:>12.3f}{self.pruned.p90_ms:>12.3f}",
            f"{'GFLOPs':<12}{self.dense_flops / 1e9:>12.4f}{self.pruned_flops / 1e9:>12.4f}",
            f"speedup {self.speedup:.3f}x  (FLOPs speedup {self.flops_speedup:.3f}x)  "
            f"efficiency {self.efficiency:.3f}",
            f"provider {self.provider}, {self.dense.runs} interleaved runs",
        ]
        lines.extend(f"{key}: {value}" for key, value in self.metadata.items())
        return "\n".join(lines)
