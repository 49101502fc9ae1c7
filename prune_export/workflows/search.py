"""The search workflow: the GSOP operation order on calibration data, journaled, written as a plan."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..plan import Plan
from ..spec import GroupSizes

Log = Callable[[str], None]


@dataclass(frozen=True)
class SearchOutcome:
    """A finished search: the plan written, the search result, the metric's name and the evaluator's stats."""

    plan: Plan
    result: Any  # calib.search.SearchResult
    metric: str
    stats: Any  # calib.evaluator.EvaluatorStats


def search(model_dir: Path, calib_path: Path, out_path: Path, *, metric: str = "accuracy", tolerance: float = 0.3,
           steps: int = 15, key_danger_layers: int = 6, protect_layer0_kv: bool = True, limit: int | None = None,
           resume: bool = False, prefix_reuse: bool = True, seed: int = 0, device: str = "cpu",
           dtype: str = "fp32", log: Log = lambda message: None) -> SearchOutcome:
    """Search the GSOP order of MODEL_DIR's operations on ``calib_path`` and save the plan to ``out_path``.

    Every finished evaluation is journaled to ``OUT.journal.jsonl``; ``resume`` continues from the journal.
    Journal notices go to ``log``; progress bars are drawn on stderr. The model runs on ``device`` in
    ``dtype`` (``--device``, ``--dtype``); metrics are computed in fp32 on that device.
    """
    from tqdm import tqdm

    from calib.data import load_rows
    from calib.evaluator import CalibrationSet, ModelEvaluator
    from calib.journal import Journal
    from calib.search import SearchSettings, TqdmProgress, journal_identity, plan_from_search, run_search
    from exporter.adapters import load_adapter

    from ..device import resolve_device, torch_dtype

    settings = SearchSettings(tolerance=tolerance, steps=steps, key_danger_layers=key_danger_layers,
                              protect_layer0_kv=protect_layer0_kv, seed=seed)
    journal_file = out_path.with_name(out_path.name + ".journal.jsonl")
    adapter = load_adapter(model_dir, dtype=torch_dtype(dtype), device=resolve_device(device))
    n_rows = len(load_rows(calib_path, require_answer=metric != "kl", limit=limit))
    with tqdm(total=n_rows, desc="calibration", unit="sample", file=sys.stderr, disable=None) as bar:
        calib = CalibrationSet.load(adapter, calib_path, metric, limit=limit, progress=bar.update)
    sizes = [item.prompt.sizes for item in calib.items]
    layout = GroupSizes(sys=sizes[0].sys, img_key=sizes[0].img_key, img_rest=sizes[0].img_rest,
                        txt=max(1, round(sum(s.txt for s in sizes) / len(sizes))))
    evaluator = ModelEvaluator(adapter, calib, prefix_reuse=prefix_reuse)
    identity = journal_identity(adapter.spec, calib.metric, settings, calib.fingerprint, dtype)
    with Journal.open(journal_file, identity, resume=resume) as journal:
        for notice in journal.notices:
            log(f"journal: {notice}")
        if resume:
            log(f"resuming: {len(journal)} evaluation(s) already in {journal_file}")
        with TqdmProgress(file=sys.stderr, disable=None) as progress:
            result = run_search(evaluator, adapter.spec, layout, settings, journal=journal, progress=progress)
    plan = plan_from_search(result)
    plan.save(out_path)
    return SearchOutcome(plan, result, calib.metric.name, evaluator.stats)
