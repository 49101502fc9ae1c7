"""The search workflow: the GSOP operation order on calibration data, journaled, written as a plan."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune_core import defaults, memory
from prune_core.plan import Plan
from prune_core.spec import GroupSizes

Log = Callable[[str], None]


@dataclass(frozen=True)
class SearchOutcome:
    """A finished search: the plan written, the search result, the metric's name and the evaluator's stats."""

    plan: Plan
    result: Any  # calib.search.SearchResult
    metric: str
    stats: Any  # calib.evaluator.EvaluatorStats or calib.distributed.RayStats
    workers: int = 1


def _layout(sizes: list[GroupSizes]) -> GroupSizes:
    """The plan's prompt layout: the rows' image groups and their mean text length."""
    return GroupSizes(sys=sizes[0].sys, img_key=sizes[0].img_key, img_rest=sizes[0].img_rest,
                      txt=max(1, round(sum(s.txt for s in sizes) / len(sizes))))


def search(model_dir: Path, calib_path: Path, out_path: Path, *, metric: str = defaults.SEARCH_METRIC,
           tolerance: float = defaults.SEARCH_TOLERANCE, steps: int = defaults.SEARCH_STEPS,
           key_danger_layers: int = defaults.KEY_DANGER_LAYERS, protect_layer0_kv: bool = True, limit: int | None = None,
           resume: bool = False, prefix_reuse: bool = True, seed: int = 0, device: str = defaults.TORCH_DEVICE,
           dtype: str = defaults.TORCH_DTYPE, workers: int = 1, ray_address: str | None = None, batch_size: int = 1,
           threads_per_worker: int = 1, log: Log = lambda message: None) -> SearchOutcome:
    """Search the GSOP order of MODEL_DIR's operations on ``calib_path`` and save the plan to ``out_path``.

    Every finished evaluation is journaled to ``OUT.journal.jsonl``; ``resume`` continues from the journal
    (whatever the worker count of the run that wrote it). Journal notices go to ``log``; progress bars are
    drawn on stderr. The model runs on ``device`` in ``dtype`` (``--device``, ``--dtype``); metrics are
    computed in fp32 on that device. ``batch_size`` calibration rows go through one forward.

    With ``workers > 1`` or a ``ray_address``, evaluations run on Ray workers (calib/distributed.py), each
    holding the model and a shard of the rows (``threads_per_worker`` CPU threads each on CPU, one GPU each
    on CUDA); the driver then never loads the model.
    """
    from calib.search import SearchSettings, journal_identity
    from prune_core.device import resolve_device

    settings = SearchSettings(tolerance=tolerance, steps=steps, key_danger_layers=key_danger_layers,
                              protect_layer0_kv=protect_layer0_kv, seed=seed)
    if batch_size < 1:
        from prune_core.errors import PruneExportError

        raise PruneExportError(f"--batch-size must be >= 1, got {batch_size}")
    journal_file = out_path.with_name(out_path.name + ".journal.jsonl")
    # a cluster's workers check the device on their own machines (the driver may have no GPU)
    device = device.strip().lower() if ray_address else resolve_device(device)
    if workers > 1 or ray_address:
        from calib.data import load_rows
        from calib.distributed import RayEvaluator, WorkerConfig, require_ray
        from calib.evaluator import metric_info
        from exporter.adapters import load_spec

        require_ray(local=ray_address is None)
        if ray_address is None and device.startswith("cuda"):
            import torch

            from prune_core.errors import PruneExportError

            gpus = torch.cuda.device_count()
            if workers > gpus:
                raise PruneExportError(
                    f"--workers {workers} with --device {device} needs {workers} GPUs (one per worker) and this "
                    f"machine has {gpus}; use --workers {gpus}, or join a cluster with --ray-address"
                )
        info = metric_info(metric)
        spec = load_spec(model_dir)  # checks the folder before any worker starts
        rows = len(load_rows(calib_path, require_answer=info.needs_labels, limit=limit))
        config = WorkerConfig(str(Path(model_dir).resolve()), str(Path(calib_path).resolve()), metric,
                              limit=limit, device=device, dtype=dtype, prefix_reuse=prefix_reuse,
                              batch_size=batch_size, threads=threads_per_worker)
        log(f"starting {workers} Ray worker(s) " + (f"on the cluster at {ray_address}" if ray_address
                                                      else "on a local Ray instance (127.0.0.1)"))
        with RayEvaluator(config, workers, rows, info, address=ray_address, log=log) as evaluator:
            identity = journal_identity(spec, info, settings, evaluator.fingerprint, dtype, batch_size)
            result = _run(evaluator, spec, _layout(evaluator.sizes), settings, journal_file, identity, resume, log)
            stats = evaluator.stats
        return _finish(result, out_path, metric, stats, workers)

    from tqdm import tqdm

    from calib.data import load_rows
    from calib.evaluator import CalibrationSet, ModelEvaluator
    from exporter.adapters import load_adapter
    from prune_core.device import torch_dtype

    memory.check_model_fits(model_dir, dtype, "search")
    adapter = load_adapter(model_dir, dtype=torch_dtype(dtype), device=device)
    n_rows = len(load_rows(calib_path, require_answer=metric != "kl", limit=limit))
    with tqdm(total=n_rows, desc="calibration", unit="sample", file=sys.stderr, disable=None) as bar:
        calib = CalibrationSet.load(adapter, calib_path, metric, limit=limit, progress=bar.update)
    layout = _layout([item.prompt.sizes for item in calib.items])
    evaluator = ModelEvaluator(adapter, calib, prefix_reuse=prefix_reuse, batch_size=batch_size)
    identity = journal_identity(adapter.spec, calib.metric, settings, calib.fingerprint, dtype, batch_size)
    result = _run(evaluator, adapter.spec, layout, settings, journal_file, identity, resume, log)
    return _finish(result, out_path, calib.metric.name, evaluator.stats, 1)


def _run(evaluator: Any, spec: Any, layout: GroupSizes, settings: Any, journal_file: Path,
         identity: dict[str, Any], resume: bool, log: Log) -> Any:
    from calib.journal import Journal
    from calib.search import TqdmProgress, run_search

    with Journal.open(journal_file, identity, resume=resume) as journal:
        for notice in journal.notices:
            log(f"journal: {notice}")
        if resume:
            log(f"resuming: {len(journal)} evaluation(s) already in {journal_file}")
        with TqdmProgress(file=sys.stderr, disable=None) as progress:
            return run_search(evaluator, spec, layout, settings, journal=journal, progress=progress)


def _finish(result: Any, out_path: Path, metric: str, stats: Any, workers: int) -> SearchOutcome:
    from calib.search import plan_from_search

    plan = plan_from_search(result)
    plan.save(out_path)
    return SearchOutcome(plan, result, metric, stats, workers)
