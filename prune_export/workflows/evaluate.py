"""The eval workflow: greedy answers of the PyTorch executor on a data set, dense vs under a plan, and the
dense answers that ``agreement`` compares with (:func:`load_reference`, :func:`build_reference`)."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune_core import defaults, memory
from prune_core.errors import DataError, PruneExportError
from prune_core.io import atomic_write_text

from .selection import NO_PRUNING, PlanRequest, choose_plan, token_policy


@dataclass(frozen=True)
class Evaluation:
    """An eval run: the report of :func:`calib.evaluate.evaluate` and the token policy it ran (or None)."""

    report: Any
    policy: Any


def evaluate_model(model_dir: Path, data_path: Path, request: PlanRequest = NO_PRUNING, *,
                   max_new_tokens: int = defaults.EVAL_NEW_TOKENS, limit: int | None = None,
                   samples_out: Path | None = None, device: str = defaults.TORCH_DEVICE,
                   dtype: str = defaults.TORCH_DTYPE, reference_path: Path | None = None,
                   compare: bool = True) -> Evaluation:  # fmt: skip
    """Evaluate MODEL_DIR on the rows of ``data_path`` under what ``request`` prunes: the plan's operations at
    its budget and the token section resolved from the plan, ``--keep-schedule`` and the ``--autoprune-*``
    overrides (:func:`.selection.choose_plan`).

    The request's ``autoprune_mode`` (``exact`` or ``table``, None: exact) picks how AutoPrune computes its
    schedule. Per-sample results go to ``samples_out`` (JSONL) when given. A progress bar is drawn on stderr.
    The model runs on ``device`` in ``dtype``. Answers are compared with the same model's dense answers
    (``agreement``, first-token KL), or with ``reference_path``'s (:func:`load_reference`); ``compare=False``
    skips the comparison.
    """
    from tqdm import tqdm

    from calib.data import load_rows
    from calib.evaluate import DENSE, evaluate
    from exporter.adapters import load_adapter
    from prune_core.device import resolve_device, torch_dtype

    _check_reference_options(reference_path, compare)
    spec, choice = choose_plan(model_dir, request)
    rows = load_rows(data_path, require_answer=True, limit=limit)
    memory.check_model_fits(model_dir, dtype, "eval")
    policy = token_policy(choice.tokens, spec, request.autoprune_mode or "exact")
    adapter = load_adapter(model_dir, dtype=torch_dtype(dtype), device=resolve_device(device))
    reference: Any = DENSE if compare else None
    if compare and reference_path is not None:
        reference = load_reference(reference_path, spec.fingerprint(), max_new_tokens, device)
    holds_runner = reference if hasattr(reference, "__enter__") else contextlib.nullcontext()
    with holds_runner, tqdm(total=len(rows), desc="eval", unit="sample", file=sys.stderr, disable=None) as bar:
        report = evaluate(adapter, rows, choice.ops, policy, max_new_tokens=max_new_tokens, progress=bar.update,
                          reference=reference)
    if samples_out is not None:
        write_samples(samples_out, report)
    return Evaluation(report, policy)


@dataclass(frozen=True)
class BuildEvaluation:
    """An eval of a build directory: the report, what ran it, and why agreement is missing when it is."""

    report: Any
    engine: str
    provider: str
    reference_missing: str | None


def evaluate_build(build_dir: Path, data_path: Path, request: PlanRequest = NO_PRUNING, *,
                   dtype: str | None = None, max_new_tokens: int = defaults.EVAL_NEW_TOKENS, limit: int | None = None,
                   samples_out: Path | None = None, device: str | None = None, reference_path: Path | None = None,
                   compare: bool = True, batch_size: int = 1) -> BuildEvaluation:  # fmt: skip
    """The report of :func:`evaluate_model` for a build directory's graphs on ONNX Runtime (``device``: the
    provider, cpu or cuda; None: auto). The plan and precision are baked into the graphs: a ``request`` or
    ``dtype`` that would change them is refused in one line. Agreement compares with the model folder in the
    manifest, or ``reference_path`` (:func:`build_reference`). ``batch_size`` > 1 decodes that many answers
    together (:mod:`engines.batching`).
    """
    from tqdm import tqdm

    from prune_core.device import provider_for

    from .generate import eval_build

    given = request.flags_given() + (["--dtype"] if dtype is not None else [])
    if given:
        raise PruneExportError(
            f"{build_dir} is a build directory: its plan and precision are baked into the graphs, so "
            f"{', '.join(given)} cannot change it; evaluate the model folder with those options, or build another directory"
        )
    _check_reference_options(reference_path, compare)
    reference, missing = build_reference(build_dir, reference_path, max_new_tokens, device) if compare else (None, None)
    with tqdm(desc="eval", unit="sample", file=sys.stderr, disable=None) as bar:
        run = eval_build(build_dir, data_path, max_new_tokens=max_new_tokens, limit=limit, progress=bar.update,
                         provider=provider_for(device), reference=reference, batch_size=batch_size)  # fmt: skip
    if samples_out is not None:
        write_samples(samples_out, run["report"])
    return BuildEvaluation(run["report"], run["engine"], run["provider"], missing)


def _check_reference_options(reference_path: Path | None, compare: bool) -> None:
    if not compare and reference_path is not None:
        raise PruneExportError("--reference and --no-reference contradict each other; pass one of them")


def write_samples(path: Path, report: Any) -> None:
    """Per-sample rows of an eval report (``prediction`` included) as JSON lines, written atomically."""
    atomic_write_text(path, "".join(json.dumps(r.__dict__) + "\n" for r in report.results))


def load_reference(path: Path, fingerprint: str, max_new_tokens: int, device: str | None = None) -> Any:
    """The dense answers ``agreement`` compares with, from ``path``: a model folder (its PyTorch executor
    without pruning, fp32, on ``device``) or a dense build directory (its graphs on ONNX Runtime).

    The reference must be the same model (``fingerprint``) and, for a build, one that prunes nothing and
    holds float weights; anything else is refused in one line.
    """
    path = Path(path)
    if (path / "manifest.json").is_file():
        from prune_core.device import provider_for
        from prune_core.manifest import Manifest

        from .generate import BuildReference
        from .open_build import load_runner

        manifest = Manifest.load(path)
        _same_model(path, manifest.model["fingerprint"], fingerprint)
        executed = [row["ratio"] for row in manifest.flops.get("check_prompts", [])]
        pruned = (manifest.plan.get("operations") or manifest.plan.get("tokens") or manifest.autoprune
                  or manifest.quantization or any(r < 1 - 1e-9 for r in executed))  # fmt: skip
        if pruned:
            raise DataError(f"--reference {path} is a pruned or quantized build; agreement compares with the dense "
                            "model, so pass the model folder or a dense float build (build without a plan)")
        runner = load_runner(path, provider=provider_for(device, "auto"))
        return BuildReference(runner, max_new_tokens, f"dense build {path}")
    from calib.evaluate import ExecutorReference
    from exporter.adapters import load_adapter, load_spec
    from prune_core.device import resolve_device

    if not (path / "config.json").is_file():
        raise DataError(f"--reference {path} is neither a model folder (no config.json) nor a build directory "
                        "(no manifest.json); pass the dense model's folder or a dense build")
    _same_model(path, load_spec(path).fingerprint(), fingerprint)
    adapter = load_adapter(path, device=resolve_device(device or "cpu"))
    return ExecutorReference(adapter, max_new_tokens, name=f"dense executor of {path}")


def build_reference(build_dir: Path, reference_path: Path | None, max_new_tokens: int,
                    device: str | None = None) -> tuple[Any, str | None]:
    """The dense answers a build's eval compares with, and why there are none when there are none.

    Default: the build's source model folder recorded in its manifest, when it is still there.
    """
    from prune_core.manifest import Manifest

    manifest = Manifest.load(build_dir)
    fingerprint = manifest.model["fingerprint"]
    if reference_path is not None:
        return load_reference(reference_path, fingerprint, max_new_tokens, _torch_device(device)), None
    source = Path(manifest.model.get("path") or "")
    if not (source / "config.json").is_file():
        return None, (f"the build's model folder {source} is not here; pass --reference MODEL_DIR or a dense "
                      "build to compare answers with the dense model")
    return load_reference(source, fingerprint, max_new_tokens, _torch_device(device)), None


def _torch_device(device: str | None) -> str:
    """Where a build eval's executor reference runs: ``--device`` when it names a GPU, else the CPU."""
    return device if device and device.strip().lower().startswith("cuda") else "cpu"


def _same_model(path: Path, found: str, expected: str) -> None:
    if found != expected:
        raise DataError(f"--reference {path} is another model (fingerprint {found}, expected {expected}); pass "
                        "the folder or a dense build of the model being evaluated")
