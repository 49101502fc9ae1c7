"""The GSOP search on a real local Ray instance (2 workers on loopback): the serial plan, resume across
worker counts, a worker killed with SIGKILL, and batched calibration equal to row-by-row evaluation."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from helpers.cli import assert_clean_error, run

from calib.evaluator import CalibrationSet, ModelEvaluator, metric_info
from calib.journal import Journal
from calib.search import SearchEvent, SearchResult, SearchSettings, journal_identity, run_search
from exporter.adapters import load_adapter
from prune_core.spec import GroupSizes

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the local instance stays on 127.0.0.1
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'prune-export[ray]')")

from calib.distributed import RayEvaluator, WorkerConfig, WorkersLostError, shard_rows  # noqa: E402

SETTINGS = SearchSettings(tolerance=0.004, steps=3, key_danger_layers=1)
METRIC = "kl"


class Interrupt(Exception):
    """Stands in for a kill: raised from the progress callback after some evaluations."""


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (2 CPUs on 127.0.0.1), shut down at the end."""
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def serial(tiny_model: Path, demo_data: Path) -> SearchResult:
    """The serial search: the reference every distributed run must reproduce."""
    adapter = load_adapter(tiny_model)
    calib = CalibrationSet.load(adapter, demo_data, METRIC)
    return run_search(ModelEvaluator(adapter, calib), adapter.spec, _layout(calib), SETTINGS)


def _layout(calib: CalibrationSet) -> GroupSizes:
    s = calib.items[0].prompt.sizes
    return GroupSizes(s.sys, s.img_key, s.img_rest, round(sum(i.prompt.sizes.txt for i in calib.items) / len(calib)))


def _pool(tiny_model: Path, demo_data: Path, workers: int = 2, batch_size: int = 1, log=None) -> RayEvaluator:
    config = WorkerConfig(str(tiny_model), str(demo_data), METRIC, batch_size=batch_size)
    rows = sum(1 for line in demo_data.read_text().splitlines() if line.strip())
    return RayEvaluator(config, workers, rows, metric_info(METRIC), log=log or (lambda m: None))


def _identity(spec, fingerprint: str) -> dict:
    return journal_identity(spec, metric_info(METRIC), SETTINGS, fingerprint)


def _assert_same_plan(result: SearchResult, serial: SearchResult) -> None:
    assert result.steps == serial.steps
    assert result.baseline == pytest.approx(serial.baseline, abs=1e-9)
    assert len(result.step_metrics) == len(serial.step_metrics)
    for a, b in zip(result.step_metrics, serial.step_metrics, strict=True):
        assert abs(a - b) <= 1e-9
    assert result.distinct_evaluations == serial.distinct_evaluations


def test_shards_are_contiguous_even_and_cut_on_batches() -> None:
    assert shard_rows(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert shard_rows(7, 3) == [[0, 1], [2, 3], [4, 5, 6]]
    assert shard_rows(10, 2, batch_size=4) == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9]]  # 3 batches: 1 + 2
    assert shard_rows(3, 8) == [[0], [1], [2]]  # no more shards than batches
    for rows, workers, b in [(500, 8, 1), (500, 8, 16), (13, 4, 3)]:
        shards = shard_rows(rows, workers, b)
        assert [r for s in shards for r in s] == list(range(rows))
        assert all(s[0] % b == 0 for s in shards)


def test_two_workers_give_the_serial_plan(local_ray, tiny_model: Path, demo_data: Path, serial: SearchResult,
                                          tmp_path: Path) -> None:
    events: list[SearchEvent] = []
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}  # loopback only
    with _pool(tiny_model, demo_data) as pool:
        assert pool.workers_total == 2 and len(set(pool.worker_pids())) == 2
        assert os.getpid() not in pool.worker_pids()
        with Journal.open(tmp_path / "j.jsonl", _identity(serial.spec, pool.fingerprint)) as journal:
            result = run_search(pool, serial.spec, serial.layout, SETTINGS, journal=journal, progress=events.append)
        order = [json.loads(line)["ops"] for line in (tmp_path / "j.jsonl").read_text().splitlines()[1:]]
    _assert_same_plan(result, serial)
    assert result.layout == serial.layout
    assert len(order) == serial.distinct_evaluations  # the driver's journal holds every evaluation once
    assert events and all(e.workers == (2, 2) for e in events)


def test_resume_with_another_worker_count(local_ray, tiny_model: Path, demo_data: Path, serial: SearchResult,
                                          tmp_path: Path) -> None:
    adapter = load_adapter(tiny_model)
    calib = CalibrationSet.load(adapter, demo_data, METRIC)
    identity = _identity(adapter.spec, calib.fingerprint)
    stop_after = serial.distinct_evaluations // 2

    def interrupt(event: SearchEvent) -> None:
        if event.evaluations >= stop_after:
            raise Interrupt

    # serial (no Ray) interrupted half way, resumed on 2 workers
    path = tmp_path / "a.jsonl"
    with Journal.open(path, identity) as journal, pytest.raises(Interrupt):
        run_search(ModelEvaluator(adapter, calib), adapter.spec, serial.layout, SETTINGS, journal=journal,
                   progress=interrupt)
    with _pool(tiny_model, demo_data) as pool, Journal.open(path, identity, resume=True) as journal:
        done = len(journal)
        assert 0 < done < serial.distinct_evaluations
        result = run_search(pool, adapter.spec, serial.layout, SETTINGS, journal=journal)
    _assert_same_plan(result, serial)
    assert result.evaluations_from_journal == done
    assert result.evaluations_run == serial.distinct_evaluations - done  # nothing finished ran again

    # 2 workers interrupted half way, resumed serially
    path = tmp_path / "b.jsonl"
    with _pool(tiny_model, demo_data) as pool, Journal.open(path, identity) as journal, pytest.raises(Interrupt):
        run_search(pool, adapter.spec, serial.layout, SETTINGS, journal=journal, progress=interrupt)
    with Journal.open(path, identity, resume=True) as journal:
        done = len(journal)
        result = run_search(ModelEvaluator(adapter, calib), adapter.spec, serial.layout, SETTINGS, journal=journal)
    _assert_same_plan(result, serial)
    assert result.evaluations_run == serial.distinct_evaluations - done


def test_a_killed_worker_has_its_rows_redone_elsewhere(local_ray, tiny_model: Path, demo_data: Path,
                                                       serial: SearchResult, tmp_path: Path) -> None:
    messages: list[str] = []
    events: list[SearchEvent] = []
    with _pool(tiny_model, demo_data, log=messages.append) as pool:
        victim = pool.worker_pids()[1]

        def kill_once(event: SearchEvent) -> None:
            events.append(event)
            if event.evaluations >= 5 and victim in pool.worker_pids():
                os.kill(victim, signal.SIGKILL)

        with Journal.open(tmp_path / "j.jsonl", _identity(serial.spec, pool.fingerprint)) as journal:
            result = run_search(pool, serial.spec, serial.layout, SETTINGS, journal=journal, progress=kill_once)
        assert pool.workers_alive == 1 and victim not in pool.worker_pids()
        assert any("died" in m for m in messages) and any("moved to Ray worker 0" in m for m in messages)
        assert events[-1].workers == (1, 2)
        # the last worker gone: one clear error, not a hang
        os.kill(pool.worker_pids()[0], signal.SIGKILL)
        with pytest.raises(WorkersLostError, match="--resume"):
            pool.evaluate(frozenset())
    _assert_same_plan(result, serial)
    assert result.evaluations_run == serial.distinct_evaluations  # each evaluation recorded once
    assert len((tmp_path / "j.jsonl").read_text().splitlines()) == 1 + serial.distinct_evaluations


def test_batched_workers_equal_the_serial_batched_plan(local_ray, tiny_model: Path, demo_data: Path,
                                                       serial: SearchResult) -> None:
    adapter = load_adapter(tiny_model)
    calib = CalibrationSet.load(adapter, demo_data, METRIC)
    batched = run_search(ModelEvaluator(adapter, calib, batch_size=2), adapter.spec, serial.layout, SETTINGS)
    with _pool(tiny_model, demo_data, batch_size=2) as pool:
        assert pool.shards == [[0, 1], [2, 3]]
        result = run_search(pool, adapter.spec, serial.layout, SETTINGS)
    _assert_same_plan(result, batched)


def test_cli_search_with_workers(local_ray, tiny_model: Path, demo_data: Path, tmp_path: Path) -> None:
    args = ["--calib", demo_data, "--metric", "kl", "--tolerance", "0.004", "--steps", "3", "--key-danger-layers", "1"]
    code, out = run("search", tiny_model, "--out", tmp_path / "serial.json", *args)
    assert code == 0, out
    code, out = run("search", tiny_model, "--out", tmp_path / "ray.json", *args, "--workers", "2")
    assert code == 0, out
    assert "2 Ray workers" in out
    serial, ray_plan = (json.loads((tmp_path / n).read_text()) for n in ("serial.json", "ray.json"))
    assert ray_plan["steps"] == serial["steps"] and ray_plan["search"] == serial["search"]


def test_workers_without_ray_is_one_line(tiny_model: Path, demo_data: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code, out = run("search", tiny_model, "--calib", demo_data, "--out", tmp_path / "p.json", "--metric", "kl",
                    "--workers", "2")
    assert_clean_error(code, out, 'pip install "prune-export[ray]"')
    assert not (tmp_path / "p.json.journal.jsonl").exists()
