"""The ``prune-export`` command line: a thin layer that maps options onto workflow calls and prints.

Each command calls one workflow (:mod:`prune_export.workflows`); the CLI itself never imports a stage
(calib, exporter, graph_passes, engines). Errors a user can cause
(:class:`~prune_core.errors.PruneExportError`) print one line and exit 1; anything else is a bug and keeps
its traceback. Heavy imports (torch, transformers) happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import click

from prune_core import defaults
from prune_core.device import provider_for
from prune_core.errors import PruneExportError
from prune_core.ops import Operation
from prune_core.precision import TARGETS

from .options import (
    device_option,
    dtype_option,
    json_option,
    max_new_tokens_option,
    plan_options,
    torch_options,
)

PROVIDER_CHOICE = click.Choice(["auto", "cpu", "cuda"])


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PruneExportError as exc:
            raise click.ClickException(str(exc)) from None


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))


def _tflops(flops: float) -> str:
    return f"{flops / 1e12:.4f} TFLOPs" if flops >= 1e10 else f"{flops / 1e9:.4f} GFLOPs"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version("prune-export"), prog_name="prune-export")
def main() -> None:
    """Compile pruning plans of LLaVA-family VLMs into ONNX / TensorRT engines and measure the speedup."""


# -- demo-model / demo-data -------------------------------------------------------------------------------
@main.command("demo-model")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(["tiny", "bench", "llava-7b"]), default="tiny", show_default=True,
              help="tiny: seconds to build, for tests; bench: 576 visual tokens, hidden 1024, 8 layers; llava-7b: "
                   "LLaVA-1.5-7B's shapes (7.06 B parameters, 14 GB in fp16).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--kv-heads", type=int, default=None, help="Override the number of KV heads (GQA).")
@click.option("--layers", type=click.IntRange(min=2), default=None, help="Override the number of decoder layers.")
@dtype_option("Precision the weights are made and written in [default: fp32; llava-7b: fp16, never an fp32 copy].",
              name="dtype")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
def demo_model(out_dir: Path, preset: str, seed: int, kv_heads: int | None, layers: int | None, dtype: str | None,
               overwrite: bool) -> None:
    """Write a random LLaVA-1.5-architecture model (weights as safetensors shards, tokenizer, processor)."""
    import time

    from .workflows.model import demo_model as write_demo_model

    started = time.perf_counter()
    path = write_demo_model(out_dir, preset, seed=seed, kv_heads=kv_heads, overwrite=overwrite, dtype=dtype, layers=layers)
    click.echo(f"wrote {preset} demo model to {path} in {time.perf_counter() - started:.1f} s")


@main.command("demo-data")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--samples", type=int, default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def demo_data(out_dir: Path, samples: int, seed: int) -> None:
    """Write a synthetic VQA data set (coloured shapes) as OUT_DIR/data.jsonl + images."""
    from .workflows.model import demo_data as write_demo_data

    path = write_demo_data(out_dir, samples=samples, seed=seed)
    click.echo(f"wrote {samples} rows to {path}")


# -- info -----------------------------------------------------------------------------------------------
@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--text-tokens", type=click.IntRange(min=1), default=None,
              help="Text tokens after the image in the reference prompt [default: 100].")
@json_option()
def info(model_dir: Path, text_tokens: int | None, as_json: bool) -> None:
    """Architecture, token groups, operations and dense prefill FLOPs (needs only config.json)."""
    from .workflows.model import model_info

    d = model_info(model_dir, text_tokens)
    if as_json:
        _echo_json(d)
        return
    dense = d["dense_prefill_flops"]
    click.echo(f"{model_dir}  ({d['family']}, fingerprint {d['fingerprint']})")
    click.echo(f"  decoder      {d['layers']} layers, hidden {d['hidden_size']}, MLP {d['intermediate_size']}, "
               f"{d['heads']} heads / {d['kv_heads']} KV heads x {d['head_dim']}")
    click.echo(f"  vision       {d['image_size']} px / patch {d['patch_size']} -> {d['visual_tokens']} visual tokens "
               f"({d['spec']['vision_layers']} layers, hidden {d['spec']['vision_hidden_size']})")
    groups = ", ".join(f"{k} {v}" for k, v in d["groups"].items())
    click.echo(f"  prompt       {d['prompt_tokens']} tokens: {groups} (sys from {d['sys_tokens_from']})")
    click.echo(f"  operations   {d['operations']} ({d['prunable_operations']} on image groups)")
    click.echo(f"  dense prefill {_tflops(dense)} ({dense:,} FLOPs)")


# -- plan -----------------------------------------------------------------------------------------------
@main.group(cls=_Group)
def plan() -> None:
    """Inspect plan files."""


@plan.command("show")
@click.argument("plan_path", type=click.Path(path_type=Path))
@click.option("--budget", type=float, default=None, help="Fraction of dense prefill FLOPs kept, in (0, 1].")
@json_option()
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw the ladder (FLOPs ratio and search metric per step) into this PNG file.")
def plan_show(plan_path: Path, budget: float | None, as_json: bool, plot_path: Path | None) -> None:
    """Print the FLOPs ladder of PLAN_PATH and the operations active at a budget."""
    from prune_core.plan import Plan

    p = Plan.load(plan_path)
    sel = p.select(budget) if budget is not None else None
    if plot_path is not None:
        from .plots import plan_ladder_plot

        if plot_path.suffix.lower() != ".png":
            raise PruneExportError(f"--plot {plot_path}: the plot is a PNG; give a file name ending in .png")
        plan_ladder_plot(p, plot_path, budget)
        click.echo(f"wrote {plot_path}", err=as_json)
    steps = [
        {"step": i, "ops_added": len(ops), "flops_ratio": p.ladder[i + 1], "metric": p.doc.steps[i].metric}
        for i, ops in enumerate(p.steps)
    ]
    tokens = p.tokens.model_dump() if p.tokens is not None else None
    if as_json:
        out: dict[str, Any] = {"fingerprint": p.fingerprint, "layout": p.layout.as_dict(), "steps": steps,
                               "search": p.doc.search, "tokens": tokens}
        if sel is not None:
            out["budget"] = {"budget": sel.budget, "steps": sel.num_steps, "flops_ratio": sel.flops_ratio,
                             "ops": [op.to_json() for op in sorted(sel.ops)]}
        _echo_json(out)
        return
    click.echo(f"plan {plan_path} for {p.spec.family} ({p.spec.num_layers} layers, fingerprint {p.fingerprint})")
    click.echo(f"layout: {', '.join(f'{k} {v}' for k, v in p.layout.as_dict().items())}")
    if p.doc.search:
        s = p.doc.search
        click.echo(f"search: metric {s.get('metric')}, baseline {s.get('baseline')}")
    click.echo(f"{'step':>4}  {'+ops':>5}  {'total':>5}  {'FLOPs ratio':>11}  metric")
    total = 0
    for row in steps:
        total += row["ops_added"]
        metric = "" if row["metric"] is None else f"{row['metric']:.4g}"
        mark = " <" if sel is not None and row["step"] == sel.num_steps - 1 else ""
        click.echo(f"{row['step']:>4}  {row['ops_added']:>5}  {total:>5}  {row['flops_ratio']:>11.4f}  {metric}{mark}")
    if tokens is not None:
        click.echo("tokens: " + ", ".join(f"{k}={v}" for k, v in tokens.items()))
        if tokens.get("kind") == "autoprune":
            click.echo(_describe_autoprune(p.tokens, p.spec))
    if sel is not None:
        click.echo(f"budget {sel.budget}: {sel.num_steps} step(s), {len(sel.ops)} operations, "
                   f"FLOPs ratio {sel.flops_ratio:.4f}")
        click.echo(_describe_ops(sel.ops, p.spec.num_layers))


def _describe_autoprune(section: Any, spec: Any) -> str:
    """The two ends of an AutoPrune section's schedules on the plan's model (k = k0 and k = 0)."""
    from prune_core.autoprune import solve_scale

    ends = []
    for k, label in ((max(section.k0, 0.0), "k=k0 (no mutual information)"), (0.0, "k=0 (flat, most complex)")):
        try:
            sol = solve_scale(k, section.tokens, spec.num_layers, spec.visual_tokens, section.x0, section.amplitude)
        except (PruneExportError, ValueError) as exc:
            return f"  (no schedule for this model: {exc})"
        ends.append(f"    {label:<30} {' '.join(map(str, sol.tokens_per_layer))}  (mean {sol.mean:.2f})")
    head = f"  AutoPrune schedules, visual tokens leaving layers 0..{spec.num_layers - 1} (N0 first):"
    return "\n".join([head, *ends])


def _describe_ops(ops: frozenset[Operation], num_layers: int) -> str:
    lines = []
    for layer in range(num_layers):
        here = sorted(op for op in ops if op.layer == layer)
        if here:
            lines.append(f"  layer {layer:>3}: " + " ".join(f"{op.group.value}.{op.module.value}" for op in here))
    return "\n".join(lines) if lines else "  (no operations pruned: dense)"


# -- search ---------------------------------------------------------------------------------------------
@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--calib", "calib_path", type=click.Path(path_type=Path), required=True,
              help="Calibration JSONL (the eval format; answers optional with --metric kl).")
@click.option("--out", "out_path", type=click.Path(path_type=Path), required=True, help="Plan file to write.")
@click.option("--metric", type=click.Choice(["accuracy", "nll", "kl"]), default=defaults.SEARCH_METRIC, show_default=True,
              help="accuracy: exact match (higher is better); nll: answer NLL, kl: KL to the dense model "
                   "(label-free); both lower is better.")
@click.option("--tolerance", type=float, default=defaults.SEARCH_TOLERANCE, show_default=True,
              help="Total loss allowed: a fraction of the baseline (accuracy) or metric units (nll, kl).")
@click.option("--steps", type=click.IntRange(min=1), default=defaults.SEARCH_STEPS, show_default=True,
              help="Tolerance levels.")
@click.option("--key-danger-layers", type=click.IntRange(min=0), default=defaults.KEY_DANGER_LAYERS, show_default=True,
              help="img_key operations below this layer are never pruned.")
@click.option("--allow-layer0-kv", is_flag=True, help="Offer layer-0 kv operations as candidates.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N calibration rows.")
@click.option("--resume", is_flag=True, help="Continue an interrupted search from its journal (OUT.journal.jsonl).")
@click.option("--no-prefix-reuse", is_flag=True, help="Recompute every layer for every candidate (slower).")
@click.option("--seed", type=int, default=0, show_default=True)
@torch_options()
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Calibration rows per forward (padded and masked; values equal row by row to ~1e-7). "
                   "Raise it on a GPU.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ray workers, each holding the model and a shard of the calibration rows (one GPU each "
                   "with --device cuda). 1: no Ray. Needs pip install \"prune-export[ray]\".")
@click.option("--ray-address", default=None,
              help="Join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting a local "
                   "instance on 127.0.0.1.")
@click.option("--threads-per-worker", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU threads of each Ray worker (CPU only; the serial run's thread count gives the "
                   "serial run's exact values).")
def search(model_dir: Path, calib_path: Path, out_path: Path, metric: str, tolerance: float, steps: int,
           key_danger_layers: int, allow_layer0_kv: bool, limit: int | None, resume: bool,
           no_prefix_reuse: bool, seed: int, device: str | None, torch_dtype: str | None, batch_size: int,
           workers: int, ray_address: str | None, threads_per_worker: int) -> None:
    """Search the GSOP operation order on calibration data and write the plan.

    Every finished evaluation is journaled next to the plan; after an interruption (even kill -9) rerun
    the same command with --resume (with any --workers): no finished evaluation is redone and the plan is
    the same. With --workers N the calibration rows are split over N Ray workers; a worker that dies has
    its rows taken over by another.
    """
    from .workflows.search import search as run_search

    out = run_search(model_dir, calib_path, out_path, metric=metric, tolerance=tolerance, steps=steps,
                     key_danger_layers=key_danger_layers, protect_layer0_kv=not allow_layer0_kv, limit=limit,
                     resume=resume, prefix_reuse=not no_prefix_reuse, seed=seed, device=device or defaults.TORCH_DEVICE,
                     dtype=torch_dtype or defaults.TORCH_DTYPE, workers=workers, ray_address=ray_address,
                     batch_size=batch_size, threads_per_worker=threads_per_worker, log=_log_err)
    result, stats = out.result, out.stats
    click.echo(f"wrote {out_path}: {len(out.plan.steps)} steps, metric {out.metric} baseline "
               f"{result.baseline:.4f}, last step FLOPs ratio {out.plan.ladder[-1]:.4f}")
    where = f" on {out.workers} Ray workers (summed)" if out.workers > 1 else ""
    click.echo(f"evaluations: {result.evaluations_run} run + {result.evaluations_from_journal} from the journal "
               f"({result.naive_evaluations} for a naive greedy), {stats.seconds:.1f} s evaluating{where}, "
               f"{result.wall_seconds:.1f} s wall, {stats.layer_fraction:.0%} of decoder layers computed "
               "(prefix reuse)")


# -- eval -----------------------------------------------------------------------------------------------
@main.command("eval")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--data", "data_path", type=click.Path(path_type=Path), required=True,
              help="JSONL rows {image, question, answer}; image paths relative to the file.")
@plan_options(mode=True)
@max_new_tokens_option(defaults.EVAL_NEW_TOKENS, "Largest number of answer tokens per row.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N rows.")
@json_option()
@click.option("--samples-out", type=click.Path(path_type=Path), default=None, help="Write per-sample results (JSONL).")
@device_option("cpu, cuda or cuda:N: where PyTorch runs the model; for a build directory, the ONNX Runtime "
               "provider (cpu or cuda) [default: cpu; a build: auto].")
@dtype_option("Precision of the PyTorch model (metrics stay fp32) [default: fp32]; a build's is baked in.")
@click.option("--reference", "reference_path", type=click.Path(path_type=Path), default=None,
              help="Where the dense answers that agreement compares with come from: a model folder (its executor, "
                   "fp32) or a dense build [default: the model itself without pruning; for a build, the model "
                   "folder in its manifest].")
@click.option("--no-reference", is_flag=True, help="Skip agreement and first-token KL (no dense answers computed).")
def eval_cmd(model_dir: Path, data_path: Path, request: Any, max_new_tokens: int, limit: int | None, as_json: bool,
             samples_out: Path | None, device: str | None, torch_dtype: str | None, reference_path: Path | None,
             no_reference: bool) -> None:
    """Exact-match accuracy of greedy answers and prefill FLOPs, dense vs under a plan, and the answers'
    agreement with the dense model's (label-free: the fraction of identical answers, and the KL divergence of
    the first answer token's distribution from the dense one).

    MODEL_DIR is a HuggingFace model folder (answers from the PyTorch executor) or a build directory (answers
    from its graphs on ONNX Runtime; the plan is baked in, so plan options are refused there).

    Token pruning comes from the plan's token section, --keep-schedule, or --autoprune-tokens; with a plan's
    GSOP operations it makes a combined plan (operations apply to the visual tokens still alive).
    """
    if (Path(model_dir) / "manifest.json").is_file():
        from .workflows.evaluate import evaluate_build

        run = evaluate_build(model_dir, data_path, request, dtype=torch_dtype, max_new_tokens=max_new_tokens,
                             limit=limit, samples_out=samples_out, device=device, reference_path=reference_path,
                             compare=not no_reference)  # fmt: skip
        if as_json:
            missing = {"reference_missing": run.reference_missing} if run.reference_missing else {}
            _echo_json({**run.report.to_json(), "engine": run.engine, "provider": run.provider, **missing})
            return
        click.echo(f"build         {model_dir} ({run.engine}, {run.provider})")
        _echo_eval(run.report, None, False, missing=run.reference_missing)
        return
    from .workflows.evaluate import evaluate_model

    where = {"device": device or defaults.TORCH_DEVICE, "dtype": torch_dtype or defaults.TORCH_DTYPE}
    run = evaluate_model(model_dir, data_path, request, max_new_tokens=max_new_tokens, limit=limit,
                         samples_out=samples_out, reference_path=reference_path, compare=not no_reference, **where)
    _echo_eval(run.report, run.policy, as_json, where)


def _echo_eval(report: Any, policy: Any, as_json: bool, where: dict[str, str] | None = None,
               missing: str | None = None) -> None:
    """Print an eval report (``calib.evaluate.EvalReport``), the token policy it ran and where it ran."""
    if as_json:
        _echo_json({**report.to_json(), **(where or {})})
        return
    if where:
        click.echo(f"model         {where['device']}, {where['dtype']}")
    acc = "n/a" if report.accuracy is None else f"{report.accuracy:.4f}"
    click.echo(f"samples       {report.samples}")
    click.echo(f"accuracy      {acc} (exact match)")
    if report.agreement is not None:
        same = sum(1 for r in report.results if r.agrees)
        click.echo(f"agreement     {report.agreement:.4f} ({same} of {report.samples} answers identical to the "
                   f"dense model's; reference: {report.reference})")
        click.echo(f"first-token KL {report.mean_first_token_kl:.4g} nats (mean KL(dense || this) of the first "
                   "answer token)")
    elif missing:
        click.echo(f"agreement     n/a ({missing})")
    click.echo(f"dense FLOPs   {_tflops(report.dense_flops / report.samples)} per sample")
    click.echo(f"pruned FLOPs  {_tflops(report.pruned_flops / report.samples)} per sample")
    click.echo(f"FLOPs ratio   {report.flops_ratio:.4f} (mean per sample {report.mean_flops_ratio:.4f})")
    if policy is not None:
        click.echo(f"token policy  {policy!r}")
    click.echo("visual tokens entering each layer (mean): "
               + " ".join(f"{v:.1f}" for v in report.mean_visual_tokens_per_layer))


def _keep_schedule(text: str) -> list[tuple[int, int]]:
    from prune_core.tokens import parse_keep_schedule

    return parse_keep_schedule(text)


# -- sweep ----------------------------------------------------------------------------------------------
@main.command("sweep")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--data", "data_path", type=click.Path(path_type=Path), required=True,
              help="JSONL rows {image, question, answer}; image paths relative to the file.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Report directory (created; an interrupted sweep of the same inputs resumes in it).")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), default=None,
              help="Searched plan: its ladder for --budgets, and its ladder plot.")
@click.option("--budgets", default=None, help="GSOP budgets from the plan's ladder, e.g. 0.9,0.7,0.5 (each in (0, 1]).")
@click.option("--autoprune-tokens", default=None, help="AutoPrune budgets T, e.g. 192,128,64.")
@click.option("--keep-schedule", "keep_schedules", multiple=True,
              help="A fixed schedule LAYER:TOKENS[,...] (FastV, PDrop); repeat for several.")
@click.option("--config", "extra_configs", multiple=True,
              help="Another configuration: gsop:BUDGET, autoprune:T or fixed:LAYER:TOKENS[,...]; repeatable.")
@click.option("--latency", is_flag=True,
              help="Also build every configuration (REPORT_DIR/builds) and time its first token against dense.")
@click.option("--rounds", type=click.IntRange(min=1), default=defaults.SWEEP_ROUNDS, show_default=True,
              help="--latency: timed rounds.")
@click.option("--warmup", type=click.IntRange(min=0), default=defaults.SWEEP_WARMUP, show_default=True,
              help="--latency: untimed rounds.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="--latency: ONNX Runtime threads.")
@click.option("--skip-check", is_flag=True, help="--latency: build without the parity check against the executor.")
@max_new_tokens_option(defaults.EVAL_NEW_TOKENS, "Largest number of answer tokens per row.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N rows.")
@torch_options()
@click.option("--overwrite", is_flag=True, help="Discard a report directory that holds a sweep of other inputs.")
@json_option("Print the report as one JSON object.")
def sweep_cmd(model_dir: Path, data_path: Path, out_dir: Path, plan_path: Path | None, budgets: str | None,
              autoprune_tokens: str | None, keep_schedules: tuple[str, ...], extra_configs: tuple[str, ...],
              latency: bool, rounds: int, warmup: int, threads: int | None, skip_check: bool, max_new_tokens: int,
              limit: int | None, device: str | None, torch_dtype: str | None, overwrite: bool, as_json: bool) -> None:
    """Accuracy, agreement with dense and FLOPs of every configuration (dense, GSOP budgets, AutoPrune budgets,
    fixed schedules) on DATA, with --latency the measured time to first token of each build, written to
    REPORT_DIR as report.json, report.md and PNG plots.

    Each configuration is evaluated as `eval` with the same options evaluates it. Finished configurations are
    kept in REPORT_DIR: run the same command again after an interruption and only the rest is done.
    """
    from .workflows.sweep import SweepSettings, parse_config, parse_numbers, run_sweep, sweep_configs

    configs = sweep_configs(
        plan_path=plan_path, budgets=parse_numbers(budgets, "--budgets"),
        autoprune_tokens=parse_numbers(autoprune_tokens, "--autoprune-tokens"),
        keep_schedules=[_keep_schedule(text) for text in keep_schedules],
        extra=[parse_config(text) for text in extra_configs],
    )  # fmt: skip
    settings = SweepSettings(latency=latency, rounds=rounds, warmup=warmup, threads=threads, skip_check=skip_check,
                             overwrite=overwrite, device=device or defaults.TORCH_DEVICE, provider=provider_for(device))  # fmt: skip
    result = run_sweep(model_dir, data_path, out_dir, configs, plan_path=plan_path, max_new_tokens=max_new_tokens,
                       limit=limit, device=device or defaults.TORCH_DEVICE, dtype=torch_dtype or defaults.TORCH_DTYPE,
                       settings=settings,
                       log=_log_err)  # fmt: skip
    if as_json:
        _echo_json(result.report)
        return
    lat = result.report.get("latency")
    click.echo(f"{'configuration':<24} {'accuracy':>8} {'retention':>9} {'agreement':>9} {'KL nats':>9} "
               f"{'FLOPs':>7}" + (f" {'TTFT ms':>8} {'speed-up':>8}" if lat else ""))
    for row in result.report["configs"]:
        def f(x: float | None, w: int, d: int = 4) -> str:
            return f"{'n/a':>{w}}" if x is None else f"{x:>{w}.{d}f}"

        line = (f"{row['name']:<24} {f(row['accuracy'], 8)} {f(row['retention'], 9)} {f(row['agreement'], 9)} "
                f"{f(row['mean_first_token_kl'], 9, 5)} {f(row['flops_ratio'], 7, 3)}")
        if lat:
            line += f" {row['latency']['ttft_ms']:>8.1f} {row['latency']['ttft_speedup']:>7.2f}x"
        click.echo(line)
    click.echo(f"{len(result.computed)} configuration(s) evaluated, {len(result.kept)} kept from before"
               + (f", {len(result.built)} built" if latency else ""))
    click.echo(f"report: {out_dir / 'report.md'}, {out_dir / 'report.json'}; plots: "
               + ", ".join(str(out_dir / name) for name in result.report["plots"]))


# -- autoprune-schedule ---------------------------------------------------------------------------------
@main.command("autoprune-schedule")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--tokens", type=float, required=True, help="Budget T: average visual tokens per layer.")
@click.option("--k", "k", type=float, required=True,
              help="Steepness k = max(k0 - gamma*I1, 0): k0 (0.4) for a prompt with no mutual information, "
                   "0 (flat curve) for a very complex one.")
@click.option("--x0", type=float, default=None, help="Curve midpoint x0 [default: 14.9].")
@click.option("--amplitude", type=float, default=None, help="Curve height A [default: 0.75].")
@click.option("--table", "use_table", is_flag=True,
              help="Read the row an engine would use (grid k nearest to --k, clamped to [0, k0]) instead of "
                   "solving at --k.")
@click.option("--k0", type=float, default=None, help="With --table: the grid's last point [default: 0.4].")
@click.option("--k-step", type=float, default=None, help="With --table: the grid step [default: 0.01].")
@click.option("--text-tokens", type=click.IntRange(min=1), default=None,
              help="Text tokens of the reference prompt for the FLOPs ratio [default: 100].")
@json_option()
def autoprune_schedule(model_dir: Path, tokens: float, k: float, x0: float | None, amplitude: float | None,
                       use_table: bool, k0: float | None, k_step: float | None, text_tokens: int | None,
                       as_json: bool) -> None:
    """N0, the curve scale and the visual tokens leaving each layer of AutoPrune at budget T and steepness k.

    Needs only config.json. The FLOPs ratio is for the reference prompt (system tokens from the tokenizer
    or LLaVA-1.5's 35, all visual tokens, --text-tokens) with no GSOP operation pruned.
    """
    from .workflows.model import autoprune_schedule as schedule

    d = schedule(model_dir, tokens, k, x0=x0, amplitude=amplitude, use_table=use_table, k0=k0, k_step=k_step,
                 text_tokens=text_tokens)
    if as_json:
        _echo_json(d)
        return
    grid = f", table row k={d['schedule_k']:g}" if use_table else ""
    click.echo(f"AutoPrune schedule of {model_dir}: T={d['tokens']:g}, k={k:g}{grid}, {d['layers']} layers, "
               f"{d['visual_tokens']} visual tokens")
    click.echo(f"N0      {d['n0']} visual tokens leave layer 0")
    click.echo(f"scale   {d['scale']:.6f} (mean {d['mean']:.3f} visual tokens per layer, |mean - T| = {d['error']:.3f})")
    click.echo(f"FLOPs   {d['flops_ratio']:.4f} of dense prefill ({d['prompt']['sys']} sys + {d['visual_tokens']} "
               f"visual + {d['prompt']['txt']} text tokens)")
    click.echo(f"{'layer':>5}  {'keep':>5}  {'merged':>6}  {'leaving':>7}")
    click.echo(f"{0:>5}  {d['n0']:>5}  {0:>6}  {d['n0']:>7}")
    for layer, (kept, merged, leaving) in enumerate(
        zip(d["keep"], d["merged"], d["tokens_per_layer"][1:], strict=True), start=1
    ):
        click.echo(f"{layer:>5}  {kept:>5}  {merged:>6}  {leaving:>7}")


# -- build / inspect / bench ----------------------------------------------------------------------------
@main.command("build")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Build directory to write.")
@plan_options()
@dtype_option("Precision written into the graphs.", name="dtype", default=defaults.BUILD_DTYPE)
@click.option("--target", type=click.Choice(list(TARGETS)), default=defaults.TARGET, show_default=True,
              help="tensorrt: lint for TensorRT, bound every dynamic shape, split AutoPrune at the complexity signal.")
@click.option("--max-text-tokens", type=click.IntRange(min=1), default=defaults.MAX_TEXT_TOKENS, show_default=True)
@click.option("--max-sys-tokens", type=click.IntRange(min=1), default=defaults.MAX_SYS_TOKENS, show_default=True)
@max_new_tokens_option(defaults.BUILD_NEW_TOKENS, "Longest answer the build's decode graph is made for (its cache "
                       "range, TensorRT profiles); run, eval and deploy refuse more.")
@click.option("--provider", type=PROVIDER_CHOICE, default=defaults.PROVIDER, show_default=True,
              help="ONNX Runtime provider of the parity check.")
@device_option("Where PyTorch runs the model for the export and the parity check's reference: cpu, cuda, cuda:N.",
               default=defaults.TORCH_DEVICE)
@click.option("--low-memory", is_flag=True,
              help="With --dtype fp16/bf16: load and export the model in that precision, never an fp32 copy of the "
                   "weights (7B on a 24 GB machine); the check's reference then runs in that precision too.")
@click.option("--skip-check", is_flag=True, help="Do not check the graphs against the PyTorch executor.")
@click.option("--quantize", type=click.Choice(["int8", "int8-weights"]), default=None,
              help="int8: static int8 Q/DQ of the prefill and decode graphs' weight matmuls (weights and "
                   "activations, calibrated on --calib); int8-weights: weight-only int8. fp32 builds only.")
@click.option("--calib", "calib_path", type=click.Path(path_type=Path), default=None,
              help="Calibration JSONL of --quantize int8 (image/question rows; answers not needed).")
@click.option("--calib-rows", type=click.IntRange(min=1), default=defaults.QUANT_CALIB_ROWS, show_default=True,
              help="Calibration rows used by --quantize int8 (the first N).")
@click.option("--overwrite", is_flag=True, help="Replace an existing build directory.")
@json_option("Print the manifest as JSON.")
def build_cmd(model_dir: Path, out_dir: Path, request: Any, dtype: str, target: str, max_text_tokens: int,
              max_sys_tokens: int, max_new_tokens: int, provider: str, device: str, low_memory: bool, skip_check: bool,
              quantize: str | None, calib_path: Path | None, calib_rows: int, overwrite: bool, as_json: bool) -> None:
    """Bake a plan into vision.onnx + prefill.onnx, optimize them, check them, write manifest.json.

    Static GSOP operations are removed from the graph; token selection (fixed schedule, AutoPrune) is TopK
    inside it. The build directory appears only when everything passed.
    """
    from .workflows.build import BuildSettings, build
    from .workflows.selection import choose_plan

    settings = BuildSettings(target=target, dtype=dtype, max_text_tokens=max_text_tokens,
                             max_sys_tokens=max_sys_tokens, max_new_tokens=max_new_tokens, check=not skip_check, provider=provider,
                             device=device, low_memory=low_memory, overwrite=overwrite, quantize=quantize,
                             calib=calib_path, calib_rows=calib_rows)
    _, choice = choose_plan(model_dir, request)
    manifest = build(model_dir, out_dir, choice, settings, _log_err)
    if as_json:
        _echo_json(manifest.model_dump(mode="json"))
        return
    click.echo(f"wrote {out_dir}: {', '.join(g.file for g in manifest.graphs.values())}, manifest.json")
    quant = f", {manifest.quantization['mode']}" if manifest.quantization else ""
    click.echo(f"target {manifest.target}, {manifest.dtype}{quant}, prefill {manifest.prefill_layout}; check {manifest.check.status}"
               + (f" on {manifest.check.provider}" if manifest.check.provider else ""))
    for row in manifest.flops.get("check_prompts", []):
        click.echo(f"  check prompt of {row['tokens']} tokens: executed FLOPs ratio {row['ratio']:.4f}")
    if manifest.engines is not None:
        _echo_engines(manifest.engines)


def _echo_engines(report: Any) -> None:
    if report.status == "built":
        click.echo(f"TensorRT {report.tensorrt} engines: {', '.join(report.files.values())}")
    else:
        click.echo("no TensorRT engines: TensorRT is not installed here; run `prune-export engines BUILD_DIR` "
                   "where it is" if report.status == "not_built" else f"TensorRT engines failed: {report.reason}")


@main.command("engines")
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--workspace-gb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Cap on TensorRT's builder scratch memory [default: TensorRT's, the whole GPU].")
@click.option("--verbose", is_flag=True, help="TensorRT's verbose log (where the reason for a failed build is).")
def engines_cmd(build_dir: Path, workspace_gb: float | None, verbose: bool) -> None:
    """Build the TensorRT engines of a --target tensorrt build directory (one <graph>.plan per graph).

    Profiles come from the build's manifest; the manifest then records the engines. Needs TensorRT and an
    NVIDIA GPU; a build made elsewhere carries everything else.
    """
    from .workflows.build import build_engines

    _echo_engines(build_engines(build_dir, workspace_gb=workspace_gb, verbose=verbose, log=_log_err))


def _log_err(message: str) -> None:
    click.echo(message, err=True)


@main.command("inspect")
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--text-tokens", type=click.IntRange(min=1), default=None,
              help="Count for a prompt with this many text tokens [default: the build's check prompt].")
@click.option("--no-run", is_flag=True,
              help="Count by shape inference (ONNX's, then ONNX Runtime's symbolic) without running the graph (no weights loaded: builds too "
                   "large to run here, e.g. 7B fp16 on a CPU). Static plans only; KV lengths are not reported.")
@json_option()
def inspect_cmd(build_dir: Path, text_tokens: int | None, no_run: bool, as_json: bool) -> None:
    """Node counts by op type and matmul FLOPs of the prefill graph, computed from the graph itself."""
    from .workflows.measure import inspect_build

    doc = inspect_build(build_dir, text_tokens, run=not no_run)
    if as_json:
        _echo_json(doc)
        return
    p = doc["prompt"]
    quant = f", {doc['quantization']}" if doc.get("quantization") else ""
    click.echo(f"{build_dir}: {doc['target']}, {doc['dtype']}{quant}, prefill {doc['prefill_layout']}")
    click.echo(f"prompt        {p['sys_tokens']} sys + {p['visual_tokens']} visual + {p['text_tokens']} text tokens")
    click.echo(f"matmul FLOPs  {_tflops(doc['matmul_flops'])}")
    click.echo(f"int8 matmuls  {doc['quantized_matmuls']} of {doc['weight_matmuls']} weight matmuls (Q/DQ)")
    kv = doc["kv_tokens_per_layer"]
    click.echo("KV tokens     " + (" ".join(str(n) for n in kv) if kv is not None else "(not run: --no-run)"))
    if "autoprune" in doc:
        a = doc["autoprune"]
        click.echo(f"AutoPrune     I1 {a['complexity']:.5f}, keep {a['keep']}, merged {a['merged']}")
    click.echo("op counts     " + ", ".join(f"{k} {v}" for k, v in sorted(doc["op_counts"].items(), key=lambda kv: -kv[1])))


@main.command("bench")
@click.argument("pruned_dir", type=click.Path(path_type=Path))
@click.option("--baseline", "dense_dir", type=click.Path(path_type=Path), required=True,
              help="Build directory of the dense model (prune-export build MODEL --out DIR, no plan).")
@click.option("--runs", type=click.IntRange(min=1), default=defaults.BENCH_RUNS, show_default=True,
              help="Measured runs of each.")
@click.option("--warmup", type=click.IntRange(min=0), default=defaults.BENCH_WARMUP, show_default=True)
@click.option("--provider", type=PROVIDER_CHOICE, default=defaults.PROVIDER, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--text-tokens", type=click.IntRange(min=1), default=None,
              help="Text tokens of the measured prompt [default: the pruned build's check prompt].")
@click.option("--generate", "generate", type=click.IntRange(min=2), default=None,
              help="Time answers end to end instead: time to first token and decode ms/token over N new tokens.")
@click.option("--image", "image_path", type=click.Path(path_type=Path), default=None,
              help="With --generate: the image [default: the build check's synthetic image].")
@click.option("--question", default=None, help="With --generate: the question [default: a one-sentence question].")
@json_option()
def bench_cmd(pruned_dir: Path, dense_dir: Path, runs: int, warmup: int, provider: str, threads: int | None,
              text_tokens: int | None, generate: int | None, image_path: Path | None, question: str | None,
              as_json: bool) -> None:
    """Latency of a pruned build against a dense one on ONNX Runtime, interleaved, with FLOPs ratios.

    By default the prefill alone, on the pruned build's check prompt; with --generate N, whole answers: image
    and question in, N greedy tokens out (time to first token, decode ms/token).
    """
    from tqdm import tqdm

    if generate is None and (image_path is not None or question is not None):
        raise PruneExportError("--image and --question apply to --generate N; add --generate")
    if generate is not None:
        if text_tokens is not None:
            raise PruneExportError("--text-tokens applies to the prefill benchmark; with --generate use --question")
        from .workflows.measure import bench_generate

        with tqdm(total=runs, desc="bench", unit="round", file=sys.stderr, disable=None) as bar:
            result = bench_generate(pruned_dir, dense_dir, new_tokens=generate, rounds=runs, warmup=warmup,
                                    provider=provider, threads=threads, image_path=image_path, question=question,
                                    progress=lambda done, total: bar.update(1))  # fmt: skip
        if as_json:
            _echo_json(result.to_dict())
        else:
            click.echo(result.format_table())
        return
    from .workflows.measure import bench_builds

    with tqdm(total=runs, desc="bench", unit="run", file=sys.stderr, disable=None) as bar:
        report = bench_builds(pruned_dir, dense_dir, runs=runs, warmup=warmup, provider=provider, threads=threads,
                              text_tokens=text_tokens, progress=lambda done, total: bar.update(1))
    if as_json:
        _echo_json(report.to_dict())
        return
    click.echo(report.format_table())


@main.command("run")
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--image", "image_path", type=click.Path(path_type=Path), required=True, help="Image file.")
@click.option("--question", required=True, help="The question about the image.")
@max_new_tokens_option(defaults.ANSWER_NEW_TOKENS, "Largest number of answer tokens (at most the build's bound).")
@click.option("--provider", type=PROVIDER_CHOICE, default=defaults.PROVIDER, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads.")
@device_option("cpu or cuda: the ONNX Runtime provider (instead of --provider).")
@dtype_option("Refuse the build unless its graphs are in this precision (a build's dtype is baked in).",
              name="expect_dtype")
@click.option("--stream", is_flag=True, help="Print the answer as its tokens come.")
@json_option("Print one JSON object: answer, prompt_tokens, new_tokens, ttft_ms, decode_ms_per_token, ...")
def run_cmd(build_dir: Path, image_path: Path, question: str, max_new_tokens: int, provider: str,
            threads: int | None, device: str | None, expect_dtype: str | None, stream: bool, as_json: bool) -> None:
    """Answer a question about an image with a build directory's graphs (greedy, on ONNX Runtime).

    The build carries its tokenizer and image processor: the model folder is not needed.
    """
    from .workflows.generate import run_build

    if device is not None and provider != "auto":
        raise PruneExportError("--device and --provider both choose the provider; pass one of them")
    _echo_answer(lambda on_text: run_build(build_dir, image_path, question, max_new_tokens=max_new_tokens,
                                           provider=provider_for(device, provider), threads=threads,
                                           expect_dtype=expect_dtype, on_text=on_text), stream, as_json)  # fmt: skip


def _echo_answer(produce: Callable[[Callable[[str], None] | None], dict[str, Any]], stream: bool, as_json: bool) -> None:
    """Print the answer of ``produce(on_text)`` (``run``, ``ask``): as it streams, as JSON, or whole."""

    def echo_piece(piece: str) -> None:
        click.echo(piece, nl=False)

    result = produce(echo_piece if stream and not as_json else None)
    if as_json:
        _echo_json(result)
    elif stream:
        click.echo()
    else:
        click.echo(result["answer"])


# -- Triton: deploy / serve / ask ---------------------------------------------------------------------------
@main.command("deploy")
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--repo", "repo_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The Triton model repository to write (a new or empty directory, or --overwrite).")
@click.option("--name", default="prune_export", show_default=True,
              help="Name of the model clients call; the graph models are NAME_vision, NAME_prefill, ...")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Instances of each model (instance_group count).")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Instance kind of the graph models (KIND_CPU / KIND_GPU).")
@max_new_tokens_option(None, "Largest answer a request may ask for [default: the build's bound].")
@click.option("--stream", is_flag=True, help="A decoupled model that streams the answer as its tokens come (gRPC).")
@click.option("--overwrite", is_flag=True, help="Replace REPO if it exists.")
@json_option()
def deploy_cmd(build_dir: Path, repo_dir: Path, name: str, instances: int, device: str, max_new_tokens: int | None,
               stream: bool, overwrite: bool, as_json: bool) -> None:
    """Write BUILD_DIR as a Triton model repository: one model per graph and the model clients call.

    Every config.pbtxt is checked with Triton's schema and against its ONNX graph before REPO appears.
    Serve REPO with the NGC Triton container (see REPO/README.md) or locally with `prune-export serve`.
    """
    from .workflows.deploy import deploy

    result = deploy(build_dir, repo_dir, name=name, instances=instances, device=device, max_new_tokens=max_new_tokens,
                    stream=stream, overwrite=overwrite, log=(lambda m: None) if as_json else _log_err)  # fmt: skip
    if as_json:
        _echo_json(result)
        return
    click.echo(f"wrote Triton repository {result['repository']}: {', '.join(result['models'])} "
               f"({result['seconds']:.1f} s); clients call {result['model']}")  # fmt: skip


@main.command("serve")
@click.argument("repos", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--env", "env_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The server's Python environment (made once if missing) "
                   "[default: $PRUNE_EXPORT_TRITON_ENV or ~/.cache/prune-export/triton-server-py3.X-HASH].")
def serve_cmd(repos: tuple[Path, ...], http_port: int, grpc_port: int, metrics_port: int, env_dir: Path | None) -> None:
    """Serve Triton model repositories on 127.0.0.1 until SIGTERM or Ctrl-C (local use and tests).

    Runs the tritonserver bundled with nvidia-pytriton (Python backend only); the repositories' onnxruntime
    models are served through a small Python-based backend with ONNX Runtime. The NGC container serves the
    same directories with its native backends.
    """
    from .workflows.deploy import serve

    code = serve(list(repos), http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, env_dir=env_dir,
                 log=_log_err)  # fmt: skip
    if code not in (0, -15):
        raise SystemExit(1)


@main.command("ask")
@click.argument("url")
@click.option("--image", "image_path", type=click.Path(path_type=Path), required=True, help="Image file.")
@click.option("--question", required=True, help="The question about the image.")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default=None,
              help="[default: from the URL's scheme, else http]")
@click.option("--model", default=None, help="The model to call [default: the one served that takes image and question].")
@max_new_tokens_option(None, "Largest number of answer tokens [default: the served model's].")
@click.option("--stream", is_flag=True, help="Print the answer as its pieces come (a model deployed with --stream).")
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds to keep trying to reach a server that is still starting.")
@json_option("Print one JSON object: answer, latency_ms, model, ...")
def ask_cmd(url: str, image_path: Path, question: str, protocol: str | None, model: str | None,
            max_new_tokens: int | None, stream: bool, wait: float, as_json: bool) -> None:
    """Ask a model served by Triton (URL: http://HOST:PORT or grpc://HOST:PORT) a question about an image."""
    from .workflows.deploy import ask

    _echo_answer(lambda on_text: ask(url, image_path, question, protocol=protocol, model=model,
                                     max_new_tokens=max_new_tokens, wait=wait, on_text=on_text), stream, as_json)  # fmt: skip


if __name__ == "__main__":  # pragma: no cover
    main()
