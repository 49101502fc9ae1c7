"""The model evaluator: teacher forcing equals decoding, prefix reuse changes no value, label-free mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from calib.evaluator import CalibrationSet, ModelEvaluator
from exporter.executor import PlanExecutor
from prune_export.errors import DataError
from prune_export.ops import Group, Module, Operation

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
