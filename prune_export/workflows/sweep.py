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
@dataclass(frozen=True)
class SweepConfig:
    """One point of the trade-off. ``name`` is its file name in the report directory."""

    method: str  # one of METHODS
    budget: float | None = None  # gsop: fraction of dense prefill FLOPs kept (plan ladder)
    tokens: float | None = None  # autoprune: T, average visual tokens per layer
    stages: tuple[tuple[int, int], ...] | None = None  # fixed: (layer, tokens) stages

    @property
    def name(self) -> str:
        if self.method == "gsop":
            return f"gsop-{_num(self.budget)}"
        if self.method == "autoprune":
            return f"autoprune-{_num(self.tokens)}"
        if self.method == "fixed":
            return "fixed-" + "-".join(f"{layer}x{count}" for layer, count in self.stages or ())
        return "dense"

    @property
    def label(self) -> str:
        """How the report names it: the options that reproduce it with ``eval`` or ``build``."""
        if self.method == "gsop":
            return f"--plan PLAN --budget {_num(self.budget)}"
        if self.method == "autoprune":
            return f"--autoprune-tokens {_num(self.tokens)}"
        if self.method == "fixed":
            return "--keep-schedule " + ",".join(f"{layer}:{count}" for layer, count in self.stages or ())
        return "dense"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "label": self.label, "budget": self.budget,
                "tokens": self.tokens, "stages": [list(s) for s in self.stages] if self.stages else None}  # fmt: skip


def _num(x: float | None) -> str:
    return f"{x:g}"


def parse_config(text: str) -> SweepConfig:
    """``dense``, ``gsop:B``, ``autoprune:T`` or ``fixed:LAYER:TOKENS[,LAYER:TOKENS...]``."""
    from prune_core.tokens import parse_keep_schedule

    method, _, value = text.strip().partition(":")
    method = method.strip().lower()
    if method not in METHODS:
        raise SweepError(f"--config {text!r}: unknown method {method!r}; use one of {', '.join(METHODS)} "
                         "(dense, gsop:BUDGET, autoprune:TOKENS, fixed:LAYER:TOKENS[,...])")
    if method == "dense":
        if value:
            raise SweepError(f"--config {text!r}: dense takes no value; write --config dense")
        return SweepConfig("dense")
    if not value:
        raise SweepError(f"--config {text!r}: {method} needs a value ({method}:...)")
    if method == "fixed":
        return SweepConfig("fixed", stages=tuple(parse_keep_schedule(value)))
    try:
        number = float(value)
    except ValueError:
        raise SweepError(f"--config {text!r}: {value!r} is not a number") from None
    return SweepConfig("gsop", budget=number) if method == "gsop" else SweepConfig("autoprune", tokens=number)


def parse_numbers(text: str | None, option: str) -> list[float]:
    """``"1,0.7,0.5"`` -> ``[1.0, 0.7, 0.5]``, or one line naming ``option``."""
    if not text:
        return []
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SweepError(f"{option} {text!r} is not a comma-separated list of numbers (e.g. 0.7,0.5,0.3)") from None


def sweep_configs(*, plan_path: Path | None, budgets: Sequence[float], autoprune_tokens: Sequence[float],
                  keep_schedules: Sequence[Sequence[tuple[int, int]]], extra: Sequence[SweepConfig] = ()) -> list[SweepConfig]:
    """The configurations of a sweep, dense first, each once, in the order given; checked before any work."""
    from prune_core.plan import BudgetError, check_budget

    configs = [SweepConfig("dense")]
    configs += [SweepConfig("gsop", budget=b) for b in budgets]
    configs += [SweepConfig("autoprune", tokens=t) for t in autoprune_tokens]
    configs += [SweepConfig("fixed", stages=tuple(tuple(s) for s in stages)) for stages in keep_schedules]  # type: ignore[misc]
    configs += list(extra)
    out: list[SweepConfig] = []
    for config in configs:
        if config.method == "gsop":
            try:
                check_budget(config.budget)  # type: ignore[arg-type]
            except BudgetError as exc:
                raise SweepError(f"{exc}; fix --budgets") from None
            if plan_path is None:
                raise SweepError("--budgets (gsop configurations) need --plan PLAN.json, the searched plan whose "
                                 "ladder the budgets pick from")
        if config.method == "autoprune" and not (config.tokens is not None and config.tokens > 0):
            raise SweepError(f"--autoprune-tokens {config.tokens:g} must be > 0 (average visual tokens per layer)")
        if config.name not in {c.name for c in out}:
            out.append(config)
    if len(out) == 1 and plan_path is None:
        raise SweepError("nothing to compare with dense: pass --plan with --budgets, --autoprune-tokens, "
                         "--keep-schedule or --config")
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

    def differences(self, other: dict[str, Any]) -> list[str]:
        """Fields whose value changes the numbers and differs from ``other`` (paths may move)."""
        keys = ("model_fingerprint", "weights", "data_sha256", "limit", "max_new_tokens", "device", "dtype", "plan_sha256")
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
    """Evaluate (and with ``settings.latency`` build and time) every configuration; write the report."""
    from calib.data import load_rows
    from exporter.adapters import load_adapter, load_spec
    from prune_core.device import resolve_device, torch_dtype
    from prune_core.plan import Plan


    settings = settings or SweepSettings()
    if not Path(model_dir, "config.json").is_file():
        raise SweepError(f"{model_dir} is not a model folder (no config.json); pass the HuggingFace model folder")
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
    inputs = SweepInputs(
        model=str(model_dir), model_fingerprint=spec.fingerprint(), weights=_weight_files(model_dir),
        data=str(data_path),
        data_sha256=_sha256(Path(data_path)), rows=len(rows), limit=limit, max_new_tokens=max_new_tokens,
        device=device, dtype=dtype, plan=None if plan_path is None else str(plan_path),
        plan_sha256=None if plan_path is None else _sha256(Path(plan_path)),
    )  # fmt: skip
    _open_report_dir(out, inputs, settings.overwrite, log)
    result = SweepResult(report={})
    records: dict[str, dict[str, Any]] = {}
    todo = []
    reference_path = out / "reference.npz"
    for config in configs:
        record = _load_finished(out / "configs" / f"{config.name}.json", config)
        if record is not None and (config.method != "dense" or reference_path.is_file()):
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
            _evaluate_all(todo, rows, out, records, result, choices, adapter, spec, reference, max_new_tokens)
        except KeyboardInterrupt:
            log(f"interrupted: {len(records)} finished configuration(s) are kept in {out}; run the same command "
                "again to do the rest")
            raise
    latency = None
    if settings.latency:
        latency = _latency(model_dir, out, configs, choices, rows[0], settings, result, log)
    result.report = write_report(out, configs, records, inputs, plan, latency, result, spec)
    return result


def _evaluate_all(todo: Sequence[SweepConfig], rows: Sequence[Any], out: Path, records: dict[str, dict[str, Any]],
                  result: SweepResult, choices: dict[str, Any], adapter: Any, spec: Any, reference: Any,
                  max_new_tokens: int) -> None:
    """Evaluate ``todo`` (dense first: its answers are the others' reference), saving each as it finishes."""
    from tqdm import tqdm

    from calib.evaluate import DENSE, evaluate

    from .selection import token_policy

    reference_path = out / "reference.npz"
    with tqdm(total=len(todo) * len(rows), desc="sweep", unit="sample", file=sys.stderr, disable=None) as bar:
        for config in sorted(todo, key=lambda c: c.method != "dense"):  # dense first: the reference
            bar.set_postfix_str(config.name)
            choice = choices[config.name]
            policy = token_policy(choice.tokens, spec, "exact")
            answers: dict[int, Any] | None = {} if config.method == "dense" else None
            report = evaluate(adapter, rows, choice.ops, policy, max_new_tokens=max_new_tokens,
                              progress=bar.update, reference=DENSE if config.method == "dense" else reference,
                              answers_out=answers)  # fmt: skip
            if answers is not None:
                _save_reference(reference_path, answers, max_new_tokens)
                reference = _load_reference(reference_path)
            record = {"config": config.to_json(), "plan": choice.info, "eval": report.to_json(with_samples=True)}
            atomic_write_json(out / "configs" / f"{config.name}.json", record)
            records[config.name] = record
            result.computed.append(config.name)
            bar.write(_summary_line(config, report.to_json()))


def _choose(model_dir: Path, plan_path: Path | None, config: SweepConfig) -> Any:
    """What one configuration prunes, resolved as ``eval`` resolves the same options."""
    from .selection import PlanRequest, choose_plan

    if config.method == "gsop":
        request = PlanRequest(plan_path=plan_path, budget=config.budget)
    elif config.method == "autoprune":
        request = PlanRequest(autoprune={"tokens": config.tokens})
    elif config.method == "fixed":
        request = PlanRequest(stages=list(config.stages or ()))
    else:
        request = PlanRequest()
    return choose_plan(model_dir, request)[1]


def _summary_line(config: SweepConfig, ev: dict[str, Any]) -> str:
    acc = "n/a" if ev["accuracy"] is None else f"{ev['accuracy']:.4f}"
    agree = "n/a" if ev["agreement"] is None else f"{ev['agreement']:.4f}"
    return (f"{config.name:<24} accuracy {acc}  agreement {agree}  FLOPs ratio {ev['flops_ratio']:.4f}  "
            f"({ev['seconds']:.1f} s)")


# -- latency -----------------------------------------------------------------------------------------------
def _latency(model_dir: Path, out: Path, configs: Sequence[SweepConfig], choices: dict[str, Any], row: Any,
             settings: SweepSettings, result: SweepResult, log: Log) -> dict[str, Any]:
    """Build every configuration (kept builds are not redone) and time each build's first token, interleaved."""
    from prune_core.manifest import Manifest

    from .build import BuildSettings, build
    from .measure import time_first_token

    builds = out / "builds"
    builds.mkdir(exist_ok=True)
    bs = BuildSettings(check=not settings.skip_check, max_text_tokens=settings.max_text_tokens,
                       max_sys_tokens=settings.max_sys_tokens, provider=settings.provider,
                       device=settings.device, overwrite=True)  # fmt: skip
    for i, config in enumerate(configs):
        target = builds / config.name
        if (target / "manifest.json").is_file():
            why_not = _why_not_reuse(target, choices[config.name].info, bs)
            if why_not is None:
                log(f"kept the build {target} (same plan, bounds and precision; check "
                    f"{Manifest.load(target, verify='none').check.status})")  # fmt: skip
                continue
            log(f"{target} is not this configuration's build ({why_not}); building it again")
        log(f"[{i + 1}/{len(configs)}] building {config.name} into {target}")
        build(model_dir, target, choices[config.name], bs, log)
        result.built.append(config.name)
    path = out / "latency.json"
    names = [c.name for c in configs]
    timing = {"builds": names, "rounds": settings.rounds, "warmup": settings.warmup, "threads": settings.threads,
              "provider_option": settings.provider}  # fmt: skip
    if path.is_file() and not result.built:
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


def _why_not_reuse(target: Path, plan_info: dict[str, Any], settings: Any) -> str | None:
    """Why a kept build cannot stand for this configuration now (None: it can): another plan, other bounds or
    precision, files that differ from its manifest, or no passed check where this sweep checks its builds."""
    from prune_core.manifest import Manifest

    try:
        manifest = Manifest.load(target, verify="full")
    except PruneExportError as err:
        return str(err).split(";")[0]
    if manifest.plan != json.loads(json.dumps(plan_info)):
        return "another plan"
    wanted = {"dtype": settings.dtype, "target": settings.target, "quantization": None,
              "max_text_tokens": settings.max_text_tokens, "max_sys_tokens": settings.max_sys_tokens}
    found = {"dtype": manifest.dtype, "target": manifest.target, "quantization": manifest.quantization,
             "max_text_tokens": manifest.shape_ranges.get("text_len", [None] * 3)[2],
             "max_sys_tokens": manifest.shape_ranges.get("sys_len", [None] * 3)[2]}
    differs = [key for key in wanted if wanted[key] != found[key]]
    if differs:
        return "another " + ", ".join(differs)
    if settings.check and manifest.check.status != "passed":
        return f"its check was {manifest.check.status}, and this sweep checks its builds"
    return None


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
        }  # fmt: skip
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
        if config.method == "autoprune":
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
    titles = {"fidelity.png": "Accuracy, retention, agreement and first-token KL against FLOPs ratio",
              "latency.png": "Measured time to first token against FLOPs ratio",
              "ladder.png": "The plan's GSOP ladder",
              "visual_tokens.png": "AutoPrune: visual tokens entering each layer, per sample"}  # fmt: skip
    for name in report.get("plots", []):
        lines += ["", f"## {titles.get(name, name)}", "", f"![{titles.get(name, name)}]({name})"]
    return "\n".join(lines) + "\n"

