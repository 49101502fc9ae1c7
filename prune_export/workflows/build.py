"""The build workflow: ``prune-export build``, ``engines``, ``inspect`` and the prefill ``bench``.

It imports all of exporter, graph_passes and
engines: it exports the graphs (exporter), runs the pass pipeline and census (graph_passes), runs them
(engines) and checks them against the PyTorch executor (exporter). Every default lives in
:class:`BuildSettings`.

A build is written into ``.<name>.partial-<pid>`` next to the output directory and renamed into place only
once every graph is exported, optimized and checked and ``manifest.json`` is written, so a failed build
never leaves a directory that looks complete. A build that fails its parity check is kept as
``<name>.failed`` (graphs plus ``check_report.json``, no manifest) for inspection.
"""

from __future__ import annotations

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

from prune_core.errors import BuildError
from prune_core.io import atomic_write_json, staged_directory
from prune_core.manifest import CheckOutput, CheckReport, EngineReport, GraphEntry, Manifest, TensorSpec
from prune_core.ops import Operation
from prune_core.plan import AutoPruneSection, FixedScheduleSection

Log = Callable[[str], None]

#: Parity tolerance (max abs difference of logits and KV caches) per precision.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 2e-1}
#: Prompts of the parity check: two images and two question lengths, run by one graph without re-export.
CHECK_PROMPTS = (
    (0, "What color is the square?"),
    (1, "How many dogs are there in this picture, and where are they standing? Answer in one sentence."),
)
CHECK_INPUTS = "check_inputs.npz"
#: Folder of a build that holds the tokenizer and image processor files.
PROCESSOR_DIR = "processor"
CHECK_REPORT = "check_report.json"
#: Largest relative difference between the graph's census FLOPs and the executor's count.
CENSUS_TOLERANCE = 0.01
#: Quantized builds: the largest error of an output over its reference's largest magnitude. A sanity bound
#: (a wrong scale or axis gives errors of the order of the values themselves; int8 rounding of weights and
#: activations gives a few percent up to ~0.12 on the demo models' KV caches): what the check requires of
#: a quantized build is the fp32 executor's greedy answers.
QUANT_RELATIVE_TOLERANCE = 0.25
PREFILL_INPUTS = ("sys_embeds", "image_embeds", "text_embeds", "cls_attention")


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
            profiles); the runtime refuses longer answers only where an engine was built for this bound.
        check_new_tokens: greedy tokens the parity check generates per check prompt.
        workspace_gb: TensorRT builder scratch memory cap (``None``: TensorRT's default, the whole GPU).
        quantize: ``int8`` (static Q/DQ of the weight matmuls, activations calibrated on ``calib``) or
            ``int8-weights`` (weight-only Q/DQ) for the prefill and decode graphs; ``None``: float graphs.
        calib / calib_rows: the calibration file of ``int8`` and how many of its first rows to use.
    """

    target: str = "onnxruntime"
    dtype: str = "fp32"
    opset: int = 20
    max_sys_tokens: int = 1024
    max_text_tokens: int = 4096
    opt_text_tokens: int = 64
    max_batch: int = 16
    check: bool = True
    provider: str = "auto"
    device: str = "cpu"
    low_memory: bool = False
    overwrite: bool = False
    workspace_gb: float | None = None
    max_new_tokens: int = 1024
    check_new_tokens: int = 8
    check_prompts: tuple[tuple[int, str], ...] = field(default=CHECK_PROMPTS)
    quantize: str | None = None
    calib: Path | None = None
    calib_rows: int = 16


@dataclass(frozen=True)
class PlanChoice:
    """What gets baked: static operations, the token section, and where they came from."""

    ops: frozenset[Operation] = frozenset()
    tokens: AutoPruneSection | FixedScheduleSection | None = None
    info: dict[str, Any] = field(default_factory=dict)


# -- helpers -------------------------------------------------------------------------------------------
def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("prune-export", "torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime-gpu",
                 "onnxruntime", "polygraphy"):  # fmt: skip
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    from engines.tensorrt import tensorrt_version

    out["tensorrt"] = tensorrt_version()
    return out


def _tensor_specs(values: Any) -> list[TensorSpec]:
    import onnx

    out = []
    for v in values:
        t = v.type.tensor_type
        dims: list[int | str] = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        out.append(TensorSpec(name=v.name, dtype=onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, shape=dims))
    return out


def _graph_entry(path: Path) -> GraphEntry:
    import onnx

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
    import onnx_ir as ir

    from exporter.baked import BakedPrefill
    from exporter.onnx_export import save_ir_for_ort
    from graph_passes import PassManager, default_pipeline

    model = ir.load(str(path))
    # One bounds dict (and one float32 I/O list) serves every graph: names a graph does not use are ignored.
    pipeline = default_pipeline(target, dtype, bounds, keep_fp32_io=BakedPrefill.FLOAT32_IO)
    result = PassManager(pipeline).run(model)
    save_ir_for_ort(result.model, path)
    changed = [r.name for r in result.reports if r.modified]
    log(f"  passes on {path.name}: {', '.join(r.name for r in result.reports)} (changed: {', '.join(changed) or 'none'})")
    return [{"graph": path.stem, "pass": r.name, "modified": r.modified, "seconds": round(r.seconds, 3)}
            for r in result.reports]  # fmt: skip


def _check_image(seed: int) -> Any:
    from PIL import Image

    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(90, 120, 3) * 255).astype("uint8"))


def _sorted_cache(out: Mapping[str, np.ndarray], layer: int) -> tuple[np.ndarray, np.ndarray]:
    """A layer's K and V from the graph in position order (the executor's order; stable for merged ties)."""
    order = np.argsort(out[f"present.{layer}.position"][0], kind="stable")
    return out[f"present.{layer}.key"][0][:, order], out[f"present.{layer}.value"][0][:, order]


def check_dtype_target(settings: BuildSettings) -> None:
    """Refuse, before any export, a precision the build could not check or run.

    ONNX Runtime's CPU provider has no bf16 kernels for several operators the graphs use (``Expand``,
    ``Gather`` of bf16 tensors, ...), so a bf16 graph neither runs there nor can be checked there. TensorRT
    runs bf16, but the parity check runs on ONNX Runtime; a bf16 TensorRT build is therefore made only
    when the user turns the check off.
    """
    if settings.dtype != "bf16":
        return
    if settings.target == "onnxruntime":
        raise BuildError(
            "--dtype bf16 is not available for --target onnxruntime: ONNX Runtime's CPU provider has no bf16 "
            "kernels for operators these graphs use, so the build could neither run nor check them; use "
            "--dtype fp16 (or fp32) for ONNX Runtime, or --target tensorrt for bf16"
        )
    if settings.check:
        raise BuildError(
            "--dtype bf16 --target tensorrt cannot be checked here: the parity check runs the graphs on ONNX "
            "Runtime, which has no bf16 kernels for them; pass --skip-check to build unchecked bf16 graphs for "
            "TensorRT (check the engine yourself), or use --dtype fp16, which is checked"
        )


# -- build ---------------------------------------------------------------------------------------------
def build(model_dir: Path, out_dir: Path, choice: PlanChoice, settings: BuildSettings, log: Log) -> Manifest:
    """Export, optimize, check and write one build directory; returns its manifest."""
    from exporter.adapters import load_adapter
    from graph_passes import TARGETS
    from graph_passes.cast import FLOAT_DTYPES

    if settings.target not in TARGETS:
        raise BuildError(f"unknown target {settings.target!r}; expected one of {list(TARGETS)}")
    if settings.dtype not in FLOAT_DTYPES:
        raise BuildError(f"unknown dtype {settings.dtype!r}; expected one of {sorted(FLOAT_DTYPES)}")
    check_dtype_target(settings)
    from prune_core.device import resolve_device

    resolve_device(settings.device)  # one line now, not after the export has started
    if settings.low_memory and settings.dtype == "fp32":
        raise BuildError("--low-memory exports the model in the precision it is built in: pass --dtype fp16 or bf16")
    from .quantize import check_quantize_options

    check_quantize_options(settings.quantize, settings.dtype, settings.calib, settings.low_memory)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not settings.overwrite:
        raise BuildError(
            f"{out_dir} already exists and is not empty; pass --overwrite to replace it, or choose another --out"
        )
    with staged_directory(out_dir) as work:
        manifest = _build_into(model_dir, work, out_dir, choice, settings, log, load_adapter)
    if manifest.engines is not None and manifest.engines.status == "failed":
        raise BuildError(
            f"{out_dir} holds the checked graphs and manifest.json, but TensorRT could not build an engine: "
            f"{manifest.engines.reason}; fix the cause and run `prune-export engines {out_dir}`"
        )
    return manifest


def _build_into(
    model_dir: Path, work: Path, out_dir: Path, choice: PlanChoice, settings: BuildSettings, log: Log,
    load_adapter: Callable[..., Any],
) -> Manifest:  # fmt: skip
    import torch

    from exporter.baked import AutoPruneBake
    from exporter.onnx_export import (
        DecodeOnnxFromAdapter,
        EmbedOnnxFromAdapter,
        OnnxFromPlan,
        VisionOnnxFromAdapter,
    )

    start = time.perf_counter()
    from prune_core.device import resolve_device, torch_dtype

    load_dtype = torch_dtype(settings.dtype) if settings.low_memory else torch.float32
    adapter = load_adapter(model_dir, dtype=load_dtype, device=resolve_device(settings.device))
    if settings.low_memory:
        log(f"--low-memory: the model is loaded and exported in {settings.dtype} (no fp32 copy); the parity "
            f"check's reference is the executor in {settings.dtype}")  # fmt: skip
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

    def exporter(part: str) -> OnnxFromPlan:
        return OnnxFromPlan(
            adapter, choice.ops, keep_stages, dtype=settings.dtype if settings.low_memory else "fp32",
            opset=settings.opset, max_sys_tokens=settings.max_sys_tokens,
            max_text_tokens=settings.max_text_tokens, positions=positions, autoprune=bake, part=part,
        )  # fmt: skip

    parts = {"prefill_head": "head", "prefill_tail": "tail"} if split else {"prefill": "full"}
    log(f"exporting vision.onnx (vision tower + projector, dynamic batch up to {settings.max_batch})")
    VisionOnnxFromAdapter(adapter, opset=settings.opset, max_batch=settings.max_batch)(work / "vision.onnx")
    for name, part in parts.items():
        t0 = time.perf_counter()
        log(f"exporting {name}.onnx ({len(choice.ops)} pruned operations, token section: "
            f"{tokens.kind if tokens else 'none'})")  # fmt: skip
        exporter(part)(work / f"{name}.onnx")
        log(f"  exported in {time.perf_counter() - t0:.1f} s")
    max_prompt = settings.max_sys_tokens + spec.visual_tokens + settings.max_text_tokens
    opt_prompt = min(35, settings.max_sys_tokens) + spec.visual_tokens + min(settings.opt_text_tokens, settings.max_text_tokens)
    max_kv = max_prompt + settings.max_new_tokens
    t0 = time.perf_counter()
    log("exporting embed.onnx (token embedding) and decode.onnx (one unpruned decoding step, per-layer caches)")
    EmbedOnnxFromAdapter(adapter, opset=settings.opset, max_tokens=max_prompt)(work / "embed.onnx")
    DecodeOnnxFromAdapter(adapter, opset=settings.opset, max_kv_tokens=max_kv)(work / "decode.onnx")
    log(f"  exported in {time.perf_counter() - t0:.1f} s")
    adapter.save_preprocessing(work / PROCESSOR_DIR)
    graph_names = ["vision", *parts, "embed", "decode"]
    inputs = _check_inputs(adapter, work, settings)
    calib_feeds: list[dict[str, np.ndarray]] = []
    quant_doc: dict[str, Any] | None = None
    if settings.quantize is not None:
        from .quantize import calibration_prefill_feeds

        quant_doc = {"mode": settings.quantize}
        if settings.quantize == "int8":
            assert settings.calib is not None
            calib_feeds, info = calibration_prefill_feeds(adapter, settings.calib, settings.calib_rows)
            quant_doc.update(info)
            log(f"prepared {len(calib_feeds)} calibration prompts from {settings.calib} for --quantize int8")
    generation = {"processor": PROCESSOR_DIR, "image_token_id": int(adapter.image_token_id),
                  "eos_token_ids": [int(i) for i in adapter.eos_token_ids],
                  "max_new_tokens": settings.max_new_tokens}  # fmt: skip
    if not settings.check:
        # Nothing runs in PyTorch after the export: let the weights go before the passes read the graphs
        # (at 7B the model's pages and a graph's would not fit in memory together).
        import gc

        adapter = None
        gc.collect()

    bounds: dict[str, Any] = {
        "batch": (1, 1, settings.max_batch),
        "sys_len": (1, min(35, settings.max_sys_tokens), settings.max_sys_tokens),
        "text_len": (1, min(settings.opt_text_tokens, settings.max_text_tokens), settings.max_text_tokens),
        "tokens": (1, opt_prompt, max_prompt),
        **{f"past_len_{layer}": (1, opt_prompt, max_kv) for layer in range(spec.num_layers)},
    }
    shape_values: dict[str, list[list[int]]] = {}
    if split:
        assert bake is not None
        shape_values["keep_counts"], shape_values["merged_counts"] = bake.table.count_ranges()
    for name, (low, _, high) in shape_values.items():  # one range for every value, for the passes' lint
        bounds[name] = (min(low), max(high), max(high))
    passes: list[dict[str, Any]] = []
    for name in graph_names:
        passes += _optimize(work / f"{name}.onnx", settings.target, settings.dtype, bounds, log)

    autoprune_doc = None
    if bake is not None:
        atomic_write_json(work / "schedule_table.json", bake.table.to_dict())
        autoprune_doc = {**bake.section.model_dump(), "n0": bake.n0, "table": "schedule_table.json",
                         "score_dtype": str(bake.score_dtype).removeprefix("torch.")}  # fmt: skip
    graphs = {name: _graph_entry(work / f"{name}.onnx") for name in graph_names}
    manifest_base = dict(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model={"path": str(Path(model_dir).resolve()), "fingerprint": spec.fingerprint(), **spec.to_json()},
        plan=choice.info,
        dtype=settings.dtype,
        target=settings.target,
        prefill_layout="split" if split else "single",
        graphs=graphs,
        shape_ranges={k: list(v) for k, v in bounds.items() if k not in shape_values},
        shape_values=shape_values,
        autoprune=autoprune_doc,
        passes=passes,
        versions=_versions(),
        generation=generation,
    )
    provisional = Manifest(flops={}, check=CheckReport(status="skipped"), **manifest_base)
    provisional.save(work)  # engines read the graph list from it; replaced below, renamed in last
    if quant_doc is not None:
        from .quantize import quantize_build

        t0 = time.perf_counter()
        log(f"quantizing the prefill and decode graphs ({settings.quantize}, Q/DQ; vision and embed stay float)")
        quant_doc["graphs"] = quantize_build(work, provisional, settings.quantize, calib_feeds, spec.num_layers,
                                             target=settings.target, log=log)
        log(f"  quantized in {time.perf_counter() - t0:.1f} s")
        manifest_base["graphs"] = {name: _graph_entry(work / f"{name}.onnx") for name in graph_names}
        manifest_base["quantization"] = quant_doc
        provisional = Manifest(flops={}, check=CheckReport(status="skipped"), **manifest_base)
        provisional.save(work)
    check, flops = _check(adapter, spec, inputs, work, provisional, choice, settings, log)
    manifest = Manifest(flops=flops, check=check, **manifest_base)
    if check.status == "failed":
        (work / "manifest.json").unlink()
        atomic_write_json(work / CHECK_REPORT, check.model_dump(mode="json"))
        failed = out_dir.with_name(out_dir.name + ".failed")
        shutil.rmtree(failed, ignore_errors=True)
        os.replace(work, failed)
        work.mkdir()  # staged_directory removes it when the error below leaves the block
        bad = [o for o in check.outputs if not o.ok]
        lines = "\n".join(
            f"  {o.name}: max relative diff {o.max_rel_diff or float('inf'):.3g} > tolerance {o.tolerance:g}"
            if o.tolerance_kind == "relative" else f"  {o.name}: max abs diff {o.max_abs_diff:.3g} > tolerance {o.tolerance:g}"
            for o in bad[:12]
        )
        more = f"\n  ... and {len(bad) - 12} more" if len(bad) > 12 else ""
        token = "" if check.same_next_token else "\n  the greedy next token differs"
        if check.same_generation is False and settings.dtype == "fp32":
            token += "\n  the greedy answers through the graphs (embed, prefill, decode) differ from the executor's"
        what = f"{settings.dtype}, {settings.quantize}" if settings.quantize else settings.dtype
        raise BuildError(
            f"the exported graphs do not match the PyTorch executor ({what}, provider {check.provider}):\n"
            f"{lines}{more}{token}\nthe graphs and {CHECK_REPORT} are kept in {failed} for inspection; "
            "rebuild with --skip-check only if you know why they differ"
        )
    if settings.target == "tensorrt":
        from engines.tensorrt import tensorrt_commands

        (work / TRT_COMMANDS).write_text(tensorrt_commands(manifest, workspace_gb=settings.workspace_gb))
        log(f"wrote {TRT_COMMANDS}: trtexec and polygraphy command lines for every engine, with the build's profiles")
        manifest = manifest.model_copy(update={"engines": _tensorrt_engines(work, manifest, settings, log)})
    manifest = manifest.with_file_digests(work)  # after the engines: their files are part of the build
    manifest.save(work)
    log(f"build finished in {time.perf_counter() - start:.1f} s")
    return manifest


#: The trtexec / polygraphy command lines of a ``--target tensorrt`` build (:func:`engines.tensorrt.tensorrt_commands`).
TRT_COMMANDS = "tensorrt_commands.sh"


def _tensorrt_engines(work: Path, manifest: Manifest, settings: BuildSettings, log: Log) -> EngineReport:
    """Build the engines where TensorRT is installed; otherwise say why there are none (the graphs stand)."""
    from engines.tensorrt import require_tensorrt

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
    from engines.tensorrt import EnginesFromBuild, tensorrt_version

    loader = EnginesFromBuild(build_dir, manifest, workspace_gb=workspace_gb, verbose=verbose, log=log)
    try:
        return EngineReport(status="built", files=loader(), tensorrt=tensorrt_version())
    except BuildError as err:
        return EngineReport(status="failed", reason=str(err), tensorrt=tensorrt_version())


@dataclass
class _CheckInputs:
    """The check prompts, prepared once right after the export: samples, pixels and prefill feeds."""

    samples: list[Any]
    pixels: list[Any]
    feeds: list[dict[str, np.ndarray]]


def _check_inputs(adapter: Any, work: Path, settings: BuildSettings) -> _CheckInputs:
    """Tokenize the check prompts and run the vision tower; writes ``check_inputs.npz`` (``inspect``, ``bench``)."""
    from exporter.baked import BakedPrefill
    from exporter.sample import build_sample

    samples, pixels = [], []
    for seed, question in settings.check_prompts:
        tokens = adapter.tokenize(_check_image(seed), question)
        vision = adapter.vision(tokens.pixel_values)
        pixels.append(tokens.pixel_values)
        samples.append(build_sample(adapter, tokens.input_ids, tokens.image_start, tokens.image_end,
                                    vision.features[0], vision.cls_attention[0]))  # fmt: skip
    feeds = [
        dict(zip(PREFILL_INPUTS, (x.float().cpu().numpy() for x in BakedPrefill.inputs_from_sample(s)), strict=True))
        for s in samples
    ]
    np.savez(work / CHECK_INPUTS, pixel_values=pixels[0].float().cpu().numpy(), **feeds[0])
    return _CheckInputs(samples, pixels, feeds)


def _check(
    adapter: Any, spec: Any, inputs: _CheckInputs, work: Path, manifest: Manifest, choice: PlanChoice,
    settings: BuildSettings, log: Log,
) -> tuple[CheckReport, dict[str, Any]]:  # fmt: skip
    """Parity of vision and prefill against the executor, and census FLOPs against the cost model.

    With the check off (``adapter`` is then None) nothing runs: the FLOPs document holds the plan's ratio only.
    """
    import torch

    from engines.onnxruntime import OrtRunner, SessionFromOnnx
    from engines.prefill import PrefillRunner
    from exporter.executor import PlanExecutor

    from .selection import token_policy

    lm_head = 2 * spec.hidden_size * spec.vocab_size  # the graph's one logits row; the cost model leaves it out
    if not settings.check:
        log("parity check skipped (--skip-check): the graphs were not run")
        return CheckReport(status="skipped"), _flops_doc(spec, choice, [], [], lm_head)
    tolerance = TOLERANCE[settings.dtype]
    executor = PlanExecutor(adapter)
    policy = token_policy(choice.tokens, spec, mode="table")  # what the graph does: the schedule table
    samples, pixels, feeds = inputs.samples, inputs.pixels, inputs.feeds
    references = [executor.prefill(s, choice.ops, policy) for s in samples]
    flops = _flops_doc(spec, choice, samples, references, lm_head)

    log(f"checking against the PyTorch executor on {len(samples)} prompts (tolerance {tolerance:g})")
    results: dict[str, float] = {}
    scales: dict[str, float] = {}

    def record(name: str, diff: float, ref: Any = None) -> None:
        results[name] = max(results.get(name, 0.0), diff)
        if ref is not None:
            scales[name] = max(scales.get(name, 0.0), float(np.abs(np.asarray(ref, dtype=np.float64)).max(initial=0.0)))

    vision = OrtRunner(SessionFromOnnx(work / "vision.onnx", provider=settings.provider)())
    batch = torch.cat(pixels)
    ref = adapter.vision(batch)
    pixel_dtype = vision.input_metadata()["pixel_values"][0]
    got = vision.infer({"pixel_values": batch.float().cpu().numpy().astype(pixel_dtype)})
    ref_features, ref_cls = ref.features.double().cpu().numpy(), ref.cls_attention.double().cpu().numpy()
    record("vision.image_features", float(np.abs(got["image_features"].astype(np.float64) - ref_features).max()), ref_features)
    record("vision.cls_attention", float(np.abs(got["cls_attention"].astype(np.float64) - ref_cls).max()), ref_cls)

    prefill = PrefillRunner(work, provider=settings.provider, manifest=manifest)
    same_token = True
    next_token_ties = 0
    graph_flops = []
    for result, feed in zip(references, feeds, strict=True):
        out = prefill.infer(_cast_feeds(prefill, feed))
        logits = out["logits"][0].astype(np.float64)
        ref_logits = result.logits.double().cpu().numpy()
        diff = float(np.abs(logits - ref_logits).max())
        record("logits", diff, ref_logits)
        if int(logits.argmax()) != int(result.logits.argmax()):
            if settings.quantize is not None and _near_tie(ref_logits, diff):
                next_token_ties += 1
            else:
                same_token = False
        assert result.cache is not None
        for layer, cache in enumerate(result.cache):
            keys, values = _sorted_cache(out, layer)
            if keys.shape != tuple(cache.keys.shape):
                record(f"present.{layer}.key", float("inf"))
                continue
            ref_keys, ref_values = cache.keys.double().cpu().numpy(), cache.values.double().cpu().numpy()
            record(f"present.{layer}.key", float(np.abs(keys.astype(np.float64) - ref_keys).max()), ref_keys)
            record(f"present.{layer}.value", float(np.abs(values.astype(np.float64) - ref_values).max()), ref_values)
        if policy is not None and hasattr(result.policy, "decision"):
            decision = result.policy.decision
            if list(out["autoprune.keep"]) != list(decision.schedule.keep):
                record("autoprune.keep", float("inf"))
            if list(out["autoprune.merged"]) != list(decision.schedule.merged):
                record("autoprune.merged", float("inf"))
        graph_flops.append(_graph_flops(prefill, feed))
        expected = result.flops + lm_head
        record("census_flops_relative", abs(graph_flops[-1] - expected) / expected)
    same_generation, generated, ties = _check_generation(adapter, work, manifest, choice, policy, settings, samples,
                                                         record)
    ties += next_token_ties
    outputs = [_check_output(name, diff, scales.get(name), tolerance, settings.quantize is not None,
                             choice.tokens is not None)
               for name, diff in results.items()]
    # Token-for-token equality is the contract in fp32; in fp16/bf16 rounding may flip a near tie, so there
    # the step logits (compared while the tokens agree) carry the check.
    ok = all(o.ok for o in outputs) and same_token and (same_generation or settings.dtype != "fp32")
    worst = max((o for o in outputs if o.name != "census_flops_relative"), key=lambda o: o.max_abs_diff)
    if settings.quantize is not None:
        bounded = [o for o in outputs if o.tolerance_kind == "relative" and o.tolerance is not None]
        worst_rel = max(bounded, key=lambda o: o.max_rel_diff or 0.0)
        log(f"  {settings.quantize}: largest bounded relative error {worst_rel.name} {worst_rel.max_rel_diff:.3g} "
            f"(bound {QUANT_RELATIVE_TOLERANCE:g}); the greedy answers must be the fp32 executor's")
    log(f"  {'passed' if ok else 'FAILED'} on {prefill.provider}: logits max abs diff {results['logits']:.3g}, "
        f"worst output {worst.name} {worst.max_abs_diff:.3g}, same next token: {same_token}, same greedy "
        f"answers ({'/'.join(map(str, generated))} tokens): {same_generation}"
        + (f" ({ties} near tie(s) broken by the quantization)" if ties else ""))  # fmt: skip
    flops["graph_per_check_prompt"] = graph_flops
    report = CheckReport(
        status="passed" if ok else "failed", provider=prefill.provider, samples=len(samples),
        tolerance=tolerance, same_next_token=same_token, same_generation=same_generation,
        generated_tokens=generated, outputs=outputs, near_ties=ties if settings.quantize is not None else None,
    )  # fmt: skip
    return report, flops


def _check_generation(
    adapter: Any, work: Path, manifest: Manifest, choice: PlanChoice, policy: Any, settings: BuildSettings,
    samples: list[Any], record: Callable[..., None],
) -> tuple[bool, list[int], int]:  # fmt: skip
    """Greedy answers through the build's runtime (copied processor, embed, vision, prefill, decode) against
    the executor's ``generate``: the prompt ids, every token, and the logits of every step while they agree."""
    from engines.generate import GenerationRunner
    from exporter.executor import PlanExecutor

    executor = PlanExecutor(adapter)
    runner = GenerationRunner(work, provider=settings.provider, manifest=manifest)
    same, generated, ties = True, [], 0
    for (seed, question), sample in zip(settings.check_prompts, samples, strict=True):
        prompt = runner.prompt(_check_image(seed), question)
        if prompt.input_ids.tolist() != sample.input_ids.tolist():
            record("generate.prompt_ids", float("inf"))
        ref = executor.generate(sample, choice.ops, policy, max_new_tokens=settings.check_new_tokens)
        got = runner.generate(_check_image(seed), question, settings.check_new_tokens, keep_logits=True)
        generated.append(len(ref.token_ids))
        agree = 0
        for a, b in zip(got.token_ids, ref.token_ids, strict=False):
            if a != b:
                break
            agree += 1
        # Logits of the steps up to the first disagreement (inclusive: both saw the same past there).
        diff = 0.0
        for mine, theirs in list(zip(got.step_logits, ref.step_logits, strict=False))[: agree + 1]:
            ref_step = theirs.double().cpu().numpy()
            diff = float(np.abs(mine.astype(np.float64) - ref_step).max())
            record("generate.step_logits", diff, ref_step)
        if got.token_ids != ref.token_ids:
            if settings.quantize is not None and agree < len(ref.step_logits) and _near_tie(ref.step_logits[agree], diff):
                ties += 1
            else:
                same = False
    runner.deactivate()
    return same, generated, ties


def _near_tie(reference: Any, error: float) -> bool:
    """Whether the reference's two best logits are closer than twice the graph's measured logits error: a
    tie that the rounding of a quantized graph may break either way (reported, not a failure)."""
    top = np.sort(np.asarray(reference.double().cpu().numpy() if hasattr(reference, "double") else reference,
                             dtype=np.float64).reshape(-1))[-2:]
    return bool(top[1] - top[0] <= 2 * error)


def _check_output(name: str, diff: float, scale: float | None, tolerance: float, quantized: bool,
                  selects_tokens: bool) -> CheckOutput:
    """One checked output: absolute tolerance (float graphs, the census's relative one), or for the quantized
    graphs' outputs a bound on the error relative to the reference's largest magnitude. A quantized build
    that selects tokens may keep other tokens than the executor (the scores come from int8 projections):
    its KV caches are reported, not bounded."""
    rel = diff / scale if scale else None
    if name == "census_flops_relative":
        return CheckOutput(name=name, max_abs_diff=diff, tolerance=CENSUS_TOLERANCE, ok=diff <= CENSUS_TOLERANCE)
    if quantized and selects_tokens and name.startswith("present."):
        return CheckOutput(name=name, max_abs_diff=diff, tolerance=None, ok=True, max_rel_diff=rel,
                           tolerance_kind="relative")
    if quantized and not name.startswith("vision."):
        ok = diff == 0.0 or (rel is not None and rel <= QUANT_RELATIVE_TOLERANCE)
        return CheckOutput(name=name, max_abs_diff=diff, tolerance=QUANT_RELATIVE_TOLERANCE, ok=ok, max_rel_diff=rel,
                           tolerance_kind="relative")
    return CheckOutput(name=name, max_abs_diff=diff, tolerance=tolerance, ok=diff <= tolerance, max_rel_diff=rel)


def _cast_feeds(prefill: Any, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds in the dtypes the (possibly fp16/bf16) graph declares."""
    meta = prefill.input_metadata()
    return {k: v.astype(meta[k][0]) if k in meta else v for k, v in feed.items()}


def _flops_doc(spec: Any, choice: PlanChoice, samples: list[Any], results: list[Any], lm_head: int) -> dict[str, Any]:
    """What the plan promises: the ladder ratio at the reference prompt, and the executed check prompts."""
    from prune_core.cost import prefill_flops

    doc: dict[str, Any] = {"static_ratio": choice.info.get("flops_ratio", 1.0), "lm_head_row": lm_head}
    per = []
    for s, result in zip(samples, results, strict=True):
        dense = prefill_flops(spec, s.sizes)
        per.append({"tokens": s.num_tokens, "dense": dense, "executed": result.flops, "ratio": result.flops / dense})
    if per:
        doc["check_prompts"] = per
    return doc


def _graph_flops(prefill: Any, feed: Mapping[str, np.ndarray]) -> int:
    """Matmul FLOPs of a build's prefill graph(s) for these inputs, counted from the graph itself."""
    from graph_passes import census

    feed = _cast_feeds(prefill, feed)
    graph = prefill.manifest.graph_path
    if prefill.manifest.prefill_layout == "single":
        return census(graph(prefill.build_dir, "prefill"), input_values=feed).matmul_flops
    _, tail_feeds = prefill.run_head(feed)
    return (census(graph(prefill.build_dir, "prefill_head"), input_values=feed).matmul_flops
            + census(graph(prefill.build_dir, "prefill_tail"), input_values=tail_feeds).matmul_flops)  # fmt: skip


def build_engines(
    build_dir: Path, *, workspace_gb: float | None = None, verbose: bool = False, log: Log = lambda message: None
) -> EngineReport:
    """TensorRT engines for an existing ``--target tensorrt`` build; the manifest records them (atomically).

    Raises :class:`BuildError` when TensorRT is missing or refuses a graph (the manifest then says so).
    """
    from engines.tensorrt import EnginesFromBuild, require_tensorrt

    manifest = Manifest.load(build_dir, verify="full")
    EnginesFromBuild(build_dir, manifest)  # a build for another target is refused before TensorRT is asked for
    require_tensorrt()
    report = _engine_report(build_dir, manifest, workspace_gb=workspace_gb, verbose=verbose, log=log)
    from engines.tensorrt import engine_file

    manifest.model_copy(update={"engines": report}).with_file_digests(
        build_dir, only=[engine_file(g) for g in manifest.graphs]
    ).save(build_dir)
    if report.status == "failed":
        raise BuildError(report.reason or "TensorRT could not build an engine")
    return report


# -- inspect -------------------------------------------------------------------------------------------
def load_check_inputs(build_dir: Path) -> dict[str, np.ndarray]:
    path = Path(build_dir) / CHECK_INPUTS
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except OSError as exc:
        raise BuildError(f"cannot read {path}: {exc}; rebuild the directory with `prune-export build`") from None


def prompt_feeds(build_dir: Path, text_tokens: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Prefill inputs: the build's check prompt, or with ``text_tokens`` text rows drawn like its embeddings."""
    base = load_check_inputs(build_dir)
    feed = {k: base[k] for k in PREFILL_INPUTS}
    if text_tokens is not None:
        if text_tokens < 1:
            raise BuildError(f"--text-tokens must be >= 1, got {text_tokens}")
        rng = np.random.default_rng(seed)
        txt = feed["text_embeds"]
        std = float(txt.std()) or 1.0
        feed["text_embeds"] = (rng.standard_normal((1, text_tokens, txt.shape[2])) * std).astype(txt.dtype)
    return feed


def inspect_build(build_dir: Path, text_tokens: int | None = None, *, run: bool = True) -> dict[str, Any]:
    """Op counts and matmul FLOPs of the prefill graph(s) for one prompt, computed from the graphs.

    With ``run=False`` the graphs are never run: the FLOPs come from shape inference alone (ONNX's, then
    ONNX Runtime's symbolic one: census method ``static``; no weights are loaded, for builds too large to
    run on this machine, a 7B fp16 graph on a CPU), and the per-layer KV lengths (read from a run) are None. Shapes that depend on the prompt's values (AutoPrune)
    cannot be inferred: such a build is refused.
    """
    import onnx

    from engines.prefill import PrefillRunner
    from graph_passes import census

    manifest = Manifest.load(build_dir, verify="full")
    feed = prompt_feeds(build_dir, text_tokens)
    names = ["prefill"] if manifest.prefill_layout == "single" else ["prefill_head", "prefill_tail"]
    out: dict[str, np.ndarray] = {}
    if run:
        prefill = PrefillRunner(build_dir, provider="cpu", manifest=manifest)
        flops = _graph_flops(prefill, feed)
        out = prefill.infer(_cast_feeds(prefill, feed))
    elif manifest.prefill_layout != "single" or manifest.autoprune is not None:
        raise BuildError(
            f"inspect --no-run cannot count {build_dir}: its AutoPrune prefill keeps a number of tokens that "
            "depends on the prompt, which shape inference cannot know without running the graph; inspect "
            "it without --no-run"
        )
    else:
        try:
            flops = census(manifest.graph_path(build_dir, "prefill"), input_values=feed, method="static").matmul_flops
        except BuildError as err:
            raise BuildError(f"inspect --no-run cannot count {build_dir}: {err}; inspect it without --no-run") from None
    from graph_passes.quantize import weight_matmuls, weight_matmuls_after

    op_counts: dict[str, dict[str, int]] = {}
    counts_total: dict[str, int] = {}
    weight_mm = quantized_mm = 0
    for name in names:
        model = onnx.load(str(manifest.graph_path(build_dir, name)), load_external_data=False)
        quantized_mm += len(weight_matmuls_after(model))
        weight_mm += len(weight_matmuls(model)) + len(weight_matmuls_after(model))
        counts: dict[str, int] = {}
        for node in model.graph.node:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            counts[key] = counts.get(key, 0) + 1
        op_counts[name] = dict(sorted(counts.items()))
        for k, v in counts.items():
            counts_total[k] = counts_total.get(k, 0) + v
    kv = [int(out[f"present.{layer}.key"].shape[2]) for layer in range(manifest.model["num_layers"])] if run else None
    sys_len, txt_len = feed["sys_embeds"].shape[1], feed["text_embeds"].shape[1]
    doc: dict[str, Any] = {
        "build": str(build_dir),
        "target": manifest.target,
        "dtype": manifest.dtype,
        "prefill_layout": manifest.prefill_layout,
        "prompt": {"sys_tokens": int(sys_len), "visual_tokens": int(feed["image_embeds"].shape[1]),
                   "text_tokens": int(txt_len)},  # fmt: skip
        "matmul_flops": int(flops),
        "kv_tokens_per_layer": kv,
        "op_counts": dict(sorted(counts_total.items())),
        "op_counts_per_graph": op_counts,
        "plan": manifest.plan,
        "quantization": manifest.quantization["mode"] if manifest.quantization else None,
        "weight_matmuls": weight_mm,
        "quantized_matmuls": quantized_mm,
    }
    if "autoprune.keep" in out:
        doc["autoprune"] = {"complexity": float(out["autoprune.complexity"].reshape(-1)[0]),
                            "keep": [int(x) for x in out["autoprune.keep"]],
                            "merged": [int(x) for x in out["autoprune.merged"]]}  # fmt: skip
    return doc


# -- bench ---------------------------------------------------------------------------------------------
def check_same_model(pruned_dir: Path, pruned_m: Manifest, dense_dir: Path, dense_m: Manifest) -> None:
    """Refuse to compare two builds of different models."""
    if pruned_m.model["fingerprint"] != dense_m.model["fingerprint"]:
        raise BuildError(
            f"{pruned_dir} and {dense_dir} were built from different models (fingerprints "
            f"{pruned_m.model['fingerprint']} and {dense_m.model['fingerprint']}); build the baseline from the same model"
        )


def bench_builds(
    pruned_dir: Path, dense_dir: Path, *, runs: int, warmup: int, provider: str, threads: int | None,
    text_tokens: int | None, progress: Callable[[int, int], None] | None = None,
    feed: Mapping[str, np.ndarray] | None = None,
) -> Any:  # fmt: skip
    """Interleaved prefill latency of two builds on the same inputs, next to their graph FLOPs.

    The inputs are ``feed`` when given, else the pruned build's check prompt (``text_tokens``: with that many
    text rows instead).
    """
    from engines.benchmark import SpeedupReport, compare_latency
    from engines.prefill import PrefillRunner

    pruned_m, dense_m = Manifest.load(pruned_dir, verify="full"), Manifest.load(dense_dir, verify="full")
    check_same_model(pruned_dir, pruned_m, dense_dir, dense_m)
    feed = dict(feed) if feed is not None else prompt_feeds(pruned_dir, text_tokens)
    pruned = PrefillRunner(pruned_dir, provider=provider, threads=threads, manifest=pruned_m)  # type: ignore[arg-type]
    dense = PrefillRunner(dense_dir, provider=provider, threads=threads, manifest=dense_m)  # type: ignore[arg-type]
    if pruned.provider != dense.provider:
        raise BuildError(f"the two builds run on different providers ({pruned.provider} vs {dense.provider})")
    pruned_feed, dense_feed = _cast_feeds(pruned, feed), _cast_feeds(dense, feed)
    dense_flops = _graph_flops(dense, feed)
    pruned_flops = _graph_flops(pruned, feed)
    dense_stats, pruned_stats = compare_latency(
        lambda: dense.infer(dense_feed), lambda: pruned.infer(pruned_feed), runs=runs, warmup=warmup, progress=progress
    )
    meta = {
        "prompt_tokens": int(feed["sys_embeds"].shape[1] + feed["image_embeds"].shape[1] + feed["text_embeds"].shape[1]),
        "threads": threads,
        "pruned_build": str(pruned_dir),
        "dense_build": str(dense_dir),
        "dtype": pruned_m.dtype,
    }
    return SpeedupReport(dense_stats, pruned_stats, dense_flops, pruned_flops, pruned.provider, meta)
