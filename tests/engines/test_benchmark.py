"""Latency measurement: interleaving order, statistics, and the speedup report."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from engines.benchmark import LatencyStats, SpeedupReport, compare_latency
from prune_core.errors import BuildError


def recorder(calls: list[str], name: str) -> Callable[[], None]:
    """A callable that appends ``name`` to ``calls`` each time it runs."""

    def call() -> None:
        calls.append(name)

    return call


def test_measurement_alternates_which_side_runs_first() -> None:
    calls: list[str] = []
    base, cand = compare_latency(recorder(calls, "b"), recorder(calls, "c"), runs=4, warmup=2)
    warmup, measured = calls[:4], calls[4:]
    assert warmup == ["b", "c", "b", "c"]
    assert measured == ["b", "c", "c", "b", "b", "c", "c", "b"]
    assert base.runs == cand.runs == 4


def test_odd_run_count_and_no_warmup() -> None:
    calls: list[str] = []
    compare_latency(recorder(calls, "b"), recorder(calls, "c"), runs=3, warmup=0)
    assert calls == ["b", "c", "c", "b", "b", "c"]


def test_progress_is_reported_after_each_iteration() -> None:
    seen: list[tuple[int, int]] = []
    compare_latency(lambda: None, lambda: None, runs=3, warmup=1, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_stats_are_computed_from_perf_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each perf_counter() call advances a fake clock; the baseline takes 10 ms, the candidate 4 ms.
    clock = [0.0]
    monkeypatch.setattr("engines.benchmark.time.perf_counter", lambda: clock[0])

    def advance(seconds: float) -> Callable[[], None]:
        def call() -> None:
            clock[0] += seconds

        return call

    base, cand = compare_latency(advance(0.010), advance(0.004), runs=5, warmup=1)
    assert base.median_ms == pytest.approx(10.0)
    assert cand.median_ms == pytest.approx(4.0)
    assert base.runs == cand.runs == 5


@pytest.mark.parametrize(("runs", "warmup"), [(0, 3), (-1, 3), (5, -1)])
def test_bad_counts_raise(runs: int, warmup: int) -> None:
    with pytest.raises(BuildError, match="must be an integer"):
        compare_latency(lambda: None, lambda: None, runs=runs, warmup=warmup)


def test_latency_stats_on_known_values() -> None:
    # 1..10 ms: median 5.5, mean 5.5, p90 by linear interpolation 9.1.
    stats = LatencyStats.from_seconds([ms / 1000 for ms in (7, 1, 10, 3, 2, 9, 4, 8, 6, 5)])
    assert stats.median_ms == pytest.approx(5.5)
    assert stats.mean_ms == pytest.approx(5.5)
    assert stats.min_ms == pytest.approx(1.0)
    assert stats.p90_ms == pytest.approx(9.1)
    assert stats.runs == 10


def test_latency_stats_odd_count_and_single_value() -> None:
    stats = LatencyStats.from_seconds([0.003, 0.001, 0.002])
    assert stats.median_ms == pytest.approx(2.0)
    assert stats.p90_ms == pytest.approx(2.8)
    single = LatencyStats.from_seconds([0.004])
    assert single.median_ms == single.p90_ms == single.min_ms == pytest.approx(4.0)


def test_latency_stats_rejects_empty_and_negative() -> None:
    with pytest.raises(BuildError, match="no timings"):
        LatencyStats.from_seconds([])
    with pytest.raises(BuildError, match="non-negative"):
        LatencyStats.from_seconds([0.001, -0.001])


def make_report(**metadata: object) -> SpeedupReport:
    dense = LatencyStats(median_ms=20.0, mean_ms=21.0, min_ms=19.0, p90_ms=24.0, runs=20)
    pruned = LatencyStats(median_ms=12.5, mean_ms=13.0, min_ms=12.0, p90_ms=15.0, runs=20)
    return SpeedupReport(
        dense=dense,
        pruned=pruned,
        dense_flops=2_000_000_000,
        pruned_flops=1_000_000_000,
        provider="CPUExecutionProvider",
        metadata=metadata,
    )


def test_report_ratios() -> None:
    report = make_report()
    assert report.speedup == pytest.approx(1.6)
    assert report.flops_speedup == pytest.approx(2.0)
    assert report.efficiency == pytest.approx(0.8)


def test_report_to_dict_keys_and_metadata() -> None:
    record = make_report(prompt_tokens=651, threads=2).to_dict()
    assert {
        "dense_ms",
        "pruned_ms",
        "speedup",
        "flops_speedup",
        "efficiency",
        "provider",
        "runs",
        "dense_p90_ms",
        "pruned_p90_ms",
        "dense_flops",
        "pruned_flops",
    } <= set(record)
    assert record["dense_ms"] == 20.0 and record["pruned_ms"] == 12.5
    assert record["dense_p90_ms"] == 24.0 and record["pruned_p90_ms"] == 15.0
    assert record["runs"] == 20 and record["provider"] == "CPUExecutionProvider"
    assert record["prompt_tokens"] == 651 and record["threads"] == 2
    json.dumps(record)


def test_report_table_shows_the_figures() -> None:
    table = make_report(prompt_tokens=651).format_table()
    for text in (
        "20.000",
        "12.500",
        "24.000",
        "15.000",
        "1.600x",
        "FLOPs speedup 2.000x",
        "efficiency 0.800",
    ):
        assert text in table
    assert "CPUExecutionProvider" in table and "prompt_tokens: 651" in table
    assert len(table.splitlines()) >= 5


def test_report_rejects_bad_flops_and_clashing_metadata() -> None:
    with pytest.raises(BuildError, match="pruned_flops must be a positive integer"):
        SpeedupReport(
            dense=make_report().dense,
            pruned=make_report().pruned,
            dense_flops=10,
            pruned_flops=0,
            provider="cpu",
        )
    with pytest.raises(BuildError, match="clash"):
        make_report(speedup=3.0)
