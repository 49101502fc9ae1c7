"""`prune-export search` end to end: plan written, resume after a kill redoes nothing and gives the same plan."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from prune_core.plan import Plan
from prune_export.cli import main


def _search(model: Path, data: Path, out: Path, *extra: str):
    args = ["search", str(model), "--calib", str(data), "--out", str(out), "--metric", "kl",
            "--tolerance", "0.5", "--steps", "4", "--limit", "3", *extra]
    return CliRunner().invoke(main, args)


def test_search_then_resume_after_kill_gives_identical_plan(tiny_model: Path, demo_data: Path, tmp_path: Path) -> None:
    first = tmp_path / "a" / "plan.json"
    result = _search(tiny_model, demo_data, first)
    assert result.exit_code == 0, result.output
    plan = Plan.load(first)
    assert plan.steps and plan.doc.search["metric"] == "kl"
    journal = first.with_name("plan.json.journal.jsonl")
    lines = journal.read_text().splitlines(keepends=True)
    assert len(lines) > 4

    # A kill -9 mid-search: the journal holds a prefix of the evaluations and a torn last line.
    second = tmp_path / "b" / "plan.json"
    second.parent.mkdir()
    kept = 1 + (len(lines) - 1) // 2
    torn = lines[kept][: len(lines[kept]) // 2]
    second.with_name("plan.json.journal.jsonl").write_text("".join(lines[:kept]) + torn)
    result = _search(tiny_model, demo_data, second, "--resume")
    assert result.exit_code == 0, result.output
    assert f"{kept - 1} from the journal" in result.output
    assert json.loads(second.read_text()) == json.loads(first.read_text())


def test_existing_journal_without_resume_and_foreign_journal_are_refused(
    tiny_model: Path, demo_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "plan.json"
    assert _search(tiny_model, demo_data, out).exit_code == 0
    again = _search(tiny_model, demo_data, out)
    assert again.exit_code != 0 and "--resume" in again.output and "Traceback" not in again.output
    other = _search(tiny_model, demo_data, out, "--resume", "--key-danger-layers", "2")
    assert other.exit_code != 0 and "key_danger_layers" in other.output


def test_batched_search_gives_the_row_by_row_plan_and_its_journal_names_the_batch(
    tiny_model: Path, demo_data: Path, tmp_path: Path
) -> None:
    rows = tmp_path / "a" / "plan.json"
    assert _search(tiny_model, demo_data, rows).exit_code == 0
    batched = tmp_path / "b" / "plan.json"
    result = _search(tiny_model, demo_data, batched, "--batch-size", "2")
    assert result.exit_code == 0, result.output
    a, b = Plan.load(rows), Plan.load(batched)
    assert a.steps == b.steps
    assert all(abs(x - y) <= 1e-6 for x, y in zip(a.doc.search["step_metrics"], b.doc.search["step_metrics"], strict=True))
    # batched values are not bit-identical to row-by-row ones: a journal is resumed with its own batch size only
    again = _search(tiny_model, demo_data, rows, "--resume", "--batch-size", "2")
    assert again.exit_code != 0 and "calibration_batch_size" in again.output and "Traceback" not in again.output
