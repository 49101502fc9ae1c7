"""The build workflow: ``prune-export build`` (export, graph passes, check, manifest) and ``engines``.

It exports the graphs (exporter), runs the pass pipeline (graph_passes), has them checked against the
PyTorch executor (:mod:`.check`) and writes the manifest; for ``--target tensorrt`` it builds the engines
where TensorRT is installed (engines). Every default lives in :class:`BuildSettings`.

A build is written into ``.<name>.partial-<pid>`` next to the output directory and renamed into place only
once every graph is exported, optimized and checked and ``manifest.json`` is written, so a failed build
never leaves a directory that looks complete. A build that fails its parity check is kept as
``<name>.failed`` (graphs plus ``check_report.json``, no manifest) for inspection.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch

from engines.tensorrt import (
    EnginesFromBuild,
    engine_file,
    require_tensorrt,
    tensorrt_commands,
    tensorrt_version,
)
from exporter.adapters import load_adapter
from exporter.baked import AutoPruneBake, BakedPrefill
from exporter.onnx_export import (
    DecodeOnnxFromAdapter,
    EmbedOnnxFromAdapter,
    OnnxFromPlan,
    VisionOnnxFromAdapter,
    save_ir_for_ort,
)
from graph_passes import PassManager, default_pipeline
from prune_core import defaults, memory
from prune_core.device import resolve_device, torch_dtype
from prune_core.errors import BuildError
from prune_core.io import atomic_write_json, staged_directory
from prune_core.manifest import (
    CHECK_REPORT,
    PROCESSOR_DIR,
    SCHEDULE_TABLE,
    TRT_COMMANDS,
    CheckReport,
    EngineReport,
    GraphEntry,
    Manifest,
    TensorSpec,
)
from prune_core.plan import AutoPruneSection, FixedScheduleSection
from prune_core.precision import check_target_dtype
from prune_core.spec import ModelSpec

from .check import CHECK_PROMPTS, check_build, failure_message, flops_doc, prepare_check_inputs
from .quantize import calibration_prefill_feeds, check_quantize_options, quantize_build
from .selection import PlanChoice

Log = Callable[[str], None]


@dataclass(frozen=True)
class BuildSettings:
    """Every default of a build.

    Attributes:
        target: ``onnxruntime`` or ``tensorrt`` (TensorRT graphs are linted; AutoPrune is split so the keep
            counts reach TopK as a shape tensor).
        dtype: precision written into the files (``fp16``/``bf16`` via the cast pass, fp32 islands kept).
        opset: ONNX opset of the export.
        max_sys_tokens / max_text_tokens: upper bounds of the two dynamic prompt lengths (TensorRT
            profiles, manifest shape ranges).
        opt_text_tokens: the profile's optimum text length.
        max_batch: largest image batch of the vision graph.
        max_decode_batch: largest number of sequences one decode step runs together (the decode graph's
            ``decode_batch`` range, TensorRT profiles; ``generation.max_batch`` in the manifest).
        check: run the parity check (``--skip-check`` turns it off).
        provider: ONNX Runtime provider of the check (``auto``: CUDA when it really runs, else CPU).
        device: where PyTorch runs the model for the export and the executor's reference (``cpu``,
            ``cuda``, ``cuda:N``); the graphs are the same wherever they were traced.
        low_memory: with ``dtype`` fp16/bf16, load the model in that precision and export it as it is (no
            fp32 copy of the weights, no weight cast afterwards); the parity check's reference is then the
            executor in that precision. Default: load in fp32, export, cast the graphs (fp32 islands kept)
            and check against the fp32 executor.
        overwrite: replace an existing build directory.
        max_new_tokens: tokens a decode cache may grow by (the decode graph's shape ranges, TensorRT
            profiles): the longest answer the build's runtime gives.
        check_new_tokens: greedy tokens the parity check generates per check prompt.
        check_prompts: the check's prompts, (synthetic image seed, question) pairs.
        workspace_gb: TensorRT builder scratch memory cap (``None``: TensorRT's default, the whole GPU).
        quantize: ``int8`` (static Q/DQ of the weight matmuls, activations calibrated on ``calib``) or
            ``int8-weights`` (weight-only Q/DQ) for the prefill and decode graphs; ``None``: float graphs.
        calib / calib_rows: the calibration file of ``int8`` and how many of its first rows to use.
    """

    target: str = defaults.TARGET
    dtype: str = defaults.BUILD_DTYPE
    opset: int = defaults.OPSET
    max_sys_tokens: int = defaults.MAX_SYS_TOKENS
    max_text_tokens: int = defaults.MAX_TEXT_TOKENS
    opt_text_tokens: int = defaults.OPT_TEXT_TOKENS
    max_batch: int = defaults.MAX_IMAGE_BATCH
    max_decode_batch: int = defaults.MAX_DECODE_BATCH
    check: bool = True
    provider: str = defaults.PROVIDER
    device: str = defaults.TORCH_DEVICE
    low_memory: bool = False
    overwrite: bool = False
    workspace_gb: float | None = None
    max_new_tokens: int = defaults.BUILD_NEW_TOKENS
    check_new_tokens: int = defaults.CHECK_NEW_TOKENS
    check_prompts: tuple[tuple[int, str], ...] = field(default=CHECK_PROMPTS)
    quantize: str | None = None
    calib: Path | None = None
    calib_rows: int = defaults.QUANT_CALIB_ROWS


def check_build_options(settings: BuildSettings) -> None:
    """Refuse, before anything is loaded or exported, options a build could not honour (one line each).

    Besides unknown targets, precisions and devices: ONNX Runtime's CPU provider has no bf16 kernels for
    several operators the graphs use (``Expand``, ``Gather`` of bf16 tensors, ...), so a bf16 graph neither
    runs there nor can be checked there. TensorRT runs bf16, but the parity check runs on ONNX Runtime; a
    bf16 TensorRT build is therefore made only when the user turns the check off.
    """
    check_target_dtype(settings.target, settings.dtype)
    resolve_device(settings.device)
    if settings.dtype == "bf16" and settings.target == "onnxruntime":
        raise BuildError(
            "--dtype bf16 is not available for --target onnxruntime: ONNX Runtime's CPU provider has no bf16 "
            "kernels for operators these graphs use, so the build could neither run nor check them; use "
            "--dtype fp16 (or fp32) for ONNX Runtime, or --target tensorrt for bf16"
        )
    if settings.dtype == "bf16" and settings.check:
        raise BuildError(
            "--dtype bf16 --target tensorrt cannot be checked here: the parity check runs the graphs on ONNX "
            "Runtime, which has no bf16 kernels for them; pass --skip-check to build unchecked bf16 graphs for "
            "TensorRT (check the engine yourself), or use --dtype fp16, which is checked"
        )
    if settings.low_memory and settings.dtype == "fp32":
        raise BuildError("--low-memory exports the model in the precision it is built in: pass --dtype fp16 or bf16")
    check_quantize_options(settings.quantize, settings.dtype, settings.calib, settings.low_memory)
    if settings.max_new_tokens < 1:
        raise BuildError(f"the build's max_new_tokens must be >= 1, got {settings.max_new_tokens}")


def build(model_dir: Path, out_dir: Path, choice: PlanChoice, settings: BuildSettings, log: Log) -> Manifest:
    """Export, optimize, check and write one build directory; returns its manifest."""
    check_build_options(settings)
    settings = fit_in_memory(model_dir, settings, log)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not settings.overwrite:
        raise BuildError(
            f"{out_dir} already exists and is not empty; pass --overwrite to replace it, or choose another --out"
        )
    with staged_directory(out_dir) as work:
        manifest = _build_into(model_dir, work, out_dir, choice, settings, log)
    if manifest.engines is not None and manifest.engines.status == "failed":
        raise BuildError(
            f"{out_dir} holds the checked graphs and manifest.json, but TensorRT could not build an engine: "
            f"{manifest.engines.reason}; fix the cause and run `prune-export engines {out_dir}`"
        )
    return manifest


def fit_in_memory(model_dir: Path, settings: BuildSettings, log: Log) -> BuildSettings:
    """The settings a build can run with in the memory available (:mod:`prune_core.memory`), before anything is
    loaded: as given when they fit; with ``low_memory`` when only the fp32 copy of an fp16/bf16 build does
    not fit (said in the log); else one line with both figures and the option that fits, if one does."""
    have = memory.available_bytes()
    params = memory.model_parameters(model_dir)  # the safetensors headers, read once
    if have is None or params is None:
        return settings
    held = settings.dtype if settings.low_memory else "fp32"
    needed = memory.load_estimate(params, held)
    if needed <= have:
        return settings
    low = memory.load_estimate(params, "fp16")
    if settings.dtype in ("fp16", "bf16") and settings.quantize is None and low <= have:
        log(f"the model in fp32 needs about {memory.gib(needed)} and {memory.gib(have)} is available: building with "
            f"--low-memory (the model loaded and exported in {settings.dtype}, about {memory.gib(low)}; the check's "
            f"reference runs in {settings.dtype} too)")  # fmt: skip
        return dataclasses.replace(settings, low_memory=True)
    fix = (f"build with --dtype fp16 --low-memory (about {memory.gib(low)})" if low <= have and settings.quantize is None
           else "build on a machine with more memory")  # fmt: skip
    raise memory.InsufficientMemoryError(
        f"building {model_dir} holds the model in {held}: about {memory.gib(needed)} of memory, and "
        f"{memory.gib(have)} is available; {fix}"
    )


@dataclass
class _Exported:
    """What the export step leaves for the rest of the build."""

    graph_names: list[str]
    split: bool
    bake: AutoPruneBake | None
    bounds: dict[str, Any]
    shape_values: dict[str, list[list[int]]]


def _export_graphs(adapter: Any, work: Path, choice: PlanChoice, settings: BuildSettings, log: Log) -> _Exported:
    """Export vision, prefill (one graph, or head and tail for a split AutoPrune), embed and decode into
    ``work``, and the shape bounds of every dynamic dimension."""
    spec = adapter.spec
    tokens = choice.tokens
    bake = None
    keep_stages: dict[int, int] = {}
    positions = "original"
    if isinstance(tokens, AutoPruneSection):
        score_dtype = torch.float32 if settings.target == "tensorrt" else torch.float64
        bake = AutoPruneBake.for_model(tokens, spec.num_layers, spec.visual_tokens, score_dtype)
    elif isinstance(tokens, FixedScheduleSection):
        keep_stages = {int(layer): int(count) for layer, count in tokens.stages}
        positions = tokens.positions
    split = bake is not None and settings.target == "tensorrt"
    parts = {"prefill_head": "head", "prefill_tail": "tail"} if split else {"prefill": "full"}
    log(f"exporting vision.onnx (vision tower + projector, dynamic batch up to {settings.max_batch})")
    VisionOnnxFromAdapter(adapter, opset=settings.opset, max_batch=settings.max_batch)(work / "vision.onnx")
    for name, part in parts.items():
        t0 = time.perf_counter()
        log(f"exporting {name}.onnx ({len(choice.ops)} pruned operations, token section: "
            f"{tokens.kind if tokens else 'none'})")  # fmt: skip
        OnnxFromPlan(
            adapter, choice.ops, keep_stages, dtype=settings.dtype if settings.low_memory else "fp32",
            opset=settings.opset, max_sys_tokens=settings.max_sys_tokens,
            max_text_tokens=settings.max_text_tokens, positions=positions, autoprune=bake, part=part,
        )(work / f"{name}.onnx")  # fmt: skip
        log(f"  exported in {time.perf_counter() - t0:.1f} s")
    max_prompt = settings.max_sys_tokens + spec.visual_tokens + settings.max_text_tokens
    opt_prompt = min(35, settings.max_sys_tokens) + spec.visual_tokens + min(settings.opt_text_tokens, settings.max_text_tokens)
    max_kv = max_prompt + settings.max_new_tokens
    t0 = time.perf_counter()
    log(f"exporting embed.onnx (token embedding) and decode.onnx (one unpruned decoding step of up to "
        f"{settings.max_decode_batch} sequences, per-layer caches)")
    EmbedOnnxFromAdapter(adapter, opset=settings.opset, max_tokens=max_prompt)(work / "embed.onnx")
    DecodeOnnxFromAdapter(adapter, opset=settings.opset, max_kv_tokens=max_kv,
                          max_batch=settings.max_decode_batch)(work / "decode.onnx")  # fmt: skip
    log(f"  exported in {time.perf_counter() - t0:.1f} s")
    bounds: dict[str, Any] = {
        "batch": (1, spec.max_tiles if spec.any_resolution else 1, settings.max_batch * spec.max_tiles),
        "sys_len": (1, min(35, settings.max_sys_tokens), settings.max_sys_tokens),
        "text_len": (1, min(settings.opt_text_tokens, settings.max_text_tokens), settings.max_text_tokens),
        "tokens": (1, opt_prompt, max_prompt),
        "decode_batch": (1, 1, settings.max_decode_batch),
        **{f"past_len_{layer}": (1, opt_prompt, max_kv) for layer in range(spec.num_layers)},
    }
    if spec.any_resolution:  # the image span's length is the image's own count, at most the largest image's
        bounds["image_len"] = (2, spec.visual_tokens, spec.visual_tokens)
    shape_values: dict[str, list[list[int]]] = {}
    if split:
        assert bake is not None
        shape_values["keep_counts"], shape_values["merged_counts"] = bake.table.count_ranges()
    for name, (low, _, high) in shape_values.items():  # one range for every value, for the passes' lint
        bounds[name] = (min(low), max(high), max(high))
    return _Exported(["vision", *parts, "embed", "decode"], split, bake, bounds, shape_values)


def _build_into(model_dir: Path, work: Path, out_dir: Path, choice: PlanChoice, settings: BuildSettings,
                log: Log) -> Manifest:  # fmt: skip
    start = time.perf_counter()
    load_dtype = torch_dtype(settings.dtype) if settings.low_memory else torch.float32
    adapter = load_adapter(model_dir, dtype=load_dtype, device=resolve_device(settings.device))
    if settings.low_memory:
        log(f"--low-memory: the model is loaded and exported in {settings.dtype} (no fp32 copy); the parity "
            f"check's reference is the executor in {settings.dtype}")  # fmt: skip
    spec: ModelSpec = adapter.spec
    exported = _export_graphs(adapter, work, choice, settings, log)
    adapter.save_preprocessing(work / PROCESSOR_DIR)
    inputs = prepare_check_inputs(adapter, work, settings.check_prompts)
    calib_feeds: list[dict[str, np.ndarray]] = []
    quant_doc: dict[str, Any] | None = None
    if settings.quantize is not None:
        quant_doc = {"mode": settings.quantize}
        if settings.quantize == "int8":
            assert settings.calib is not None
            calib_feeds, info = calibration_prefill_feeds(adapter, settings.calib, settings.calib_rows)
            quant_doc.update(info)
            log(f"prepared {len(calib_feeds)} calibration prompts from {settings.calib} for --quantize int8")
    generation = {"processor": PROCESSOR_DIR, "image_token_id": int(adapter.image_token_id),
                  "eos_token_ids": [int(i) for i in adapter.eos_token_ids],
                  "max_new_tokens": settings.max_new_tokens, "max_batch": settings.max_decode_batch}  # fmt: skip
    if not settings.check:
        # Nothing runs in PyTorch after the export: let the weights go before the passes read the graphs
        # (at 7B the model's pages and a graph's would not fit in memory together).
        adapter = None
        gc.collect()
    passes: list[dict[str, Any]] = []
    for name in exported.graph_names:
        passes += _optimize(work / f"{name}.onnx", settings.target, settings.dtype, exported.bounds, log)

    autoprune_doc = None
    bake = exported.bake
    if bake is not None:
        atomic_write_json(work / SCHEDULE_TABLE, bake.table.to_dict())
        autoprune_doc = {**bake.section.model_dump(), "n0": bake.n0, "table": SCHEDULE_TABLE,
                         "score_dtype": str(bake.score_dtype).removeprefix("torch.")}  # fmt: skip
    manifest_base = dict(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model={"path": str(Path(model_dir).resolve()), "fingerprint": spec.fingerprint(), **spec.to_json()},
        plan=choice.info,
        dtype=settings.dtype,
        target=settings.target,
        prefill_layout="split" if exported.split else "single",
        graphs={name: _graph_entry(work / f"{name}.onnx") for name in exported.graph_names},
        shape_ranges={k: list(v) for k, v in exported.bounds.items() if k not in exported.shape_values},
        shape_values=exported.shape_values,
        autoprune=autoprune_doc,
        passes=passes,
        versions=_versions(),
        generation=generation,
    )
    provisional = Manifest(flops={}, check=CheckReport(status="skipped"), **manifest_base)
    provisional.save(work)  # engines read the graph list from it; replaced below, renamed in last
    if quant_doc is not None:
        t0 = time.perf_counter()
        log(f"quantizing the prefill and decode graphs ({settings.quantize}, Q/DQ; vision and embed stay float)")
        quant_doc["graphs"] = quantize_build(work, provisional, settings.quantize, calib_feeds, spec.num_layers,
                                             target=settings.target, log=log)  # fmt: skip
        log(f"  quantized in {time.perf_counter() - t0:.1f} s")
        manifest_base["graphs"] = {name: _graph_entry(work / f"{name}.onnx") for name in exported.graph_names}
        manifest_base["quantization"] = quant_doc
        provisional = Manifest(flops={}, check=CheckReport(status="skipped"), **manifest_base)
        provisional.save(work)
    if adapter is None:
        log("parity check skipped (--skip-check): the graphs were not run")
        check, flops = CheckReport(status="skipped"), flops_doc(spec, choice)
    else:
        check, flops = check_build(adapter, work, provisional, choice, inputs, dtype=settings.dtype,
                                   quantize=settings.quantize, provider=settings.provider,
                                   new_tokens=settings.check_new_tokens, log=log)  # fmt: skip
    manifest = Manifest(flops=flops, check=check, **manifest_base)
    if check.status == "failed":
        (work / "manifest.json").unlink()
        atomic_write_json(work / CHECK_REPORT, check.model_dump(mode="json"))
        failed = out_dir.with_name(out_dir.name + ".failed")
        shutil.rmtree(failed, ignore_errors=True)
        os.replace(work, failed)
        work.mkdir()  # staged_directory removes it when the error below leaves the block
        raise BuildError(failure_message(check, dtype=settings.dtype, quantize=settings.quantize, kept_in=failed))
    if settings.target == "tensorrt":
        (work / TRT_COMMANDS).write_text(tensorrt_commands(manifest, workspace_gb=settings.workspace_gb))
        log(f"wrote {TRT_COMMANDS}: trtexec and polygraphy command lines for every engine, with the build's profiles")
        manifest = manifest.model_copy(update={"engines": _tensorrt_engines(work, manifest, settings, log)})
    manifest = manifest.with_file_digests(work)  # after the engines: their files are part of the build
    manifest.save(work)
    log(f"build finished in {time.perf_counter() - start:.1f} s")
    return manifest


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("prune-export", "torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime-gpu",
                 "onnxruntime", "polygraphy"):  # fmt: skip
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out["tensorrt"] = tensorrt_version()
    return out


def _tensor_specs(values: Any) -> list[TensorSpec]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims: list[int | str] = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        out.append(TensorSpec(name=v.name, dtype=onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, shape=dims))
    return out


def _graph_entry(path: Path) -> GraphEntry:
    model = onnx.load(str(path), load_external_data=False)
    data = path.with_name(path.name + ".data")
    return GraphEntry(
        file=path.name,
        inputs=_tensor_specs(model.graph.input),
        outputs=_tensor_specs(model.graph.output),
        external_data=data.name if data.exists() else None,
    )


def _optimize(path: Path, target: str, dtype: str, bounds: Mapping[str, Any], log: Log) -> list[dict[str, Any]]:
    """Run the graph_passes pipeline on ``path`` in place; return one report line per pass."""
    model = ir.load(str(path))
    # One bounds dict (and one float32 I/O list) serves every graph: names a graph does not use are ignored.
    pipeline = default_pipeline(target, dtype, bounds, keep_fp32_io=BakedPrefill.FLOAT32_IO)
    result = PassManager(pipeline).run(model)
    save_ir_for_ort(result.model, path)
    changed = [r.name for r in result.reports if r.modified]
    log(f"  passes on {path.name}: {', '.join(r.name for r in result.reports)} (changed: {', '.join(changed) or 'none'})")
    return [{"graph": path.stem, "pass": r.name, "modified": r.modified, "seconds": round(r.seconds, 3)}
            for r in result.reports]  # fmt: skip


def _tensorrt_engines(work: Path, manifest: Manifest, settings: BuildSettings, log: Log) -> EngineReport:
    """Build the engines where TensorRT is installed; otherwise say why there are none (the graphs stand)."""
    try:
        require_tensorrt()
    except BuildError as err:
        reason = f"{err}".split(":")[0]  # "TensorRT is not installed (...)"
        log(f"no TensorRT engine built: {reason}. The checked graphs are complete; build the engines on a machine "
            "with TensorRT with `prune-export engines BUILD_DIR`")  # fmt: skip
        return EngineReport(status="not_built", reason=str(err))
    report = _engine_report(work, manifest, workspace_gb=settings.workspace_gb, verbose=False, log=log)
    if report.status == "failed":
        log(f"TensorRT engine build failed: {report.reason}")
    return report


def _engine_report(
    build_dir: Path, manifest: Manifest, *, workspace_gb: float | None, verbose: bool, log: Log
) -> EngineReport:
    """Run :class:`engines.tensorrt.EnginesFromBuild`: the engines built, or why TensorRT refused one."""
    loader = EnginesFromBuild(build_dir, manifest, workspace_gb=workspace_gb, verbose=verbose, log=log)
    try:
        return EngineReport(status="built", files=loader(), tensorrt=tensorrt_version())
    except BuildError as err:
        return EngineReport(status="failed", reason=str(err), tensorrt=tensorrt_version())


def build_engines(
    build_dir: Path, *, workspace_gb: float | None = None, verbose: bool = False, log: Log = lambda message: None
) -> EngineReport:
    """TensorRT engines for an existing ``--target tensorrt`` build; the manifest records them (atomically).

    Raises :class:`BuildError` when TensorRT is missing or refuses a graph (the manifest then says so).
    """
    manifest = Manifest.load(build_dir, verify="full")
    EnginesFromBuild(build_dir, manifest)  # a build for another target is refused before TensorRT is asked for
    require_tensorrt()
    report = _engine_report(build_dir, manifest, workspace_gb=workspace_gb, verbose=verbose, log=log)
    manifest.model_copy(update={"engines": report}).with_file_digests(
        build_dir, only=[engine_file(g) for g in manifest.graphs]
    ).save(build_dir)
    if report.status == "failed":
        raise BuildError(report.reason or "TensorRT could not build an engine")
    return report
