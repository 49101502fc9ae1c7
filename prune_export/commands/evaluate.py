"""Commands that run a model in PyTorch on data: ``search``, ``eval`` (also of a build directory),
``sweep``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from prune_core import defaults
from prune_core.device import provider_for
from prune_core.errors import PruneExportError

from ..options import (
    device_option,
    dtype_option,
    json_option,
    max_new_tokens_option,
    plan_options,
    torch_options,
)
from ..output import echo_json, log_err, tflops


# -- search ---------------------------------------------------------------------------------------------
@click.command()
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
    from ..workflows.search import search as run_search

    out = run_search(model_dir, calib_path, out_path, metric=metric, tolerance=tolerance, steps=steps,
                     key_danger_layers=key_danger_layers, protect_layer0_kv=not allow_layer0_kv, limit=limit,
                     resume=resume, prefix_reuse=not no_prefix_reuse, seed=seed, device=device or defaults.TORCH_DEVICE,
                     dtype=torch_dtype or defaults.TORCH_DTYPE, workers=workers, ray_address=ray_address,
                     batch_size=batch_size, threads_per_worker=threads_per_worker, log=log_err)
    result, stats = out.result, out.stats
    click.echo(f"wrote {out_path}: {len(out.plan.steps)} steps, metric {out.metric} baseline "
               f"{result.baseline:.4f}, last step FLOPs ratio {out.plan.ladder[-1]:.4f}")
    where = f" on {out.workers} Ray workers (summed)" if out.workers > 1 else ""
    click.echo(f"evaluations: {result.evaluations_run} run + {result.evaluations_from_journal} from the journal "
               f"({result.naive_evaluations} for a naive greedy), {stats.seconds:.1f} s evaluating{where}, "
               f"{result.wall_seconds:.1f} s wall, {stats.layer_fraction:.0%} of decoder layers computed "
               "(prefix reuse)")


# -- eval -----------------------------------------------------------------------------------------------
@click.command("eval")
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
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="A build directory: answers decoded together by the continuous-batching scheduler (the same "
                   "answers, faster); at most the build's --max-batch.")
def eval_cmd(model_dir: Path, data_path: Path, request: Any, max_new_tokens: int, limit: int | None, as_json: bool,
             samples_out: Path | None, device: str | None, torch_dtype: str | None, reference_path: Path | None,
             no_reference: bool, batch_size: int) -> None:
    """Exact-match accuracy of greedy answers and prefill FLOPs, dense vs under a plan, and the answers'
    agreement with the dense model's (label-free: the fraction of identical answers, and the KL divergence of
    the first answer token's distribution from the dense one).

    MODEL_DIR is a HuggingFace model folder (answers from the PyTorch executor) or a build directory (answers
    from its graphs on ONNX Runtime; the plan is baked in, so plan options are refused there).

    Token pruning comes from the plan's token section, --keep-schedule, or --autoprune-tokens; with a plan's
    GSOP operations it makes a combined plan (operations apply to the visual tokens still alive).
    """
    if (Path(model_dir) / "manifest.json").is_file():
        from ..workflows.evaluate import evaluate_build

        run = evaluate_build(model_dir, data_path, request, dtype=torch_dtype, max_new_tokens=max_new_tokens,
                             limit=limit, samples_out=samples_out, device=device, reference_path=reference_path,
                             compare=not no_reference, batch_size=batch_size)  # fmt: skip
        if as_json:
            missing = {"reference_missing": run.reference_missing} if run.reference_missing else {}
            echo_json({**run.report.to_json(), "engine": run.engine, "provider": run.provider, **missing})
            return
        click.echo(f"build         {model_dir} ({run.engine}, {run.provider})")
        _echo_eval(run.report, None, False, missing=run.reference_missing)
        return
    if batch_size != 1:
        raise PruneExportError("--batch-size batches the decode steps of a build directory's graphs; a model folder "
                               "is evaluated one row at a time in PyTorch (build it first to batch)")
    from ..workflows.evaluate import evaluate_model

    where = {"device": device or defaults.TORCH_DEVICE, "dtype": torch_dtype or defaults.TORCH_DTYPE}
    run = evaluate_model(model_dir, data_path, request, max_new_tokens=max_new_tokens, limit=limit,
                         samples_out=samples_out, reference_path=reference_path, compare=not no_reference, **where)
    _echo_eval(run.report, run.policy, as_json, where)


def _echo_eval(report: Any, policy: Any, as_json: bool, where: dict[str, str] | None = None,
               missing: str | None = None) -> None:
    """Print an eval report (``calib.evaluate.EvalReport``), the token policy it ran and where it ran."""
    if as_json:
        echo_json({**report.to_json(), **(where or {})})
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
    click.echo(f"dense FLOPs   {tflops(report.dense_flops / report.samples)} per sample")
    click.echo(f"pruned FLOPs  {tflops(report.pruned_flops / report.samples)} per sample")
    click.echo(f"FLOPs ratio   {report.flops_ratio:.4f} (mean per sample {report.mean_flops_ratio:.4f})")
    if policy is not None:
        click.echo(f"token policy  {policy!r}")
    click.echo("visual tokens entering each layer (mean): "
               + " ".join(f"{v:.1f}" for v in report.mean_visual_tokens_per_layer))


# -- sweep ----------------------------------------------------------------------------------------------
@click.command("sweep")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--data", "data_path", type=click.Path(path_type=Path), required=True,
              help="JSONL rows {image, question, answer}; image paths relative to the file.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Report directory (created; an interrupted sweep of the same inputs resumes in it).")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), default=None,
              help="Searched plan: its ladder for --budgets, and its ladder plot.")
@click.option("--budgets", default=None, help="GSOP budgets from the plan's ladder, e.g. 0.9,0.7,0.5 (each in (0, 1]).")
@click.option("--autoprune-tokens", default=None, help="AutoPrune budgets T, e.g. 192,128,64.")
@click.option("--autoprune-positions", default=None,
              help="Position modes each --autoprune-tokens budget is swept in: renumbered, original or "
                   "renumbered,original [default: the plan's, else renumbered].")
@click.option("--keep-schedule", "keep_schedules", multiple=True,
              help="A fixed schedule LAYER:TOKENS[,...] (FastV, PDrop); repeat for several.")
@click.option("--quantize", "quantize_modes", default=None,
              help="Also quantized builds of dense: int8, int8-weights or int8,int8-weights (answered through "
                   "their graphs on ONNX Runtime, compared with fp32). Other configurations: --config CONFIG@int8.")
@click.option("--calib", "calib_path", type=click.Path(path_type=Path), default=None,
              help="Calibration JSONL of the int8 configurations (image/question rows; not the --data rows).")
@click.option("--calib-rows", type=click.IntRange(min=1), default=defaults.QUANT_CALIB_ROWS, show_default=True,
              help="Calibration rows of the int8 configurations (the first N).")
@click.option("--config", "extra_configs", multiple=True,
              help="Another configuration: gsop:BUDGET, autoprune:T[:renumbered|original], "
                   "fixed:LAYER:TOKENS[,...], combined gsop:BUDGET+autoprune:T or gsop:BUDGET+fixed:..., any "
                   "of them @int8 or @int8-weights (a quantized build); repeatable.")
@click.option("--latency", is_flag=True,
              help="Also build every configuration (REPORT_DIR/builds) and time its first token against dense.")
@click.option("--rounds", type=click.IntRange(min=1), default=defaults.SWEEP_ROUNDS, show_default=True,
              help="--latency: timed rounds.")
@click.option("--warmup", type=click.IntRange(min=0), default=defaults.SWEEP_WARMUP, show_default=True,
              help="--latency: untimed rounds.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="--latency: ONNX Runtime threads.")
@click.option("--skip-check", is_flag=True, help="--latency and quantized builds: build without the parity check against the executor.")
@max_new_tokens_option(defaults.EVAL_NEW_TOKENS, "Largest number of answer tokens per row.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N rows.")
@torch_options()
@click.option("--overwrite", is_flag=True, help="Discard a report directory that holds a sweep of other inputs.")
@json_option("Print the report as one JSON object.")
def sweep_cmd(model_dir: Path, data_path: Path, out_dir: Path, plan_path: Path | None, budgets: str | None,
              autoprune_tokens: str | None, autoprune_positions: str | None, keep_schedules: tuple[str, ...],
              quantize_modes: str | None, calib_path: Path | None, calib_rows: int, extra_configs: tuple[str, ...],
              latency: bool, rounds: int, warmup: int, threads: int | None, skip_check: bool, max_new_tokens: int,
              limit: int | None, device: str | None, torch_dtype: str | None, overwrite: bool, as_json: bool) -> None:
    """Accuracy, agreement with dense and FLOPs of every configuration (dense, GSOP budgets, AutoPrune budgets,
    fixed schedules, combined plans, int8 builds) on DATA, with --latency the measured time to first token of
    each build, written to REPORT_DIR as report.json, report.md and PNG plots.

    Float configurations are answered by the PyTorch executor; quantized ones are built (REPORT_DIR/builds)
    and answered by their graphs, and the report lists which answers int8 changed against fp32, with the
    logit gaps at the tokens that flipped.

    Each configuration is evaluated as `eval` with the same options evaluates it. Finished configurations are
    kept in REPORT_DIR: run the same command again after an interruption and only the rest is done.
    """
    from prune_core.tokens import parse_keep_schedule

    from ..workflows.sweep import (
        POSITIONS,
        QUANTIZE_MODES,
        SweepSettings,
        parse_choices,
        parse_config,
        parse_numbers,
        run_sweep,
        sweep_configs,
    )

    configs = sweep_configs(
        plan_path=plan_path, budgets=parse_numbers(budgets, "--budgets"),
        autoprune_tokens=parse_numbers(autoprune_tokens, "--autoprune-tokens"),
        keep_schedules=[parse_keep_schedule(text) for text in keep_schedules],
        extra=[parse_config(text) for text in extra_configs],
        autoprune_positions=parse_choices(autoprune_positions, "--autoprune-positions", POSITIONS),
        quantize=parse_choices(quantize_modes, "--quantize", QUANTIZE_MODES),
    )  # fmt: skip
    settings = SweepSettings(latency=latency, rounds=rounds, warmup=warmup, threads=threads, skip_check=skip_check,
                             overwrite=overwrite, device=device or defaults.TORCH_DEVICE, provider=provider_for(device),
                             calib=calib_path, calib_rows=calib_rows)  # fmt: skip
    result = run_sweep(model_dir, data_path, out_dir, configs, plan_path=plan_path, max_new_tokens=max_new_tokens,
                       limit=limit, device=device or defaults.TORCH_DEVICE, dtype=torch_dtype or defaults.TORCH_DTYPE,
                       settings=settings,
                       log=log_err)  # fmt: skip
    if as_json:
        echo_json(result.report)
        return
    lat = result.report.get("latency")
    width = max(24, *(len(row["name"]) for row in result.report["configs"]))
    click.echo(f"{'configuration':<{width}} {'accuracy':>8} {'retention':>9} {'agreement':>9} {'KL nats':>9} "
               f"{'FLOPs':>7}" + (f" {'TTFT ms':>8} {'speed-up':>8}" if lat else ""))
    for row in result.report["configs"]:
        def f(x: float | None, w: int, d: int = 4) -> str:
            return f"{'n/a':>{w}}" if x is None else f"{x:>{w}.{d}f}"

        line = (f"{row['name']:<{width}} {f(row['accuracy'], 8)} {f(row['retention'], 9)} {f(row['agreement'], 9)} "
                f"{f(row['mean_first_token_kl'], 9, 5)} {f(row['flops_ratio'], 7, 3)}")
        if lat:
            line += f" {row['latency']['ttft_ms']:>8.1f} {row['latency']['ttft_speedup']:>7.2f}x"
        click.echo(line)
    for row in result.report["configs"]:
        twin = row.get("float_twin")
        if twin:
            gap = twin["float_gap"]["max"]
            click.echo(f"{row['name']}: {twin['changed']} of {twin['rows']} answers changed against fp32"
                       + ("" if gap is None else f" (largest float logit gap at a flip {gap:.3f}, "
                          f"near ties {twin['near_ties']})")
                       + (f"; {twin['schedules_changed']} row(s) pruned to other token counts"
                          if twin.get("schedules_changed") else ""))
    click.echo(f"{len(result.computed)} configuration(s) evaluated, {len(result.kept)} kept from before"
               + (f", {len(result.built)} built" if latency else ""))
    click.echo(f"report: {out_dir / 'report.md'}, {out_dir / 'report.json'}; plots: "
               + ", ".join(str(out_dir / name) for name in result.report["plots"]))
