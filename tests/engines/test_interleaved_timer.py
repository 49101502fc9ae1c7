"""The one interleaved timer (engines.benchmark.time_interleaved): order, warm-up, results, clock, stats."""

from __future__ import annotations

import pytest

from engines.benchmark import time_interleaved
from prune_core.errors import BuildError


def test_three_callables_rotate_each_round_after_warmup_in_order() -> None:
    calls: list[str] = []
    fns = {name: (lambda n=name: calls.append(n) or n.upper()) for name in "abc"}
    timed = time_interleaved(fns, rounds=4, warmup=1)
    assert calls[:3] == ["a", "b", "c"]  # warm-up, unmeasured
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert timed.results == {"a": ["A"] * 4, "b": ["B"] * 4, "c": ["C"] * 4}
    assert all(len(v) == 4 for v in timed.seconds.values())


def test_the_clock_decides_the_seconds_and_the_stats() -> None:
    """A fake clock: each callable takes its own fixed time; medians and p90 follow (numpy's linear p90)."""
    durations = {"dense": [0.010, 0.020, 0.030, 0.040], "pruned": [0.004, 0.004, 0.005, 0.009]}
    seen = {name: iter(values) for name, values in durations.items()}

    def clock(fn):
        name = fn()
        return next(seen[name]), name

    timed = time_interleaved({"dense": lambda: "dense", "pruned": lambda: "pruned"}, rounds=4, clock=clock)
    dense, pruned = timed.stats("dense"), timed.stats("pruned")
    assert dense.median_ms == pytest.approx(25.0) and dense.p90_ms == pytest.approx(37.0)
    assert pruned.median_ms == pytest.approx(4.5) and pruned.min_ms == pytest.approx(4.0)
    assert pruned.p90_ms == pytest.approx(7.8)


def test_progress_counts_measured_rounds() -> None:
    seen: list[tuple[int, int]] = []
    time_interleaved({"a": lambda: None}, rounds=2, warmup=3, progress=lambda d, n: seen.append((d, n)))
    assert seen == [(1, 2), (2, 2)]


@pytest.mark.parametrize(("rounds", "warmup", "fns"), [(0, 0, {"a": int}), (1, -1, {"a": int}), (1, 0, {})])
def test_bad_arguments_are_refused(rounds: int, warmup: int, fns: dict) -> None:
    with pytest.raises(BuildError):
        time_interleaved(fns, rounds=rounds, warmup=warmup)
