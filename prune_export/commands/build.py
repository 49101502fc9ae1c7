"""Commands that make, inspect and run build directories: ``build``, ``engines``, ``inspect``, ``bench``,
``run``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from prune_core import defaults
from prune_core.device import provider_for
from prune_core.errors import PruneExportError
from prune_core.precision import TARGETS

from ..options import (
    PROVIDER_CHOICE,
    device_option,
    dtype_option,
    image_size_option,
    json_option,
    max_new_tokens_option,
    plan_options,
)
from ..output import echo_answer, echo_json, log_err, tflops


# -- build / inspect / bench ----------------------------------------------------------------------------
@click.command("build")
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
@click.option("--max-batch", type=click.IntRange(min=1), default=defaults.MAX_DECODE_BATCH, show_default=True,
              help="Most sequences one decode step runs together (batched serving, eval --batch-size); "
                   "the decode graph's batch range and TensorRT profile.")
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
              max_sys_tokens: int, max_new_tokens: int, max_batch: int, provider: str, device: str, low_memory: bool, skip_check: bool,
              quantize: str | None, calib_path: Path | None, calib_rows: int, overwrite: bool, as_json: bool) -> None:
    """Bake a plan into vision.onnx + prefill.onnx, optimize them, check them, write manifest.json.

    Static GSOP operations are removed from the graph; token selection (fixed schedule, AutoPrune) is TopK
    inside it. The build directory appears only when everything passed.
    """
    from ..workflows.build import BuildSettings, build
    from ..workflows.selection import choose_plan

    settings = BuildSettings(target=target, dtype=dtype, max_text_tokens=max_text_tokens,
                             max_sys_tokens=max_sys_tokens, max_new_tokens=max_new_tokens, max_decode_batch=max_batch, check=not skip_check, provider=provider,
                             device=device, low_memory=low_memory, overwrite=overwrite, quantize=quantize,
                             calib=calib_path, calib_rows=calib_rows)
    _, choice = choose_plan(model_dir, request)
    manifest = build(model_dir, out_dir, choice, settings, log_err)
    if as_json:
        echo_json(manifest.model_dump(mode="json"))
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


@click.command("check")
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="The model folder the build was made from [default: the one in its manifest].")
@click.option("--provider", type=PROVIDER_CHOICE, default=defaults.PROVIDER, show_default=True,
              help="ONNX Runtime provider that runs the graphs.")
@device_option("Where PyTorch runs the executor's reference: cpu, cuda or cuda:N.", default=defaults.TORCH_DEVICE)
@json_option("Print the check report as one JSON object.")
def check_cmd(build_dir: Path, model_dir: Path | None, provider: str, device: str, as_json: bool) -> None:
    """Run a finished build's check again: its graphs, as they are now, against the PyTorch executor.

    The same report as at build time (every output's largest difference and tolerance, the next token, the
    greedy answers through the graphs); exit status 1 when it fails. Nothing in the build is written. For a
    build copied to another machine, after upgrading ONNX Runtime, or after editing a graph by hand.
    """
    from ..workflows.check import recheck_build

    report, failure = recheck_build(build_dir, model_dir=model_dir, provider=provider, device=device, log=log_err)
    if as_json:
        echo_json(report.model_dump(mode="json"))
    else:
        click.echo(f"check {report.status} on {report.provider}: {report.samples} prompts, greedy answers "
                   f"({'/'.join(map(str, report.generated_tokens or []))} tokens) the executor's: {report.same_generation}")
        for out in report.outputs:
            bound = "reported" if out.tolerance is None else f"tolerance {out.tolerance:g}"
            rel = "" if out.max_rel_diff is None else f", relative {out.max_rel_diff:.3g}"
            click.echo(f"  {out.name:<28} max abs diff {out.max_abs_diff:.3g}{rel} ({bound}){'' if out.ok else '  FAILED'}")
    if failure is not None:
        raise PruneExportError(failure)


@click.command("engines")
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--workspace-gb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Cap on TensorRT's builder scratch memory [default: TensorRT's, the whole GPU].")
@click.option("--verbose", is_flag=True, help="TensorRT's verbose log (where the reason for a failed build is).")
def engines_cmd(build_dir: Path, workspace_gb: float | None, verbose: bool) -> None:
    """Build the TensorRT engines of a --target tensorrt build directory (one <graph>.plan per graph).

    Profiles come from the build's manifest; the manifest then records the engines. Needs TensorRT and an
    NVIDIA GPU; a build made elsewhere carries everything else.
    """
    from ..workflows.build import build_engines

    _echo_engines(build_engines(build_dir, workspace_gb=workspace_gb, verbose=verbose, log=log_err))


@click.command("inspect")
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--text-tokens", type=click.IntRange(min=1), default=None,
              help="Count for a prompt with this many text tokens [default: the build's check prompt].")
@click.option("--no-run", is_flag=True,
              help="Count by shape inference (ONNX's, then ONNX Runtime's symbolic) without running the graph (no weights loaded: builds too "
                   "large to run here, e.g. 7B fp16 on a CPU). Static plans only; KV lengths are not reported.")
@image_size_option("Any-resolution (LLaVA-NeXT) builds: count for the check image scaled to this size, e.g. 672x672 "
                   "[default: the check image].")
@json_option()
def inspect_cmd(build_dir: Path, text_tokens: int | None, no_run: bool, image_size: tuple[int, int] | None,
                as_json: bool) -> None:
    """Node counts by op type and matmul FLOPs of the prefill graph, computed from the graph itself."""
    from ..workflows.measure import inspect_build

    doc = inspect_build(build_dir, text_tokens, run=not no_run, image_size=image_size)
    if as_json:
        echo_json(doc)
        return
    p = doc["prompt"]
    quant = f", {doc['quantization']}" if doc.get("quantization") else ""
    click.echo(f"{build_dir}: {doc['target']}, {doc['dtype']}{quant}, prefill {doc['prefill_layout']}")
    click.echo(f"prompt        {p['sys_tokens']} sys + {p['visual_tokens']} visual + {p['text_tokens']} text tokens")
    click.echo(f"matmul FLOPs  {tflops(doc['matmul_flops'])}")
    click.echo(f"int8 matmuls  {doc['quantized_matmuls']} of {doc['weight_matmuls']} weight matmuls (Q/DQ)")
    kv = doc["kv_tokens_per_layer"]
    click.echo("KV tokens     " + (" ".join(str(n) for n in kv) if kv is not None else "(not run: --no-run)"))
    if "autoprune" in doc:
        a = doc["autoprune"]
        click.echo(f"AutoPrune     I1 {a['complexity']:.5f}, keep {a['keep']}, merged {a['merged']}")
    click.echo("op counts     " + ", ".join(f"{k} {v}" for k, v in sorted(doc["op_counts"].items(), key=lambda kv: -kv[1])))


@click.command("bench")
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
@image_size_option("Any-resolution (LLaVA-NeXT) builds: measure the check image scaled to this size, e.g. 672x672 "
                   "[default: the check image].")
@click.option("--generate", "generate", type=click.IntRange(min=2), default=None,
              help="Time answers end to end instead: time to first token and decode ms/token over N new tokens.")
@click.option("--image", "image_path", type=click.Path(path_type=Path), default=None,
              help="With --generate: the image [default: the build check's synthetic image].")
@click.option("--question", default=None, help="With --generate: the question [default: a one-sentence question].")
@json_option()
def bench_cmd(pruned_dir: Path, dense_dir: Path, runs: int, warmup: int, provider: str, threads: int | None,
              text_tokens: int | None, image_size: tuple[int, int] | None, generate: int | None,
              image_path: Path | None, question: str | None, as_json: bool) -> None:
    """Latency of a pruned build against a dense one on ONNX Runtime, interleaved, with FLOPs ratios.

    By default the prefill alone, on the pruned build's check prompt; with --generate N, whole answers: image
    and question in, N greedy tokens out (time to first token, decode ms/token).
    """
    from tqdm import tqdm

    if generate is None and (image_path is not None or question is not None):
        raise PruneExportError("--image and --question apply to --generate N; add --generate")
    if generate is not None:
        if text_tokens is not None or image_size is not None:
            raise PruneExportError("--text-tokens and --image-size apply to the prefill benchmark; with --generate "
                                   "use --question and --image")
        from ..workflows.measure import bench_generate

        with tqdm(total=runs, desc="bench", unit="round", file=sys.stderr, disable=None) as bar:
            result = bench_generate(pruned_dir, dense_dir, new_tokens=generate, rounds=runs, warmup=warmup,
                                    provider=provider, threads=threads, image_path=image_path, question=question,
                                    progress=lambda done, total: bar.update(1))  # fmt: skip
        if as_json:
            echo_json(result.to_dict())
        else:
            click.echo(result.format_table())
        return
    from ..workflows.measure import bench_builds

    with tqdm(total=runs, desc="bench", unit="run", file=sys.stderr, disable=None) as bar:
        report = bench_builds(pruned_dir, dense_dir, runs=runs, warmup=warmup, provider=provider, threads=threads,
                              text_tokens=text_tokens, image_size=image_size,
                              progress=lambda done, total: bar.update(1))
    if as_json:
        echo_json(report.to_dict())
        return
    click.echo(report.format_table())


@click.command("run")
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--image", "image_path", type=click.Path(path_type=Path), required=True, help="Image file.")
@click.option("--question", required=True, help="The question about the image.")
@max_new_tokens_option(defaults.ANSWER_NEW_TOKENS, "Largest number of answer tokens (at most the build's bound).")
@click.option("--provider", type=PROVIDER_CHOICE, default=defaults.PROVIDER, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads.")
@device_option("cpu or cuda: the ONNX Runtime provider (instead of --provider).")
@dtype_option("Refuse the build unless its graphs are in this precision (a build's dtype is baked in).",
              name="expect_dtype")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=defaults.MAX_IMAGE_PIXELS, show_default=True,
              help="Refuse a larger image (width x height, read from its header before it is decoded).")
@click.option("--stream", is_flag=True, help="Print the answer as its tokens come.")
@json_option("Print one JSON object: answer, prompt_tokens, new_tokens, ttft_ms, decode_ms_per_token, ...")
def run_cmd(build_dir: Path, image_path: Path, question: str, max_new_tokens: int, provider: str,
            threads: int | None, device: str | None, expect_dtype: str | None, max_image_pixels: int, stream: bool,
            as_json: bool) -> None:
    """Answer a question about an image with a build directory's graphs (greedy, on ONNX Runtime).

    The build carries its tokenizer and image processor: the model folder is not needed.
    """
    from ..workflows.generate import run_build

    if device is not None and provider != "auto":
        raise PruneExportError("--device and --provider both choose the provider; pass one of them")
    echo_answer(lambda on_text: run_build(build_dir, image_path, question, max_new_tokens=max_new_tokens,
                                           provider=provider_for(device, provider), threads=threads,
                                           expect_dtype=expect_dtype, max_image_pixels=max_image_pixels, on_text=on_text), stream, as_json)  # fmt: skip
