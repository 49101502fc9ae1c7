"""The eval workflow: greedy answers of the PyTorch executor on a data set, dense vs under a plan."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import atomic_write_text
from .selection import choose_plan, token_policy


@dataclass(frozen=True)
class Evaluation:
    """An eval run: the report of :func:`calib.evaluate.evaluate` and the token policy it ran (or None)."""

    report: Any
    policy: Any


def evaluate_model(model_dir: Path, data_path: Path, *, plan_path: Path | None = None, budget: float | None = None,
                   stages: Sequence[tuple[int, int]] | None = None, autoprune: Mapping[str, Any] | None = None,
                   autoprune_mode: str | None = None, max_new_tokens: int = 16, limit: int | None = None,
                   samples_out: Path | None = None, device: str = "cpu", dtype: str = "fp32") -> Evaluation:
    """Evaluate MODEL_DIR on the rows of ``data_path`` under the plan's operations at ``budget`` and the token
    section resolved from the plan, ``stages`` (--keep-schedule) and ``autoprune`` (--autoprune-* overrides).

    ``autoprune_mode`` (``exact`` or ``table``, None: exact) picks how AutoPrune computes its schedule.
    Per-sample results go to ``samples_out`` (JSONL) when given. A progress bar is drawn on stderr. The
    model runs on ``device`` in ``dtype``.
    """
    from tqdm import tqdm

    from calib.data import load_rows
    from calib.evaluate import evaluate
    from exporter.adapters import load_adapter

    from ..device import resolve_device, torch_dtype

    rows = load_rows(data_path, require_answer=True, limit=limit)
    also_given = ["--autoprune-mode"] if autoprune_mode is not None else []
    spec, choice = choose_plan(model_dir, plan_path, budget, stages, autoprune, also_given)
    policy = token_policy(choice.tokens, spec, autoprune_mode or "exact")
    adapter = load_adapter(model_dir, dtype=torch_dtype(dtype), device=resolve_device(device))
    with tqdm(total=len(rows), desc="eval", unit="sample", file=sys.stderr, disable=None) as bar:
        report = evaluate(adapter, rows, choice.ops, policy, max_new_tokens=max_new_tokens, progress=bar.update)
    if samples_out is not None:
        write_samples(samples_out, report)
    return Evaluation(report, policy)


def write_samples(path: Path, report: Any) -> None:
    """Per-sample rows of an eval report (``prediction`` included) as JSON lines, written atomically."""
    atomic_write_text(path, "".join(json.dumps(r.__dict__) + "\n" for r in report.results))
