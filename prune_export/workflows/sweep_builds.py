"""The sweep's builds: quantized configurations answered through their graphs (and compared with their float
twins on the PyTorch executor), and ``--latency``'s builds and time to first token.

A sweep builds into ``REPORT_DIR/builds/NAME``; a build already there is kept when its manifest says it is
this configuration's (same plan, precision, quantization and calibration, bounds, a passed check where the
sweep checks), else it is built again.

A quantized configuration's answers come from its build on ONNX Runtime, as ``eval BUILD_DIR`` gives them.
Every row is also answered by the executor in fp32 under the same plan, with AutoPrune's schedule read from
the schedule table as the graphs read it (the float twin, which a float build matches to within float32
rounding), so the report can say which answers int8 changed and, at the first token that changed, how far
apart the float model's logits of the two tokens were (the logit gap the quantization error crossed).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prune_core.errors import PruneExportError

Log = Callable[[str], None]


# -- builds ------------------------------------------------------------------------------------------------
def build_settings(settings: Any, config: Any) -> Any:
    """The build settings of one configuration of a sweep (``settings``: its :class:`.sweep.SweepSettings`)."""
    from .build import BuildSettings

    return BuildSettings(check=not settings.skip_check, max_text_tokens=settings.max_text_tokens,
                         max_sys_tokens=settings.max_sys_tokens, provider=settings.provider, device=settings.device,
                         overwrite=True, quantize=config.quantize,
                         calib=settings.calib if config.quantize == "int8" else None,
                         calib_rows=settings.calib_rows)  # fmt: skip


def ensure_build(model_dir: Path, builds: Path, config: Any, choice: Any, settings: Any, log: Log,
                 position: str = "") -> bool:
    """Build ``config`` into ``builds/NAME`` unless the build there is already this configuration's; True
    when it built."""
    from prune_core.manifest import Manifest

    from .build import build

    target = builds / config.name
    bs = build_settings(settings, config)
    if (target / "manifest.json").is_file():
        why_not = why_not_reuse(target, choice.info, bs)
        if why_not is None:
            log(f"kept the build {target} (same plan, bounds, precision and quantization; check "
                f"{Manifest.load(target, verify='none').check.status})")  # fmt: skip
            return False
        log(f"{target} is not this configuration's build ({why_not}); building it again")
    builds.mkdir(parents=True, exist_ok=True)
    log(f"{position}building {config.name} into {target}")
    build(model_dir, target, choice, bs, log)
    return True


def _quantization_wanted(settings: Any) -> dict[str, Any] | None:
    """What a build's manifest must say of its quantization to stand for ``settings``."""
    if settings.quantize is None:
        return None
    wanted: dict[str, Any] = {"mode": settings.quantize}
    if settings.quantize == "int8":
        from calib.data import data_fingerprint, load_rows

        rows = load_rows(settings.calib, require_answer=False, limit=settings.calib_rows)
        wanted.update(calibration_rows=len(rows), calibration_fingerprint=data_fingerprint(rows))
    return wanted


def why_not_reuse(target: Path, plan_info: dict[str, Any], settings: Any) -> str | None:
    """Why a kept build cannot stand for this configuration now (None: it can): another plan, other bounds,
    precision or quantization, files that differ from its manifest, or no passed check where this sweep
    checks its builds."""
    from prune_core.manifest import Manifest

    try:
        manifest = Manifest.load(target, verify="full")
    except PruneExportError as err:
        return str(err).split(";")[0]
    if manifest.plan != json.loads(json.dumps(plan_info)):
        return "another plan"
    quantization = _quantization_wanted(settings)
    found_quantization = manifest.quantization
    if quantization is not None and found_quantization is not None:
        found_quantization = {key: found_quantization.get(key) for key in quantization}
    wanted = {"dtype": settings.dtype, "target": settings.target, "quantization": quantization,
              "max_text_tokens": settings.max_text_tokens, "max_sys_tokens": settings.max_sys_tokens}
    found = {"dtype": manifest.dtype, "target": manifest.target, "quantization": found_quantization,
             "max_text_tokens": manifest.shape_ranges.get("text_len", [None] * 3)[2],
             "max_sys_tokens": manifest.shape_ranges.get("sys_len", [None] * 3)[2]}  # fmt: skip
    differs = [key for key in wanted if wanted[key] != found[key]]
    if differs:
        return "another " + ", ".join(differs)
    if settings.check and manifest.check.status != "passed":
        return f"its check was {manifest.check.status}, and this sweep checks its builds"
    return None


# -- quantized configurations ------------------------------------------------------------------------------
class FloatTwin:
    """Answers each row with the executor in fp32 under a quantized build's plan and compares them with the
    build's (``observe`` is :func:`.generate.eval_build`'s per-row hook).

    For every row it records whether the answer changed and, at the first step where the tokens part, the
    float model's logit of its own token minus its logit of the quantized build's token (``float_gap``,
    >= 0), the build's own margin the other way (``quantized_gap``) and the largest logits error there. The
    logits errors of the steps before it, where both saw the same tokens, give the scale the gaps are
    measured against. A row whose visual tokens per layer differ between the two (a token policy that kept
    other counts: AutoPrune's complexity read through int8 attention) is counted as a changed schedule; a
    flip there is the policy's decision, not rounding of the same computation.
    """

    def __init__(self, adapter: Any, choice: Any, spec: Any, max_new_tokens: int) -> None:
        from exporter.executor import PlanExecutor

        from .selection import token_policy

        self.adapter = adapter
        self.executor = PlanExecutor(adapter)
        self.ops = choice.ops
        self.policy = token_policy(choice.tokens, spec, "table")  # the schedule the graphs read
        self.max_new_tokens = max_new_tokens
        self.rows = 0
        self.flips: list[dict[str, Any]] = []
        self.agree_errors: list[float] = []
        self.schedules_changed: list[int] = []

    def observe(self, row: Any, token_ids: list[int], step_logits: list[np.ndarray], result: Any = None) -> None:
        from exporter.sample import prepare_sample

        sample = prepare_sample(self.adapter, row.load_image(), row.question)
        ref = self.executor.generate(sample, self.ops, self.policy, max_new_tokens=self.max_new_tokens)
        self.rows += 1
        same_schedule = result is None or list(result.visual_tokens_per_layer) == list(ref.prefill.visual_tokens_per_layer)
        if not same_schedule:
            self.schedules_changed.append(row.line)
        agree = 0
        for a, b in zip(token_ids, ref.token_ids, strict=False):
            if a != b:
                break
            agree += 1
        steps = min(agree + 1, len(step_logits), len(ref.step_logits))
        for step in range(min(agree, steps)):
            error = np.abs(step_logits[step].astype(np.float64) - ref.step_logits[step].double().cpu().numpy()).max()
            self.agree_errors.append(float(error))
        if list(token_ids) == list(ref.token_ids) or agree >= steps:
            return
        mine = step_logits[agree].astype(np.float64).reshape(-1)
        theirs = ref.step_logits[agree].double().cpu().numpy().reshape(-1)
        float_token, quantized_token = int(theirs.argmax()), int(mine.argmax())
        self.flips.append({
            "line": row.line, "step": agree,
            "float_answer": ref.text, "quantized_answer": self.adapter.decode(list(token_ids)),
            "float_token_id": float_token, "quantized_token_id": quantized_token,
            "float_token": self.adapter.decode([float_token]), "quantized_token": self.adapter.decode([quantized_token]),
            "float_gap": float(theirs[float_token] - theirs[quantized_token]),
            "quantized_gap": float(mine[quantized_token] - mine[float_token]),
            "logits_error": float(np.abs(mine - theirs).max()), "same_schedule": same_schedule,
        })  # fmt: skip

    def summary(self) -> dict[str, Any]:
        """What the report keeps: changed answers, every flip with its gaps, and the agreeing steps' errors.

        ``near_ties`` counts the flips whose float gap is at most twice the largest logits error of the
        agreeing steps (the build check's rule for a flip that rounding can explain)."""
        bound = 2.0 * max(self.agree_errors) if self.agree_errors else None
        gaps = [f["float_gap"] for f in self.flips]
        return {
            "reference": "fp32 executor, same plan (AutoPrune schedule from the table, as the graphs)",
            "rows": self.rows, "changed": len(self.flips),
            "agree_logits_error": {"median": statistics.median(self.agree_errors) if self.agree_errors else None,
                                   "max": max(self.agree_errors, default=None), "steps": len(self.agree_errors)},
            "float_gap": {"median": statistics.median(gaps) if gaps else None, "max": max(gaps, default=None)},
            "near_tie_bound": bound,
            "near_ties": None if bound is None else sum(g <= bound for g in gaps),
            "schedules_changed": len(self.schedules_changed), "schedule_changed_lines": self.schedules_changed,
            "flips": self.flips,
        }  # fmt: skip


def evaluate_quantized(model_dir: Path, data_path: Path, out: Path, config: Any, choice: Any, settings: Any,
                       adapter: Any, spec: Any, reference: Any, max_new_tokens: int, limit: int | None,
                       progress: Callable[[int], None], log: Log) -> tuple[Any, dict[str, Any], bool]:
    """Build ``config`` (kept when already built), answer the rows through its graphs, compare with the
    dense ``reference`` and with the float twin; returns the eval report, the twin's summary and whether it
    built."""
    from .generate import eval_build

    built = ensure_build(model_dir, out / "builds", config, choice, settings, log)
    twin = FloatTwin(adapter, choice, spec, max_new_tokens)
    run = eval_build(out / "builds" / config.name, data_path, max_new_tokens=max_new_tokens, limit=limit,
                     provider=settings.provider, progress=progress, reference=reference, observe=twin.observe)  # fmt: skip
    return run["report"], twin.summary(), built


# -- latency -----------------------------------------------------------------------------------------------
def latency(model_dir: Path, out: Path, configs: Sequence[Any], choices: dict[str, Any], row: Any, settings: Any,
            built: list[str], log: Log) -> dict[str, Any]:
    """Build every configuration (kept builds are not redone) and time each build's first token, interleaved."""
    from prune_core.io import atomic_write_json

    from .measure import time_first_token

    builds = out / "builds"
    for i, config in enumerate(configs):
        if ensure_build(model_dir, builds, config, choices[config.name], settings, log, f"[{i + 1}/{len(configs)}] "):
            built.append(config.name)
    path = out / "latency.json"
    names = [c.name for c in configs]
    timing = {"builds": names, "rounds": settings.rounds, "warmup": settings.warmup, "threads": settings.threads,
              "provider_option": settings.provider}  # fmt: skip
    if path.is_file() and not built:
        try:
            previous = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = {}
        differs = [key for key, value in timing.items() if previous.get(key) != value]
        if not differs:
            log(f"kept the latency measured before ({path}: same builds, rounds, warm-up, threads and provider)")
            return previous
        if previous:
            log(f"timing again: {', '.join(differs)} differ from the latency measured before ({path})")
    measured = time_first_token({c.name: builds / c.name for c in configs}, row, rounds=settings.rounds,
                                warmup=settings.warmup, provider=settings.provider, threads=settings.threads, log=log)
    measured["provider_option"] = settings.provider
    atomic_write_json(path, measured)
    return measured
