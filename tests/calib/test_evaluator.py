"""The model evaluator: teacher forcing equals decoding, prefix reuse changes no value, label-free mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from calib.evaluator import CalibrationSet, ModelEvaluator
from exporter.executor import PlanExecutor
from prune_core.errors import DataError
from prune_core.ops import Group, Module, Operation

OPS = [
    frozenset(),
    frozenset({Operation(3, Group.IMG_REST, Module.KV)}),
    frozenset({Operation(3, Group.IMG_REST, Module.KV), Operation(1, Group.IMG_REST, Module.MLP)}),
    frozenset({Operation(3, Group.IMG_REST, Module.KV), Operation(2, Group.IMG_KEY, Module.Q)}),
    frozenset({Operation(0, Group.IMG_REST, Module.Q)}),
]


@pytest.mark.parametrize("metric", ["kl", "nll"])
def test_teacher_forced_answer_logits_equal_decode_steps(tiny_adapter, demo_data: Path, metric: str) -> None:
    calib = CalibrationSet.load(tiny_adapter, demo_data, metric, limit=2)
    executor = PlanExecutor(tiny_adapter)
    ops = OPS[3]
    for item in calib.items:
        forced = executor.prefill(item.forced, ops, with_cache=False, logits_rows=len(item.answer_ids)).row_logits
        pre = executor.prefill(item.prompt, ops)
        stepwise = [pre.logits]
        for step, token in enumerate(item.answer_ids[:-1]):
            stepwise.append(executor.decode_step(token, pre.cache, step))
        assert torch.allclose(forced, torch.stack(stepwise), atol=1e-5)


@pytest.mark.parametrize("metric", ["kl", "nll", "accuracy"])
def test_prefix_reuse_gives_identical_values(tiny_adapter, demo_data: Path, metric: str) -> None:
    calib = CalibrationSet.load(tiny_adapter, demo_data, metric, limit=3)
    plain = ModelEvaluator(tiny_adapter, calib, prefix_reuse=False)
    fast = ModelEvaluator(tiny_adapter, calib, prefix_reuse=True)
    expected = [plain.evaluate(ops) for ops in OPS]
    got = [fast.evaluate(ops) for ops in OPS]
    assert got == pytest.approx(expected, abs=1e-6)
    assert plain.stats.layer_fraction == 1.0
    assert fast.stats.layer_fraction < 0.8
    if metric == "kl":
        assert expected[0] == pytest.approx(0.0, abs=1e-6)  # the dense model against itself
        assert all(v >= -1e-6 for v in expected)


def test_label_free_rows_work_for_kl_only(tiny_adapter, demo_data: Path, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in demo_data.read_text().splitlines()]
    unlabeled = tmp_path / "unlabeled.jsonl"
    unlabeled.write_text("".join(
        json.dumps({"image": str((demo_data.parent / r["image"]).resolve()), "question": r["question"]}) + "\n"
        for r in rows
    ))
    calib = CalibrationSet.load(tiny_adapter, unlabeled, "kl", limit=2)
    assert len(calib) == 2 and calib.metric.higher_is_better is False
    with pytest.raises(DataError, match="missing field"):
        CalibrationSet.load(tiny_adapter, unlabeled, "accuracy")


def _varied_rows(demo_data: Path, tmp_path: Path) -> Path:
    """The demo rows with questions of different lengths (so a batch pads its rows differently)."""
    rows = [json.loads(line) for line in demo_data.read_text().splitlines() if line.strip()]
    extra = ["", " Answer briefly.", " Look at the left half of the picture, then answer in one word.", " Why?"]
    out = tmp_path / "varied.jsonl"
    with out.open("w") as fh:
        for i, row in enumerate(rows * 2):
            row = dict(row, image=str((demo_data.parent / row["image"]).resolve()),
                       question=row["question"] + extra[i % len(extra)])
            fh.write(json.dumps(row) + "\n")
    return out


@pytest.mark.parametrize("metric", ["kl", "nll", "accuracy"])
def test_batched_rows_equal_row_by_row(tiny_adapter, demo_data: Path, tmp_path: Path, metric: str) -> None:
    """--batch-size B: several rows per forward give each row's row-by-row value (1e-6), with and without
    prefix reuse, for every metric; batches of unequal text lengths included."""
    calib = CalibrationSet.load(tiny_adapter, _varied_rows(demo_data, tmp_path), metric)
    lengths = {item.prompt.num_tokens for item in calib.items}
    assert len(lengths) >= 3
    reference = ModelEvaluator(tiny_adapter, calib, prefix_reuse=False)
    expected = [reference.evaluate_rows(ops) for ops in OPS]
    assert any(v != 0.0 for row in expected[1:] for v in row) or metric == "accuracy"
    for batch_size, reuse in [(3, False), (3, True), (8, True)]:
        batched = ModelEvaluator(tiny_adapter, calib, prefix_reuse=reuse, batch_size=batch_size)
        for ops, want in zip(OPS + OPS[::-1], expected + expected[::-1], strict=True):
            got = batched.evaluate_rows(ops)
            assert got == pytest.approx(want, abs=1e-6, rel=0)


def test_batched_prefill_matches_each_prompt_alone(tiny_adapter, demo_data: Path, tmp_path: Path) -> None:
    """prefill_batch against PlanExecutor.prefill per prompt: logits, KV caches (the rows that gave K/V at
    each layer, post-RoPE), next positions and the greedy continuation."""
    from exporter.executor import prefill_batch

    calib = CalibrationSet.load(tiny_adapter, _varied_rows(demo_data, tmp_path), "accuracy", limit=5)
    executor = PlanExecutor(tiny_adapter)
    samples = [item.prompt for item in calib.items]
    for ops in OPS:
        batch = prefill_batch(executor, samples, ops, with_cache=True, logits_rows=[2] * len(samples))
        for b, sample in enumerate(samples):
            alone = executor.prefill(sample, ops, with_cache=True, logits_rows=2)
            row = batch.row_result(b)
            assert torch.allclose(row.row_logits, alone.row_logits, atol=1e-5)
            for got, want in zip(row.cache, alone.cache, strict=True):
                assert got.keys.shape == want.keys.shape and got.next_position == want.next_position
                assert torch.allclose(got.keys, want.keys, atol=1e-5) and torch.allclose(got.values, want.values, atol=1e-5)
            assert executor.continue_greedy(row, 6) == executor.continue_greedy(alone, 6)
