"""The sweep workflow: every configuration of a trade-off (dense, GSOP budgets, AutoPrune budgets, fixed keep
schedules) evaluated on one data set, optionally built and timed, and written up as a report with plots.

Each configuration is evaluated exactly as ``prune-export eval`` evaluates it (the same plan choice, token
policy and :func:`calib.evaluate.evaluate`), so a report row and an ``eval --json`` of the same options hold
the same numbers. The dense configuration runs first; its answers are kept (``reference.npz``) and every other
configuration's ``agreement`` and first-token KL compare with them.

A report directory is resumable: every finished configuration is a file in ``configs/`` (and a finished
build a directory in ``builds/`` with its manifest), kept and not redone when the sweep runs again on the same
inputs (``sweep.json`` records them). Nothing is written outside the report directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prune_core import defaults, memory
from prune_core.errors import PruneExportError
from prune_core.io import atomic_write_bytes, atomic_write_json, atomic_write_text

from . import sweep_builds

#: The methods a sweep configuration can name (``--config METHOD:VALUE``).
METHODS = ("dense", "gsop", "autoprune", "fixed")
#: Format marker and version of ``sweep.json`` and ``report.json``.
SWEEP_FORMAT = "prune-export-sweep"
SWEEP_VERSION = 1
#: How many samples the AutoPrune visual-token plot draws per budget.
CURVE_SAMPLES = 4

Log = Callable[[str], None]


class SweepError(PruneExportError):
    """A sweep's options or report directory are not usable (one line says which and how to fix it)."""


# -- configurations -------------------------------------------------------------------------------------------
#: AutoPrune's position modes a configuration may name (``autoprune:T:MODE``).
POSITIONS = ("renumbered", "original")
#: Quantized builds a configuration may name (``CONFIG@MODE``): evaluated through the build's graphs.
QUANTIZE_MODES = ("int8", "int8-weights")


@dataclass(frozen=True)
class SweepConfig:
    """One point of the trade-off. ``name`` is its file name in the report directory.

    ``method`` is ``dense``, ``gsop``, ``autoprune``, ``fixed`` or a combined plan, ``gsop+autoprune`` or
    ``gsop+fixed`` (the plan's operations at ``budget`` applied to the visual tokens the token policy keeps).
    ``quantize`` names an int8 build of the configuration: it is built and its graphs answer on ONNX Runtime.
    """

    method: str
    budget: float | None = None  # gsop: fraction of dense prefill FLOPs kept (plan ladder)
    tokens: float | None = None  # autoprune: T, average visual tokens per layer
    stages: tuple[tuple[int, int], ...] | None = None  # fixed: (layer, tokens) stages
    positions: str | None = None  # autoprune: renumbered or original (None: the plan's, else renumbered)
    quantize: str | None = None  # int8 or int8-weights: a quantized build, evaluated through its graphs

    @property
    def parts(self) -> list[str]:
        return self.method.split("+")

    @property
    def name(self) -> str:
        names = []
        for part in self.parts:
            if part == "gsop":
                names.append(f"gsop-{_num(self.budget)}")
            elif part == "autoprune":
                names.append(f"autoprune-{_num(self.tokens)}" + (f"-{self.positions}" if self.positions else ""))
            elif part == "fixed":
                names.append("fixed-" + "-".join(f"{layer}x{count}" for layer, count in self.stages or ()))
            else:
                names.append("dense")
        return "+".join(names) + (f"@{self.quantize}" if self.quantize else "")

    @property
    def label(self) -> str:
        """How the report names it: the options that reproduce it with ``eval`` or ``build``."""
        options = []
        for part in self.parts:
            if part == "gsop":
                options.append(f"--plan PLAN --budget {_num(self.budget)}")
            elif part == "autoprune":
                options.append(f"--autoprune-tokens {_num(self.tokens)}"
                               + (f" --autoprune-positions {self.positions}" if self.positions else ""))
            elif part == "fixed":
                options.append("--keep-schedule " + ",".join(f"{layer}:{count}" for layer, count in self.stages or ()))
        if self.quantize:
            options.append(f"--quantize {self.quantize}")
        return " ".join(options) or "dense"

    @property
    def series(self) -> str:
        """The line of the plots this point belongs to (quantized builds are points of their own)."""
        if self.quantize:
            return self.quantize
        return self.method + ("-original" if self.positions == "original" else "")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "series": self.series, "label": self.label,
                "budget": self.budget, "tokens": self.tokens,
                "stages": [list(s) for s in self.stages] if self.stages else None,
                "positions": self.positions, "quantize": self.quantize}  # fmt: skip


def _num(x: float | None) -> str:
    return f"{x:g}"


_GRAMMAR = ("dense, gsop:BUDGET, autoprune:T[:renumbered|original], fixed:LAYER:TOKENS[,...], a combined "
            "gsop:BUDGET+autoprune:T or gsop:BUDGET+fixed:..., each optionally @int8 or @int8-weights")


def parse_config(text: str) -> SweepConfig:
    """One configuration: ``dense``, ``gsop:B``, ``autoprune:T[:POSITIONS]``, ``fixed:LAYER:TOKENS[,...]``,
    a combined ``gsop:B+autoprune:T`` / ``gsop:B+fixed:...``, any of them followed by ``@int8`` or
    ``@int8-weights`` (a quantized build)."""
    from prune_core.tokens import parse_keep_schedule

    base, at, quantize = text.strip().partition("@")
    quantize = quantize.strip().lower()
    if at and quantize not in QUANTIZE_MODES:
        raise SweepError(f"--config {text!r}: @{quantize} is not a quantization; use @int8 or @int8-weights")
    fields: dict[str, Any] = {}
    methods: list[str] = []
    for part in base.split("+"):
        method, _, value = part.strip().partition(":")
        method = method.strip().lower()
        if method not in METHODS:
            raise SweepError(f"--config {text!r}: unknown method {method!r}; write {_GRAMMAR}")
        if method in methods or (method in ("autoprune", "fixed") and {"autoprune", "fixed"} & set(methods)):
            raise SweepError(f"--config {text!r}: one plan and one token policy at most; write {_GRAMMAR}")
        methods.append(method)
        if method == "dense":
            if value:
                raise SweepError(f"--config {text!r}: dense takes no value; write --config dense")
            continue
        if not value:
            raise SweepError(f"--config {text!r}: {method} needs a value ({method}:...)")
        if method == "fixed":
            fields["stages"] = tuple(parse_keep_schedule(value))
            continue
        number_text, _, positions = value.partition(":")
        if positions and method != "autoprune":
            raise SweepError(f"--config {text!r}: {method}:{value} has one value; write {_GRAMMAR}")
        if positions and positions.strip().lower() not in POSITIONS:
            raise SweepError(f"--config {text!r}: positions {positions!r} must be renumbered or original")
        try:
            number = float(number_text)
        except ValueError:
            raise SweepError(f"--config {text!r}: {number_text!r} is not a number") from None
        if method == "gsop":
            fields["budget"] = number
        else:
            fields["tokens"] = number
            fields["positions"] = positions.strip().lower() or None
    if "dense" in methods and len(methods) > 1:
        raise SweepError(f"--config {text!r}: dense combines with nothing; write {_GRAMMAR}")
    methods.sort(key=lambda m: m != "gsop")  # the plan first: gsop+autoprune, gsop+fixed
    return SweepConfig("+".join(methods), quantize=quantize or None, **fields)


def parse_numbers(text: str | None, option: str) -> list[float]:
    """``"1,0.7,0.5"`` -> ``[1.0, 0.7, 0.5]``, or one line naming ``option``."""
    if not text:
        return []
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SweepError(f"{option} {text!r} is not a comma-separated list of numbers (e.g. 0.7,0.5,0.3)") from None


def parse_choices(text: str | None, option: str, choices: Sequence[str]) -> list[str]:
    """``"renumbered,original"`` -> ``["renumbered", "original"]``, each one of ``choices``, or one line."""
    if not text:
        return []
    values = [part.strip().lower() for part in text.split(",") if part.strip()]
    wrong = [v for v in values if v not in choices]
    if wrong:
        raise SweepError(f"{option} {text!r}: {', '.join(wrong)} is not one of {', '.join(choices)}")
    return values


def sweep_configs(*, plan_path: Path | None, budgets: Sequence[float], autoprune_tokens: Sequence[float],
                  keep_schedules: Sequence[Sequence[tuple[int, int]]], extra: Sequence[SweepConfig] = (),
                  autoprune_positions: Sequence[str] = (), quantize: Sequence[str] = ()) -> list[SweepConfig]:
    """The configurations of a sweep, dense first, each once, in the order given; checked before any work.

    Each AutoPrune budget is swept in every mode of ``autoprune_positions`` (none: the default mode);
    ``quantize`` adds a quantized build of dense in each mode (``--config CONFIG@MODE`` quantizes others).
    """
    from prune_core.plan import BudgetError, check_budget

    configs = [SweepConfig("dense")]
    configs += [SweepConfig("gsop", budget=b) for b in budgets]
    configs += [SweepConfig("autoprune", tokens=t, positions=p) for t in autoprune_tokens
                for p in (autoprune_positions or [None])]  # fmt: skip
    configs += [SweepConfig("fixed", stages=tuple(tuple(s) for s in stages)) for stages in keep_schedules]  # type: ignore[misc]
    configs += [SweepConfig("dense", quantize=mode) for mode in quantize]
    configs += list(extra)
    out: list[SweepConfig] = []
    for config in configs:
        if config.budget is not None:
            try:
                check_budget(config.budget)
            except BudgetError as exc:
                raise SweepError(f"{exc}; fix --budgets") from None
            if plan_path is None:
                raise SweepError("--budgets (gsop configurations) need --plan PLAN.json, the searched plan whose "
                                 "ladder the budgets pick from")
        if "autoprune" in config.parts and not (config.tokens is not None and config.tokens > 0):
            raise SweepError(f"--autoprune-tokens {config.tokens:g} must be > 0 (average visual tokens per layer)")
        if config.name not in {c.name for c in out}:
            out.append(config)
    if len(out) == 1 and plan_path is None:
        raise SweepError("nothing to compare with dense: pass --plan with --budgets, --autoprune-tokens, "
                         "--keep-schedule, --quantize or --config")
    return out


# -- identity and resume ----------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _weight_files(model_dir: Path) -> list[list[Any]]:
    """Name, size and modification time of a model folder's weight files (cheap, unlike hashing 14 GB)."""
    files = sorted(p for p in Path(model_dir).iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


@dataclass
class SweepInputs:
    """What a sweep's numbers depend on: a report directory is resumed only for the same inputs."""

    model: str
    model_fingerprint: str
    weights: list[list[Any]]  # [file name, size, mtime_ns] of every weight file: new weights redo the sweep
    data: str
    data_sha256: str
    rows: int
    limit: int | None
    max_new_tokens: int
    device: str
    dtype: str
    plan: str | None
    plan_sha256: str | None
    calib: str | None = None  # int8 configurations: their calibration file
    calib_sha256: str | None = None
    calib_rows: int | None = None

    def differences(self, other: dict[str, Any]) -> list[str]:
        """Fields whose value changes the numbers and differs from ``other`` (paths may move)."""
        keys = ("model_fingerprint", "weights", "data_sha256", "limit", "max_new_tokens", "device", "dtype", "plan_sha256",
                "calib_sha256", "calib_rows")
        return [k for k in keys if other.get(k) != getattr(self, k)]


@dataclass
class SweepSettings:
    """Everything a sweep does besides the inputs. Defaults: no builds, ONNX Runtime latency on 5 rounds."""

    latency: bool = False
    rounds: int = defaults.SWEEP_ROUNDS
    warmup: int = defaults.SWEEP_WARMUP
    threads: int | None = None
    provider: str = defaults.PROVIDER  # ONNX Runtime provider of the builds' check and timing
    device: str = defaults.TORCH_DEVICE  # where PyTorch runs the model for the builds' export and check (the sweep's --device)
    skip_check: bool = False  # builds: skip the parity check against the executor
    overwrite: bool = False  # discard a report directory of other inputs instead of refusing it
    max_text_tokens: int = defaults.MAX_TEXT_TOKENS
    max_sys_tokens: int = defaults.MAX_SYS_TOKENS
    calib: Path | None = None  # calibration rows of int8 configurations
    calib_rows: int = defaults.QUANT_CALIB_ROWS


@dataclass
class SweepResult:
    report: dict[str, Any]
    computed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    built: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)


def _open_report_dir(out: Path, inputs: SweepInputs, overwrite: bool, log: Log) -> None:
    """Create ``out`` or resume it; refuse a directory that holds something else or a sweep of other inputs."""
    marker = out / "sweep.json"
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {out} is a file; pass a directory for the report")
    if out.is_dir() and any(out.iterdir()) and not marker.is_file():
        raise SweepError(f"--out {out} is not empty and holds no sweep (no sweep.json); pass a new directory")
    if marker.is_file():
        try:
            previous = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SweepError(f"{marker} cannot be read ({exc}); remove {out} or pass another --out") from None
        diffs = inputs.differences(previous.get("inputs", {}))
        if diffs and not overwrite:
            raise SweepError(f"{out} holds a sweep of other inputs (differs in {', '.join(diffs)}); pass another "
                             "--out, or --overwrite to discard it")
        if diffs:
            import shutil

            log(f"--overwrite: discarding {out} (a sweep of other inputs: {', '.join(diffs)})")
            shutil.rmtree(out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"format": SWEEP_FORMAT, "version": SWEEP_VERSION, "inputs": asdict(inputs)})


def _load_finished(path: Path, config: SweepConfig) -> dict[str, Any] | None:
    """A finished configuration's record, or None when it is missing or unreadable (then it is redone)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("config", {}).get("name") == config.name and "eval" in record else None


def _save_reference(path: Path, answers: dict[int, Any], max_new_tokens: int) -> None:
    import io

    lines = sorted(answers)
    buffer = io.BytesIO()
    np.savez(buffer, lines=np.array(lines, dtype=np.int64),
             texts=np.array([answers[n].text for n in lines], dtype=object).astype(str),
             logprobs=np.stack([answers[n].first_logprobs.astype(np.float32) for n in lines]),
             max_new_tokens=np.array(max_new_tokens))  # fmt: skip
    atomic_write_bytes(path, buffer.getvalue())


def _load_reference(path: Path) -> Any:
    from calib.evaluate import ReferenceAnswer, StoredReference

    try:
        with np.load(path) as data:
            answers = {int(n): ReferenceAnswer(str(t), lp.astype(np.float32))
                       for n, t, lp in zip(data["lines"], data["texts"], data["logprobs"], strict=True)}  # fmt: skip
            max_new_tokens = int(data["max_new_tokens"])
    except (OSError, KeyError, ValueError) as exc:
        raise SweepError(f"{path} cannot be read ({exc}); delete it and configs/dense.json to redo dense") from None
    return StoredReference(answers, max_new_tokens, name="dense executor")


# -- the sweep ---------------------------------------------------------------------------------------------
def run_sweep(model_dir: Path, data_path: Path, out: Path, configs: Sequence[SweepConfig], *,
              plan_path: Path | None = None, max_new_tokens: int = defaults.EVAL_NEW_TOKENS, limit: int | None = None,
              device: str = defaults.TORCH_DEVICE, dtype: str = defaults.TORCH_DTYPE, settings: SweepSettings | None = None,
              log: Log = lambda line: print(line, file=sys.stderr)) -> SweepResult:
    """Evaluate (and with ``settings.latency`` build and time) every configuration; write the report.

    Float configurations are answered by the PyTorch executor; quantized ones (``CONFIG@int8``) are built
    and answered by their graphs on ONNX Runtime (:mod:`.sweep_builds`).
    """
    from calib.data import load_rows
    from exporter.adapters import load_adapter, load_spec
    from prune_core.device import resolve_device, torch_dtype
    from prune_core.plan import Plan

    settings = settings or SweepSettings()
    if not Path(model_dir, "config.json").is_file():
        raise SweepError(f"{model_dir} is not a model folder (no config.json); pass the HuggingFace model folder")
    _check_quantized(configs, settings, dtype)
    spec = load_spec(model_dir)
    plan = None
    if plan_path is not None:
        plan = Plan.load(plan_path)
        plan.check_model(spec, str(model_dir))
    rows = load_rows(data_path, require_answer=True, limit=limit)
    if not rows:
        raise SweepError(f"{data_path} has no rows; pass a JSONL file of image/question/answer rows")
    # Resolve every configuration before any work: a bad one fails in one line, not after an hour.
    choices = {}
    for config in configs:
        choices[config.name] = _choose(model_dir, plan_path, config)
    calib = settings.calib if any(c.quantize == "int8" for c in configs) else None
    inputs = SweepInputs(
        model=str(model_dir), model_fingerprint=spec.fingerprint(), weights=_weight_files(model_dir),
        data=str(data_path),
        data_sha256=_sha256(Path(data_path)), rows=len(rows), limit=limit, max_new_tokens=max_new_tokens,
        device=device, dtype=dtype, plan=None if plan_path is None else str(plan_path),
        plan_sha256=None if plan_path is None else _sha256(Path(plan_path)),
        calib=None if calib is None else str(calib), calib_sha256=None if calib is None else _sha256(Path(calib)),
        calib_rows=None if calib is None else settings.calib_rows,
    )  # fmt: skip
    _open_report_dir(out, inputs, settings.overwrite, log)
    result = SweepResult(report={})
    records: dict[str, dict[str, Any]] = {}
    todo = []
    reference_path = out / "reference.npz"
    for config in configs:
        record = _load_finished(out / "configs" / f"{config.name}.json", config)
        if record is not None and (config.method != "dense" or config.quantize or reference_path.is_file()):
            records[config.name] = record
            result.kept.append(config.name)
        else:
            todo.append(config)
    if result.kept:
        log(f"kept {len(result.kept)} finished configuration(s) from {out}: {', '.join(result.kept)}")
    if todo:
        memory.check_model_fits(model_dir, dtype, "sweep")
        adapter = load_adapter(model_dir, dtype=torch_dtype(dtype), device=resolve_device(device))
        reference = _load_reference(reference_path) if "dense" in records else None
        try:
            _evaluate_all(todo, rows, out, records, result, choices, adapter, spec, reference, max_new_tokens,
                          EvalJob(model_dir, data_path, limit, settings, log))
        except KeyboardInterrupt:
            log(f"interrupted: {len(records)} finished configuration(s) are kept in {out}; run the same command "
                "again to do the rest")
            raise
    latency = None
    if settings.latency:
        latency = sweep_builds.latency(model_dir, out, configs, choices, rows[0], settings, result.built, log)
    result.report = write_report(out, configs, records, inputs, plan, latency, result, spec)
    return result


def _check_quantized(configs: Sequence[SweepConfig], settings: SweepSettings, dtype: str) -> None:
    """Quantized configurations: int8 needs calibration rows; the float twin they compare with is fp32."""
    quantized = [c.name for c in configs if c.quantize]
    if not quantized:
        if settings.calib is not None:
            raise SweepError("--calib is the calibration data of int8 configurations; add one (--quantize int8 "
                             "or --config CONFIG@int8) or drop --calib")
        return
    if any(c.quantize == "int8" for c in configs) and settings.calib is None:
        raise SweepError("int8 configurations calibrate activation ranges on real prompts: pass --calib CALIB.jsonl "
                         "(image/question rows, not the evaluation data)")
    if settings.calib is not None and not Path(settings.calib).is_file():
        raise SweepError(f"--calib {settings.calib} does not exist; pass a JSONL file of image/question rows")
    if dtype != "fp32":
        raise SweepError(f"quantized configurations ({', '.join(quantized)}) are compared with the fp32 model; "
                         f"run the sweep in --dtype fp32 (not {dtype})")


@dataclass(frozen=True)
class EvalJob:
    """What evaluating a quantized configuration needs besides the executor: where to build and what to read."""

    model_dir: Path
    data_path: Path
    limit: int | None
    settings: SweepSettings
    log: Log


def _evaluate_all(todo: Sequence[SweepConfig], rows: Sequence[Any], out: Path, records: dict[str, dict[str, Any]],
                  result: SweepResult, choices: dict[str, Any], adapter: Any, spec: Any, reference: Any,
                  max_new_tokens: int, job: EvalJob) -> None:
    """Evaluate ``todo`` (dense first: its answers are the others' reference), saving each as it finishes."""
    from tqdm import tqdm

    from calib.evaluate import DENSE, evaluate

    from .selection import token_policy

    reference_path = out / "reference.npz"
    with tqdm(total=len(todo) * len(rows), desc="sweep", unit="sample", file=sys.stderr, disable=None) as bar:
        # dense first (the reference), quantized builds last (they compare with the stored dense answers)
        for config in sorted(todo, key=lambda c: (bool(c.quantize), c.method != "dense")):
            bar.set_postfix_str(config.name)
            choice = choices[config.name]
            record: dict[str, Any] = {"config": config.to_json(), "plan": choice.info}
            if config.quantize:
                report, twin, built = sweep_builds.evaluate_quantized(
                    job.model_dir, job.data_path, out, config, choice, job.settings, adapter, spec, reference,
                    max_new_tokens, job.limit, bar.update, bar.write)  # fmt: skip
                if built:
                    result.built.append(config.name)
                record["float_twin"] = twin
            else:
                policy = token_policy(choice.tokens, spec, "exact")
                answers: dict[int, Any] | None = {} if config.method == "dense" else None
                report = evaluate(adapter, rows, choice.ops, policy, max_new_tokens=max_new_tokens,
                                  progress=bar.update, reference=DENSE if config.method == "dense" else reference,
                                  answers_out=answers)  # fmt: skip
                if answers is not None:
                    _save_reference(reference_path, answers, max_new_tokens)
                    reference = _load_reference(reference_path)
            record["eval"] = report.to_json(with_samples=True)
            atomic_write_json(out / "configs" / f"{config.name}.json", record)
            records[config.name] = record
            result.computed.append(config.name)
            bar.write(_summary_line(config, report.to_json(), record.get("float_twin")))


def _choose(model_dir: Path, plan_path: Path | None, config: SweepConfig) -> Any:
    """What one configuration prunes, resolved as ``eval`` resolves the same options."""
    from .selection import PlanRequest, choose_plan

    autoprune: dict[str, Any] = {}
    if "autoprune" in config.parts:
        autoprune = {"tokens": config.tokens, "positions": config.positions}
    request = PlanRequest(plan_path=plan_path if "gsop" in config.parts else None, budget=config.budget,
                          stages=list(config.stages) if config.stages else None,
                          autoprune={k: v for k, v in autoprune.items() if v is not None})  # fmt: skip
    return choose_plan(model_dir, request)[1]


def _summary_line(config: SweepConfig, ev: dict[str, Any], twin: dict[str, Any] | None = None) -> str:
    acc = "n/a" if ev["accuracy"] is None else f"{ev['accuracy']:.4f}"
    agree = "n/a" if ev["agreement"] is None else f"{ev['agreement']:.4f}"
    changed = "" if twin is None else f"  changed vs fp32 {twin['changed']}/{twin['rows']}"
    return (f"{config.name:<24} accuracy {acc}  agreement {agree}  FLOPs ratio {ev['flops_ratio']:.4f}{changed}  "
            f"({ev['seconds']:.1f} s)")


# -- the report --------------------------------------------------------------------------------------------
def write_report(out: Path, configs: Sequence[SweepConfig], records: dict[str, dict[str, Any]], inputs: SweepInputs,
                 plan: Any, latency: dict[str, Any] | None, result: SweepResult, spec: Any) -> dict[str, Any]:
    """``report.json`` (every number), ``report.md`` (a table, the plots embedded) and the PNG plots."""
    from prune_export import plots

    dense = records["dense"]["eval"]
    rows = []
    for config in configs:
        ev = records[config.name]["eval"]
        acc, base = ev["accuracy"], dense["accuracy"]
        row = {
            **config.to_json(),
            "samples": ev["samples"], "accuracy": acc,
            "retention": (acc / base) if acc is not None and base else None,
            "agreement": ev["agreement"], "mean_first_token_kl": ev["mean_first_token_kl"],
            "flops_ratio": ev["flops_ratio"], "mean_flops_ratio": ev["mean_flops_ratio"],
            "dense_flops_per_sample": ev["dense_flops"] / ev["samples"],
            "pruned_flops_per_sample": ev["pruned_flops"] / ev["samples"],
            "mean_visual_tokens_per_layer": ev["mean_visual_tokens_per_layer"],
            "plan_steps": records[config.name]["plan"].get("steps", 0),
            "eval_seconds": ev["seconds"],
            "answered_by": "build on ONNX Runtime" if config.quantize else "PyTorch executor",
        }  # fmt: skip
        if config.quantize:
            row["float_twin"] = records[config.name].get("float_twin")
        if latency is not None:
            row["latency"] = latency["results"][config.name]
        rows.append(row)
    ladder = None
    if plan is not None:
        search = plan.doc.search or {}
        ladder = {"metric": search.get("metric"), "baseline": search.get("baseline"),
                  "limit": plots.search_limit(search), "flops_ratio": list(plan.ladder),
                  "metrics": [None] + [s.metric for s in plan.doc.steps]}  # fmt: skip
    curves = {}
    for config in configs:
        if "autoprune" in config.parts and not config.quantize:
            samples = records[config.name]["eval"]["results"][:CURVE_SAMPLES]
            curves[config.name] = [{"line": s["line"], "visual_tokens_per_layer": s["visual_tokens_per_layer"],
                                    "k": (s.get("token_decision") or {}).get("k"),
                                    "i1": (s.get("token_decision") or {}).get("i1")} for s in samples]  # fmt: skip
    report = {
        "format": SWEEP_FORMAT, "version": SWEEP_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": asdict(inputs), "visual_tokens": spec.visual_tokens, "num_layers": spec.num_layers,
        "configs": rows, "ladder": ladder, "autoprune_curves": curves, "latency": latency,
    }  # fmt: skip
    result.plots = plots.sweep_plots(report, out)
    report["plots"] = result.plots
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", report_markdown(report))
    return report


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def report_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: what was swept, one table row per configuration, the plots."""
    inputs = report["inputs"]
    lines = [
        "# Sweep report",
        "",
        f"Model `{inputs['model']}` ({inputs['model_fingerprint']}), data `{inputs['data']}` ({inputs['rows']} rows), "
        f"greedy answers of at most {inputs['max_new_tokens']} tokens, PyTorch executor on {inputs['device']} "
        f"in {inputs['dtype']}" + (f", plan `{inputs['plan']}`" if inputs["plan"] else "") + ".",
        "",
        "- **accuracy**: exact match against the data's answers; **retention**: accuracy / dense accuracy (n/a "
        "when dense accuracy is 0).",
        "- **agreement**: fraction of answers identical to the dense model's greedy answers; **KL**: mean "
        "KL(dense || pruned) of the first answer token's distribution, nats. Both need no labels.",
        "- **FLOPs ratio**: pruned / dense prefill FLOPs, summed over the rows.",
    ]
    latency = report.get("latency")
    if latency:
        lines.append(f"- **TTFT**: median time to first token of each build on ONNX Runtime ({latency['provider']}), "
                     f"{latency['rounds']} interleaved rounds on data line {latency['line']} "
                     f"({latency['prompt_tokens']} prompt tokens); speed-up = dense TTFT / TTFT.")
    lines += ["", "| configuration | options | accuracy | retention | agreement | KL (nats) | FLOPs ratio |"
              + (" TTFT ms | speed-up |" if latency else ""),
              "| --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- |" if latency else "")]
    for row in report["configs"]:
        cells = [row["name"], f"`{row['label']}`", _fmt(row["accuracy"]), _fmt(row["retention"]),
                 _fmt(row["agreement"]), _fmt(row["mean_first_token_kl"], 6), _fmt(row["flops_ratio"])]
        if latency:
            cells += [f"{row['latency']['ttft_ms']:.1f}", f"{row['latency']['ttft_speedup']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _quantized_markdown(report["configs"])
    titles = {"fidelity.png": "Accuracy, retention, agreement and first-token KL against FLOPs ratio",
              "latency.png": "Measured time to first token against FLOPs ratio",
              "ladder.png": "The plan's GSOP ladder",
              "visual_tokens.png": "AutoPrune: visual tokens entering each layer, per sample"}  # fmt: skip
    for name in report.get("plots", []):
        lines += ["", f"## {titles.get(name, name)}", "", f"![{titles.get(name, name)}]({name})"]
    return "\n".join(lines) + "\n"



def _quantized_markdown(configs: Sequence[dict[str, Any]]) -> list[str]:
    """The quantized builds against their float twins: answers changed and the logit gaps at the flips."""
    rows = [c for c in configs if c.get("float_twin")]
    if not rows:
        return []
    lines = ["", "## Quantized builds against their float twins", "",
             "Each quantized build answered every row through its graphs on ONNX Runtime; the float twin is the "
             "fp32 executor under the same plan (AutoPrune's schedule read from the table, as the graphs read "
             "it). **changed**: answers that differ from the twin's. At the first token that changed, the "
             "**float gap** is the twin's logit of its own token minus its logit of the quantized build's token: "
             "the margin the quantization error crossed. **logits error** is the largest |quantized - float| "
             "logit at the steps before any flip, where both saw the same tokens; a flip whose float gap is at "
             "most twice its maximum is a **near tie** (the build check's rule). **schedules changed**: rows whose "
             "visual tokens per layer differ from the twin's (a token policy that decided otherwise through the "
             "quantized graphs); a flip on such a row is the policy's decision, not rounding.",
             "",
             "| configuration | changed | float gap median | float gap max | near ties | logits error median | "
             "logits error max | schedules changed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for c in rows:
        t = c["float_twin"]
        err = t["agree_logits_error"]
        ties = "n/a" if t["near_ties"] is None else f"{t['near_ties']} of {t['changed']}"
        lines.append(f"| {c['name']} | {t['changed']} / {t['rows']} | {_fmt(t['float_gap']['median'], 3)} | "
                     f"{_fmt(t['float_gap']['max'], 3)} | {ties} | {_fmt(err['median'], 3)} | {_fmt(err['max'], 3)} | "
                     f"{t.get('schedules_changed', 'n/a')} |")
    lines += ["", "| configuration | data line | step | float answer | quantized answer | float gap | "
              "quantized gap | logits error | same schedule |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in rows:
        for f in c["float_twin"]["flips"]:
            lines.append(f"| {c['name']} | {f['line']} | {f['step']} | `{f['float_answer']!r}` | "
                         f"`{f['quantized_answer']!r}` | {f['float_gap']:.3f} | {f['quantized_gap']:.3f} | "
                         f"{f['logits_error']:.3f} | {'yes' if f.get('same_schedule', True) else 'no'} |")
    return lines
