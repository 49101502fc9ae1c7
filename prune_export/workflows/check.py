"""Checking a build against the PyTorch executor: the graphs' outputs, greedy answers and FLOPs.

The check runs at build time (:mod:`.build` calls :func:`check_build` with the build's own model and
options, passed explicitly) and again on a finished build with ``prune-export check``
(:func:`recheck_build`: after copying a build to another machine, upgrading ONNX Runtime or editing a graph
by hand; nothing in the build is written). It compares, on the check prompts (:data:`CHECK_PROMPTS`):

* the vision graph's features and [CLS] attention with the adapter's vision tower;
* the prefill graph(s)' logits, every layer's KV cache (in position order) and, for AutoPrune, the keep and
  merge counts with the executor's prefill under the same plan (AutoPrune in table mode: what the graph does);
* the matmul FLOPs counted from the graph (census) with the executor's count plus the LM head's row;
* greedy answers through the build's runtime (its copied processor, embed, vision, prefill and decode
  graphs) with the executor's ``generate``, token for token, and the logits of every step while they agree.

Float builds are held to an absolute tolerance per precision (:data:`TOLERANCE`). Quantized builds are held
to a relative bound (:data:`QUANT_RELATIVE_TOLERANCE`) and to the executor's greedy answers. A flip of the
greedy token is a near tie only when the executor's top-2 gap there is at most twice the largest logits error
measured where the tokens *agree* (an error bound independent of the flipped step), and at most
:data:`MAX_NEAR_TIES` near ties pass; every flip is reported with its gap and the bound.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.batching import PaddedCache
from engines.generate import GenerationRunner
from engines.onnxruntime import OrtRunner, SessionFromOnnx
from engines.prefill import PrefillRunner
from exporter.adapters import load_adapter, load_spec
from exporter.baked import BakedPrefill
from exporter.executor import PlanExecutor
from exporter.sample import build_sample
from prune_core import defaults
from prune_core.cost import lm_head_flops, prefill_flops
from prune_core.device import resolve_device
from prune_core.errors import BuildDirError, BuildError
from prune_core.manifest import (
    CHECK_INPUTS,
    CHECK_REPORT,
    CheckOutput,
    CheckReport,
    Manifest,
    TokenFlip,
    max_decode_batch,
    verify_files,
)
from prune_core.ops import Operation
from prune_core.plan import AutoPruneSection, FixedScheduleSection
from prune_core.spec import ModelSpec

from .open_build import cast_feeds, graph_flops, synthetic_image
from .selection import PlanChoice, token_policy

Log = Callable[[str], None]

#: Parity tolerance (max abs difference of logits and KV caches) per precision.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 2e-1}
#: Prompts of the parity check: two images (:func:`.open_build.synthetic_image` seeds) and two question
#: lengths, run by one graph without re-export.
CHECK_PROMPTS = (
    (0, "What color is the square?"),
    (1, "How many dogs are there in this picture, and where are they standing? Answer in one sentence."),
)
#: Largest relative difference between the graph's census FLOPs and the executor's count.
CENSUS_TOLERANCE = 0.01
#: Quantized builds: the largest error of an output over its reference's largest magnitude. A sanity bound
#: (a wrong scale or axis gives errors of the order of the values themselves; int8 rounding of weights and
#: activations gives a few percent up to ~0.12 on the demo models' KV caches): what the check requires of
#: a quantized build is the fp32 executor's greedy answers.
QUANT_RELATIVE_TOLERANCE = 0.25
#: Quantized builds: greedy-token decisions that may flip at a near tie and still pass, of the four the
#: check compares (each check prompt's next token from the prefill graph, and its answer through the runtime).
MAX_NEAR_TIES = 2


@dataclass
class CheckInputs:
    """The check prompts, prepared once right after the export: prompts, samples, pixels and prefill feeds."""

    prompts: Sequence[tuple[int, str]]
    samples: list[Any]
    pixels: list[Any]
    feeds: list[dict[str, np.ndarray]]


def prepare_check_inputs(adapter: Any, work: Path, prompts: Sequence[tuple[int, str]] = CHECK_PROMPTS) -> CheckInputs:
    """Tokenize the check prompts and run the vision tower; writes ``check_inputs.npz`` (``inspect``, ``bench``)."""
    samples, pixels = [], []
    for seed, question in prompts:
        tokens = adapter.tokenize(synthetic_image(seed), question)
        vision = adapter.vision(tokens.pixel_values, tokens.image_sizes)
        if adapter.spec.any_resolution:  # the vision graph's input: this image's tower inputs (base + tiles)
            h, w = (int(x) for x in tokens.image_sizes[0])
            pixels.append(tokens.pixel_values[0][: adapter.spec.tiles_for(h, w)])
        else:
            pixels.append(tokens.pixel_values)
        samples.append(build_sample(adapter, tokens.input_ids, tokens.image_start, tokens.image_end,
                                    vision.features[0], vision.cls_attention[0]))  # fmt: skip
    feeds = [BakedPrefill.feeds_from_sample(s) for s in samples]
    np.savez(work / CHECK_INPUTS, pixel_values=pixels[0].float().cpu().numpy(), **feeds[0])
    return CheckInputs(tuple(prompts), samples, pixels, feeds)


def flops_doc(spec: ModelSpec, choice: PlanChoice, samples: Sequence[Any] = (), results: Sequence[Any] = ()) -> dict[str, Any]:
    """What the plan promises: the ladder ratio at the reference prompt, and the executed check prompts."""
    doc: dict[str, Any] = {"static_ratio": choice.info.get("flops_ratio", 1.0), "lm_head_row": lm_head_flops(spec)}
    per = []
    for s, result in zip(samples, results, strict=True):
        dense = prefill_flops(spec, s.sizes)
        per.append({"tokens": s.num_tokens, "dense": dense, "executed": result.flops, "ratio": result.flops / dense})
    if per:
        doc["check_prompts"] = per
    return doc


@dataclass
class _Differences:
    """The largest difference seen per output, and the largest magnitude of its reference (relative errors)."""

    diffs: dict[str, float] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)

    def record(self, name: str, diff: float, ref: Any = None) -> None:
        self.diffs[name] = max(self.diffs.get(name, 0.0), diff)
        if ref is not None:
            peak = float(np.abs(np.asarray(ref, dtype=np.float64)).max(initial=0.0))
            self.scales[name] = max(self.scales.get(name, 0.0), peak)

    def compare(self, name: str, got: np.ndarray, ref: np.ndarray) -> None:
        self.record(name, float(np.abs(got.astype(np.float64) - ref).max()), ref)


@dataclass(frozen=True)
class _Flip:
    """A step where the graphs' greedy token left the executor's, with the executor's logits there."""

    output: str  # "logits": the prefill's next token; "generate": a step of the greedy answer
    prompt: int
    step: int
    reference: np.ndarray


def top2_gap(logits: Any) -> float:
    """How far apart the two best logits are."""
    top = np.sort(np.asarray(logits, dtype=np.float64).reshape(-1))[-2:]
    return float(top[1] - top[0])


def classify_flips(flips: Sequence[_Flip], agree_errors: Sequence[float], quantized: bool) -> list[TokenFlip]:
    """Each flip with its gap; for a quantized build, a near tie when the gap is at most twice the largest
    logits error measured where the tokens agree (no agreeing step: no near tie)."""
    bound = 2.0 * max(agree_errors, default=0.0) if quantized else None
    out = []
    for f in flips:
        gap = top2_gap(f.reference)
        out.append(TokenFlip(output=f.output, prompt=f.prompt, step=f.step, gap=gap, bound=bound,  # type: ignore[arg-type]
                             near_tie=bound is not None and gap <= bound))  # fmt: skip
    return out


def token_verdict(flips: Sequence[TokenFlip]) -> tuple[bool, bool, int, bool]:
    """Whether the next tokens and the answers count as the executor's (every flip a near tie), how many near
    ties there were, and whether that is within :data:`MAX_NEAR_TIES`."""
    same_token = not any(f.output == "logits" and not f.near_tie for f in flips)
    same_generation = not any(f.output == "generate" and not f.near_tie for f in flips)
    ties = sum(f.near_tie for f in flips)
    return same_token, same_generation, ties, ties <= MAX_NEAR_TIES


def check_build(
    adapter: Any, work: Path, manifest: Manifest, choice: PlanChoice, inputs: CheckInputs, *, dtype: str,
    quantize: str | None, provider: str, new_tokens: int, log: Log,
) -> tuple[CheckReport, dict[str, Any]]:  # fmt: skip
    """Check the graphs in ``work`` (described by ``manifest``) against the executor of ``adapter``'s model
    under ``choice``; returns the report and the FLOPs document of the manifest.

    ``dtype`` and ``quantize`` are the build's precision (they pick the criterion), ``provider`` the ONNX
    Runtime provider that runs the graphs, ``new_tokens`` the greedy tokens generated per check prompt.
    """
    spec = adapter.spec
    tolerance = TOLERANCE[dtype]
    executor = PlanExecutor(adapter)
    policy = token_policy(choice.tokens, spec, mode="table")  # what the graph does: the schedule table
    references = [executor.prefill(s, choice.ops, policy) for s in inputs.samples]
    flops = flops_doc(spec, choice, inputs.samples, references)
    log(f"checking against the PyTorch executor on {len(inputs.samples)} prompts (tolerance {tolerance:g})")
    found = _Differences()
    _check_vision(adapter, work, inputs.pixels, provider, found)
    with PrefillRunner(work, provider=provider, manifest=manifest) as prefill:
        prefill_flips, agree_errors, per_prompt = _check_prefill(
            prefill, references, inputs.feeds, policy, lm_head_flops(spec), found
        )
        provider_name = prefill.provider
    generation_flips, generation_errors, generated = _check_generation(
        executor, work, manifest, choice, policy, inputs, provider=provider, new_tokens=new_tokens, found=found,
    )  # fmt: skip
    flips = classify_flips([*prefill_flips, *generation_flips], [*agree_errors, *generation_errors],
                           quantize is not None)  # fmt: skip
    same_token, same_generation, ties, ties_ok = token_verdict(flips)
    outputs = [_check_output(name, diff, found.scales.get(name), tolerance, quantize is not None,
                             choice.tokens is not None)
               for name, diff in found.diffs.items()]  # fmt: skip
    # Token-for-token equality is the contract in fp32; in fp16/bf16 rounding may flip a near tie, so there
    # the step logits (compared while the tokens agree) carry the check.
    ok = (all(o.ok for o in outputs) and same_token and (same_generation or dtype != "fp32")
          and ties_ok)  # fmt: skip
    worst = max((o for o in outputs if o.name != "census_flops_relative"), key=lambda o: o.max_abs_diff)
    if quantize is not None:
        bounded = [o for o in outputs if o.tolerance_kind == "relative" and o.tolerance is not None]
        worst_rel = max(bounded, key=lambda o: o.max_rel_diff or 0.0)
        log(f"  {quantize}: largest bounded relative error {worst_rel.name} {worst_rel.max_rel_diff:.3g} "
            f"(bound {QUANT_RELATIVE_TOLERANCE:g}); the greedy answers must be the fp32 executor's")  # fmt: skip
    log(f"  {'passed' if ok else 'FAILED'} on {provider_name}: logits max abs diff {found.diffs['logits']:.3g}, "
        f"worst output {worst.name} {worst.max_abs_diff:.3g}, same next token: {same_token}, same greedy "
        f"answers ({'/'.join(map(str, generated))} tokens): {same_generation}"
        + (f" ({ties} near tie(s) broken by the quantization)" if ties else ""))  # fmt: skip
    flops["graph_per_check_prompt"] = per_prompt
    report = CheckReport(
        status="passed" if ok else "failed", provider=provider_name, samples=len(inputs.samples),
        tolerance=tolerance, same_next_token=same_token, same_generation=same_generation,
        generated_tokens=generated, outputs=outputs, near_ties=ties if quantize is not None else None,
        token_flips=flips,
    )  # fmt: skip
    return report, flops


def recheck_build(build_dir: Path, *, model_dir: Path | None = None, provider: str = defaults.PROVIDER,
                  device: str = defaults.TORCH_DEVICE,
                  log: Log = lambda message: None) -> tuple[CheckReport, str | None]:  # fmt: skip
    """Run a finished build's check again, on the graphs as they are now, against the executor of
    ``model_dir`` (default: the model folder recorded in the manifest) in fp32 on ``device``; returns the
    report (``status`` ``passed`` or ``failed``). Nothing in the build is written.

    Files that differ from the manifest's digests (a graph edited by hand) are named in the log and checked
    as they are. The check runs with the build's own precision, quantization and plan (from the manifest).
    """
    manifest = Manifest.load(build_dir, verify="none")
    try:
        verify_files(build_dir, manifest, mode="full")
    except BuildDirError as err:
        log(f"note: {err}; checking the graphs as they are now")
    model_dir = Path(model_dir) if model_dir is not None else Path(manifest.model.get("path") or "")
    if not (model_dir / "config.json").is_file():
        raise BuildError(
            f"the build's model folder {model_dir} is not here (no config.json); pass --model MODEL_DIR with the "
            "model it was built from"
        )
    spec = load_spec(model_dir)
    if spec.fingerprint() != manifest.model["fingerprint"]:
        raise BuildError(
            f"{model_dir} is another model (fingerprint {spec.fingerprint()}, the build's is "
            f"{manifest.model['fingerprint']}); pass --model with the folder the build was made from"
        )
    choice = plan_choice_of(manifest)
    adapter = load_adapter(model_dir, device=resolve_device(device))
    with tempfile.TemporaryDirectory(prefix="prune-export-check-") as scratch:
        inputs = prepare_check_inputs(adapter, Path(scratch))
    quantize = manifest.quantization["mode"] if manifest.quantization else None
    report, _ = check_build(adapter, Path(build_dir), manifest, choice, inputs, dtype=manifest.dtype,
                            quantize=quantize, provider=provider, new_tokens=defaults.CHECK_NEW_TOKENS, log=log)  # fmt: skip
    failed = report.status != "passed"
    return report, failure_message(report, dtype=manifest.dtype, quantize=quantize, kept_in=None) if failed else None


def plan_choice_of(manifest: Manifest) -> PlanChoice:
    """What a build baked in, read back from its manifest (static operations and the token section)."""
    ops = frozenset(Operation.from_str(text) for text in manifest.plan.get("ops", []))
    tokens = manifest.plan.get("tokens")
    section = None
    if tokens is not None:
        section = (AutoPruneSection if tokens.get("kind") == "autoprune" else FixedScheduleSection).model_validate(tokens)
    return PlanChoice(ops, section, dict(manifest.plan))


def failure_message(check: CheckReport, *, dtype: str, quantize: str | None, kept_in: Path | None) -> str:
    """The one error of a failed check: each output over its tolerance, and where the graphs are kept
    (``kept_in``; None: a finished build checked again, left as it is)."""
    bad = [o for o in check.outputs if not o.ok]
    lines = "\n".join(
        f"  {o.name}: max relative diff {o.max_rel_diff or float('inf'):.3g} > tolerance {o.tolerance:g}"
        if o.tolerance_kind == "relative" else f"  {o.name}: max abs diff {o.max_abs_diff:.3g} > tolerance {o.tolerance:g}"
        for o in bad[:12]
    )  # fmt: skip
    more = f"\n  ... and {len(bad) - 12} more" if len(bad) > 12 else ""
    token = "" if check.same_next_token else "\n  the greedy next token differs"
    if check.same_generation is False and dtype == "fp32":
        token += "\n  the greedy answers through the graphs (embed, prefill, decode) differ from the executor's"
    for flip in check.token_flips:
        if not flip.near_tie and (flip.output == "logits" or dtype == "fp32"):
            why = "" if flip.bound is None else (f", not a near tie (bound {flip.bound:.3g}: twice the largest logits "
                                                 "error where the tokens agree)")  # fmt: skip
            token += (f"\n  {'prefill next token' if flip.output == 'logits' else 'greedy answer'} of check prompt "
                      f"{flip.prompt} flipped at step {flip.step}: the executor's top-2 gap there is {flip.gap:.3g}{why}")  # fmt: skip
    if check.near_ties is not None and check.near_ties > MAX_NEAR_TIES:
        token += f"\n  {check.near_ties} near ties, more than the {MAX_NEAR_TIES} a check accepts"
    what = f"{dtype}, {quantize}" if quantize else dtype
    tail = ("the build is unchanged; rebuild it (or find what changed its graphs or their runtime)" if kept_in is None
            else f"the graphs and {CHECK_REPORT} are kept in {kept_in} for inspection; rebuild with --skip-check "
            "only if you know why they differ")  # fmt: skip
    return (
        f"the graphs do not match the PyTorch executor ({what}, provider {check.provider}):\n"
        f"{lines}{more}{token}\n{tail}"
    )


def _check_vision(adapter: Any, work: Path, pixels: list[Any], provider: str, found: _Differences) -> None:
    """The vision graph against the adapter's vision tower, all check images in one batch."""
    batch = torch.cat(pixels)
    tiles = adapter.spec.any_resolution  # LLaVA-NeXT: the graph returns every tower input's rows unpacked
    ref = adapter.vision_tiles(batch) if tiles else adapter.vision(batch)
    with OrtRunner(SessionFromOnnx(work / "vision.onnx", provider=provider)) as vision:
        pixel_dtype = vision.input_metadata()["pixel_values"][0]
        got = vision.infer({"pixel_values": batch.float().cpu().numpy().astype(pixel_dtype)})
    found.compare("vision.image_features", got["image_features"], ref.features.double().cpu().numpy())
    found.compare("vision.cls_attention", got["cls_attention"], ref.cls_attention.double().cpu().numpy())
    if tiles:
        found.compare("vision.image_newline", got["image_newline"][0],
                      adapter.image_newline.double().cpu().numpy())  # fmt: skip


def _check_prefill(
    prefill: PrefillRunner, references: list[Any], feeds: list[dict[str, np.ndarray]], policy: Any, lm_head: int,
    found: _Differences,
) -> tuple[list[_Flip], list[float], list[int]]:  # fmt: skip
    """The prefill graph(s) against the executor's prefill on every check prompt: the prompts whose next token
    differs, the logits errors of those where it agrees, and the graph's FLOPs per prompt."""
    flips, agree_errors, per_prompt = [], [], []
    for i, (result, feed) in enumerate(zip(references, feeds, strict=True)):
        out = prefill.infer(cast_feeds(prefill, feed))
        logits = out["logits"][0].astype(np.float64)
        ref_logits = result.logits.double().cpu().numpy()
        diff = float(np.abs(logits - ref_logits).max())
        found.record("logits", diff, ref_logits)
        if int(logits.argmax()) != int(ref_logits.argmax()):
            flips.append(_Flip("logits", i, 0, ref_logits))
        else:
            agree_errors.append(diff)
        assert result.cache is not None
        for layer, cache in enumerate(result.cache):
            keys, values = _sorted_cache(out, layer)
            if keys.shape != tuple(cache.keys.shape):
                found.record(f"present.{layer}.key", float("inf"))
                continue
            found.compare(f"present.{layer}.key", keys, cache.keys.double().cpu().numpy())
            found.compare(f"present.{layer}.value", values, cache.values.double().cpu().numpy())
        if policy is not None and hasattr(result.policy, "decision"):
            decision = result.policy.decision
            if list(out["autoprune.keep"]) != list(decision.schedule.keep):
                found.record("autoprune.keep", float("inf"))
            if list(out["autoprune.merged"]) != list(decision.schedule.merged):
                found.record("autoprune.merged", float("inf"))
        per_prompt.append(graph_flops(prefill, feed))
        expected = result.flops + lm_head
        found.record("census_flops_relative", abs(per_prompt[-1] - expected) / expected)
    return flips, agree_errors, per_prompt


def _sorted_cache(out: Mapping[str, np.ndarray], layer: int) -> tuple[np.ndarray, np.ndarray]:
    """A layer's K and V from the graph in position order (the executor's order; stable for merged ties)."""
    order = np.argsort(out[f"present.{layer}.position"][0], kind="stable")
    return out[f"present.{layer}.key"][0][:, order], out[f"present.{layer}.value"][0][:, order]


def _check_generation(
    executor: PlanExecutor, work: Path, manifest: Manifest, choice: PlanChoice, policy: Any, inputs: CheckInputs,
    *, provider: str, new_tokens: int, found: _Differences,
) -> tuple[list[_Flip], list[float], list[int]]:  # fmt: skip
    """Greedy answers through the build's runtime (copied processor, embed, vision, prefill, decode) against
    the executor's ``generate``: the prompt ids, every token, and the logits of every step while they agree.
    Returns the first flip of each answer that leaves the executor's, the logits errors of the steps where
    the tokens agree, and the executor's answer lengths."""
    flips, agree_errors, generated = [], [], []
    with GenerationRunner(work, provider=provider, manifest=manifest) as runner:  # type: ignore[arg-type]
        for i, ((seed, question), sample) in enumerate(zip(inputs.prompts, inputs.samples, strict=True)):
            prompt = runner.prompt(synthetic_image(seed), question)
            if prompt.input_ids.tolist() != sample.input_ids.tolist():
                found.record("generate.prompt_ids", float("inf"))
            ref = executor.generate(sample, choice.ops, policy, max_new_tokens=new_tokens)
            got = runner.generate(synthetic_image(seed), question, new_tokens, keep_logits=True)
            generated.append(len(ref.token_ids))
            agree = 0
            for a, b in zip(got.token_ids, ref.token_ids, strict=False):
                if a != b:
                    break
                agree += 1
            # Logits of the steps up to the first disagreement (inclusive: both saw the same past there).
            steps = list(zip(got.step_logits, ref.step_logits, strict=False))[: agree + 1]
            for step, (mine, theirs) in enumerate(steps):
                ref_step = theirs.double().cpu().numpy()
                diff = float(np.abs(mine.astype(np.float64) - ref_step).max())
                found.record("generate.step_logits", diff, ref_step)
                if step < agree:
                    agree_errors.append(diff)
            if got.token_ids != ref.token_ids:
                at = min(agree, len(ref.step_logits) - 1)
                flips.append(_Flip("generate", i, agree, ref.step_logits[at].double().cpu().numpy()))
        _check_batched_decode(runner, inputs, found)
    return flips, agree_errors, generated


def _check_batched_decode(runner: GenerationRunner, inputs: CheckInputs, found: _Differences) -> None:
    """The check prompts' first decode step as one batch (their caches padded to each other, as the
    batching runtime pads them) against each prompt's step alone: ``decode.batched_logits``, held to the
    build's tolerance like every output. A decode graph that let the padding into attention fails here."""
    if max_decode_batch(runner.manifest) < 2 or len(inputs.prompts) < 2:
        return
    firsts, alone = [], []
    for seed, question in inputs.prompts:
        first = runner.prefilled(runner.prefill_feeds(runner.prompt(synthetic_image(seed), question)))
        token = np.array([[int(np.argmax(first.logits))]], dtype=np.int64)
        alone.append(runner.decode(token, first.cache)[0][0])
        firsts.append((token, first.cache))
    batch = PaddedCache(runner.num_layers)
    for _, cache in firsts:
        batch.add(cache)
    assert batch.arrays is not None
    logits, _ = runner.decode(np.concatenate([token for token, _ in firsts]), batch.arrays)
    for row, ref in enumerate(alone):
        found.compare("decode.batched_logits", logits[row], ref.astype(np.float64))


def _check_output(name: str, diff: float, scale: float | None, tolerance: float, quantized: bool,
                  selects_tokens: bool) -> CheckOutput:  # fmt: skip
    """One checked output: absolute tolerance (float graphs, the census's relative one), or for the quantized
    graphs' outputs a bound on the error relative to the reference's largest magnitude. A quantized build
    that selects tokens may keep other tokens than the executor (the scores come from int8 projections):
    its KV caches are reported, not bounded."""
    rel = diff / scale if scale else None
    if name == "census_flops_relative":
        return CheckOutput(name=name, max_abs_diff=diff, tolerance=CENSUS_TOLERANCE, ok=diff <= CENSUS_TOLERANCE)
    if quantized and selects_tokens and name.startswith("present."):
        return CheckOutput(name=name, max_abs_diff=diff, tolerance=None, ok=True, max_rel_diff=rel,
                           tolerance_kind="relative")  # fmt: skip
    if quantized and not name.startswith("vision."):
        ok = diff == 0.0 or (rel is not None and rel <= QUANT_RELATIVE_TOLERANCE)
        return CheckOutput(name=name, max_abs_diff=diff, tolerance=QUANT_RELATIVE_TOLERANCE, ok=ok, max_rel_diff=rel,
                           tolerance_kind="relative")  # fmt: skip
    return CheckOutput(name=name, max_abs_diff=diff, tolerance=tolerance, ok=diff <= tolerance, max_rel_diff=rel)
