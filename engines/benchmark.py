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
from typing import Any

import numpy as np

from prune_core.errors import BuildError

__all__ = ["LatencyStats", "SpeedupReport", "compare_latency"]


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
        if len(seconds) == 0:
            raise BuildError("no timings to summarize: measure at least one run")
        millis = [float(value) * 1000.0 for value in seconds]
        if any(not math.isfinite(value) or value < 0 for value in millis):
            raise BuildError(f"timings must be finite and non-negative seconds, got {list(seconds)}")
        return cls(
            median_ms=statistics.median(millis),
            mean_ms=statistics.fmean(millis),
            min_ms=min(millis),
            p90_ms=float(np.percentile(millis, 90)),
            runs=len(millis),
        )


def compare_latency(
    baseline: Callable[[], object],
    candidate: Callable[[], object],
    *,
    runs: int = 20,
    warmup: int = 3,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[LatencyStats, LatencyStats]:
    """Time ``baseline`` and ``candidate`` in one interleaved loop; returns their stats in that order.

    Both are first called ``warmup`` times (unmeasured: lazy allocation, kernel selection). Then, in
    iteration ``i``, the baseline runs before the candidate when ``i`` is even and after it when ``i`` is
    odd, so whatever favours the first (or second) call of a pair favours each side equally.
    ``progress(done, runs)`` is called after each measured iteration.
    """
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise BuildError(f"runs must be an integer >= 1, got {runs!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise BuildError(f"warmup must be an integer >= 0, got {warmup!r}")
    for _ in range(warmup):
        baseline()
        candidate()
    baseline_seconds: list[float] = []
    candidate_seconds: list[float] = []

    def timed(func: Callable[[], object], into: list[float]) -> None:
        start = time.perf_counter()
        func()
        into.append(time.perf_counter() - start)

    for i in range(runs):
        if i % 2 == 0:
            timed(baseline, baseline_seconds)
            timed(candidate, candidate_seconds)
        else:
            timed(candidate, candidate_seconds)
            timed(baseline, baseline_seconds)
        if progress is not None:
            progress(i + 1, runs)
    return LatencyStats.from_seconds(baseline_seconds), LatencyStats.from_seconds(candidate_seconds)


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
