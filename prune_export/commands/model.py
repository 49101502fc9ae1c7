"""Commands about a model and its plans, from its folder alone: ``demo-model``, ``demo-data``, ``info``,
``plan show``, ``autoprune-schedule``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from prune_core.errors import PruneExportError
from prune_core.ops import Operation

from ..options import (
    dtype_option,
    image_size_option,
    json_option,
)
from ..output import echo_json, tflops


# -- demo-model / demo-data -------------------------------------------------------------------------------
@click.command("demo-model")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(["trained", "tiny", "bench", "llava-7b", "next-tiny", "next-bench", "next-7b"]), default="tiny", show_default=True,
              help="trained: trained on the demo VQA task (demo-data), 196 visual tokens, answers from the image; "
                   "tiny: random, seconds to build, for tests; bench: random, 576 visual tokens, hidden 1024, 8 "
                   "layers; llava-7b: random, LLaVA-1.5-7B's shapes (7.06 B parameters, 14 GB in fp16); next-tiny, "
                   "next-bench: random LLaVA-NeXT (any-resolution tiles; next-bench: 2,928 visual tokens at 672x672); "
                   "next-7b: random, LLaVA-1.6-vicuna-7B's shapes (fp16).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--kv-heads", type=int, default=None, help="Override the number of KV heads (GQA).")
@click.option("--layers", type=click.IntRange(min=2), default=None, help="Override the number of decoder layers.")
@dtype_option("Precision the weights are made and written in [default: fp32; llava-7b, next-7b: fp16, never an "
              "fp32 copy].",
              name="dtype")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
def demo_model(out_dir: Path, preset: str, seed: int, kv_heads: int | None, layers: int | None, dtype: str | None,
               overwrite: bool) -> None:
    """Write a LLaVA-1.5-architecture demo model (weights as safetensors, tokenizer, processor)."""
    import time

    from ..workflows.model import demo_model as write_demo_model

    started = time.perf_counter()
    path = write_demo_model(out_dir, preset, seed=seed, kv_heads=kv_heads, overwrite=overwrite, dtype=dtype, layers=layers)
    click.echo(f"wrote {preset} demo model to {path} in {time.perf_counter() - started:.1f} s")


@click.command("demo-data")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--samples", type=int, default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the scenes and questions; the trained demo model never saw a set made here.")
def demo_data(out_dir: Path, samples: int, seed: int) -> None:
    """Write the demo VQA task (coloured shapes on a grid; colour, shape, count and side questions with
    one-word answers) as OUT_DIR/data.jsonl + images."""
    from ..workflows.model import demo_data as write_demo_data

    path = write_demo_data(out_dir, samples=samples, seed=seed)
    click.echo(f"wrote {samples} rows to {path}")


# -- info -----------------------------------------------------------------------------------------------
@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--text-tokens", type=click.IntRange(min=1), default=None,
              help="Text tokens after the image in the reference prompt [default: 100].")
@image_size_option("Any-resolution models (LLaVA-NeXT): the prompt of an image of this size [default: the image "
                   "that gives the most visual tokens, e.g. 672x672 for LLaVA-1.6].")
@json_option()
def info(model_dir: Path, text_tokens: int | None, image_size: tuple[int, int] | None, as_json: bool) -> None:
    """Architecture, token groups, operations and dense prefill FLOPs (needs only config.json)."""
    from ..workflows.model import model_info

    d = model_info(model_dir, text_tokens, image_size)
    if as_json:
        echo_json(d)
        return
    dense = d["dense_prefill_flops"]
    click.echo(f"{model_dir}  ({d['family']}, fingerprint {d['fingerprint']})")
    click.echo(f"  decoder      {d['layers']} layers, hidden {d['hidden_size']}, MLP {d['intermediate_size']}, "
               f"{d['heads']} heads / {d['kv_heads']} KV heads x {d['head_dim']}")
    if d["image"] is None:
        click.echo(f"  vision       {d['image_size']} px / patch {d['patch_size']} -> {d['visual_tokens']} visual tokens "
                   f"({d['spec']['vision_layers']} layers, hidden {d['spec']['vision_hidden_size']})")
    else:
        image = d["image"]
        click.echo(f"  vision       any resolution: {d['image_size']} px tiles / patch {d['patch_size']} -> "
                   f"{d['tile_tokens']} tokens per tile, tiled at {', '.join(f'{w}x{h}' for h, w in d['image_grid_pinpoints'])}"
                   f" ({d['spec']['vision_layers']} layers, hidden {d['spec']['vision_hidden_size']})")
        click.echo(f"  image        {image['width']}x{image['height']} -> {d['prompt_visual_tokens']} visual tokens "
                   f"(base image + tiles, unpadded, one newline per row; at most {d['visual_tokens']})")
    groups = ", ".join(f"{k} {v}" for k, v in d["groups"].items())
    click.echo(f"  prompt       {d['prompt_tokens']} tokens: {groups} (sys from {d['sys_tokens_from']})")
    click.echo(f"  operations   {d['operations']} ({d['prunable_operations']} on image groups)")
    click.echo(f"  dense prefill {tflops(dense)} ({dense:,} FLOPs)")


# -- plan -----------------------------------------------------------------------------------------------
@click.group()
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
        from ..plots import plan_ladder_plot

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
        echo_json(out)
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


# -- autoprune-schedule ---------------------------------------------------------------------------------
@click.command("autoprune-schedule")
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
    from ..workflows.model import autoprune_schedule as schedule

    d = schedule(model_dir, tokens, k, x0=x0, amplitude=amplitude, use_table=use_table, k0=k0, k_step=k_step,
                 text_tokens=text_tokens)
    if as_json:
        echo_json(d)
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
