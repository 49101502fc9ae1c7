"""The eval workflow: greedy answers of the PyTorch executor on a data set, dense vs under a plan, and the
dense answers that ``agreement`` compares with (:func:`load_reference`, :func:`build_reference`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune_core.errors import DataError
from prune_core.io import atomic_write_text

from .selection import choose_plan, token_policy


@dataclass(frozen=True)
class Evaluation:
    """An eval run: the report of :func:`calib.evaluate.evaluate` and the token policy it ran (or None)."""

    report: Any
    policy: Any


def evaluate_model(model_dir: Path, data_path: Path, *, plan_path: Path | None = None, budget: float | None = None,
                   stages: Sequence[tuple[int, int]] | None = None, autoprune: Mapping[str, Any] | None = None,
                   autoprune_mode: str | None = None, max_new_tokens: int = 16, limit: int | None = None,
                   samples_out: Path | None = None, device: str = "cpu", dtype: str = "fp32",
                   reference_path: Path | None = None, compare: bool = True) -> Evaluation:
    """Evaluate MODEL_DIR on the rows of ``data_path`` under the plan's operations at ``budget`` and the token
    section resolved from the plan, ``stages`` (--keep-schedule) and ``autoprune`` (--autoprune-* overrides).

    ``autoprune_mode`` (``exact`` or ``table``, None: exact) picks how AutoPrune computes its schedule.
    Per-sample results go to ``samples_out`` (JSONL) when given. A progress bar is drawn on stderr. The
    model runs on ``device`` in ``dtype``. Answers are compared with the same model's dense answers
    (``agreement``, first-token KL), or with ``reference_path``'s (:func:`load_reference`); ``compare=False``
    skips the comparison.
    """
    from tqdm import tqdm

    from calib.data import load_rows
    from calib.evaluate import DENSE, evaluate
    from exporter.adapters import load_adapter
    from prune_core.device import resolve_device, torch_dtype

    rows = load_rows(data_path, require_answer=True, limit=limit)
    also_given = ["--autoprune-mode"] if autoprune_mode is not None else []
    spec, choice = choose_plan(model_dir, plan_path, budget, stages, autoprune, also_given)
    policy = token_policy(choice.tokens, spec, autoprune_mode or "exact")
    adapter = load_adapter(model_dir, dtype=torch_dtype(dtype), device=resolve_device(device))
    reference: Any = DENSE if compare else None
    if compare and reference_path is not None:
        reference = load_reference(reference_path, spec.fingerprint(), max_new_tokens, device)
    with tqdm(total=len(rows), desc="eval", unit="sample", file=sys.stderr, disable=None) as bar:
        report = evaluate(adapter, rows, choice.ops, policy, max_new_tokens=max_new_tokens, progress=bar.update,
                          reference=reference)
    if samples_out is not None:
        write_samples(samples_out, report)
    return Evaluation(report, policy)


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

        from .generate import BuildReference, load_runner

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
