"""GPU prefill latency of a LLaVA-1.5-7B-shaped decoder: dense vs GSOP vs AutoPrune, in PyTorch CUDA.

A random LLaVA-1.5-7B-shaped model (CLIP ViT-L/336 + a 32-layer, 4096-wide decoder, MLP 11008, vocabulary
32064) is built directly on the GPU in fp16 (about 14 GB; nothing is read from disk or a hub). One prompt of
35 system + 576 visual + 100 text = 711 tokens, batch 1: the visual tokens and [CLS] attention come from the
vision tower on a random image, the text tokens are random ids. Configurations:

* dense;
* GSOP at budget 0.3: image-group operations pruned from the last layer down (mlp, then q, then kv per
  step), the longest prefix at or below 30% of the dense prefill FLOPs (not searched: latency depends on
  which operations are gone, not on how they were chosen);
* AutoPrune at T=64 (paper defaults, recycling, renumbered positions; k from the prompt's own I1).

Each configuration runs through
``executor`` (the PyTorch plan executor, the reference: eager, host-side bookkeeping),
``baked`` (the baked prefill module the ONNX graph is exported from, eager) and
``compiled`` (that module through ``torch.compile``), ``cudagraphs`` (the same with
``mode="reduce-overhead"``, CUDA only), plus ``hf`` (the HuggingFace decoder forward with
sdpa, dense only) as the reference for the dense rows. A prefill here is the decoder layers with their KV
caches, the final norm and the LM head of the last token.

Before timing, every engine's logits are compared with the executor's (max abs difference, same greedy
token, same KV length per layer). Timing: CUDA events around each call, all engines of a phase interleaved
(the order reversed every other round) after warm-up, medians and p90. FLOPs are the decoder matmul FLOPs
the executor counts on this prompt; ``efficiency`` = measured speedup over the same engine's dense run
divided by the FLOPs speedup.

Dense and GSOP are compiled and timed in one phase, AutoPrune (run-time counts, graph breaks) in a later one
(``--one-phase`` compiles in ``--configs`` order and times everything together).

Results go to ``--out`` (JSON, rewritten after each phase, so a run cut short keeps what it measured) and
stdout (a markdown table).

    python benchmarks/gpu/bench_prefill.py [--preset llava-1.5-7b] [--rounds 20] [--no-compile] --out r.json

On a CPU machine ``--preset tiny --device cpu --dtype fp32 --rounds 2`` runs the same code in seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import heuristic_plan  # noqa: E402

from engines.benchmark import time_interleaved, wall_clock  # noqa: E402
from exporter.adapters.llava import LlavaAdapter  # noqa: E402
from exporter.autoprune_policy import AutoPrunePolicy  # noqa: E402
from exporter.baked import AutoPruneBake, BakedPrefill  # noqa: E402
from exporter.demo import random_llava  # noqa: E402
from exporter.executor import PlanExecutor  # noqa: E402
from exporter.sample import build_sample  # noqa: E402
from prune_core.plan import AutoPruneSection  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class Timer:
    """Times one call: CUDA events on a GPU (they bracket the kernels and the host work that launches
    them, since each call ends in a synchronisation), ``perf_counter`` elsewhere. Seconds, as the clock of
    :func:`engines.benchmark.time_interleaved`."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], object]) -> tuple[float, object]:
        self.sync()
        if not self.cuda:
            return wall_clock(fn)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / 1e3, result


def interleaved(timer: Timer, fns: dict[str, Callable[[], object]], rounds: int, warmup: int) -> dict[str, dict]:
    """Median, p90 and min ms of each function over ``rounds`` interleaved rounds (rotating order) after
    warm-up, measured by the project's one interleaved timer with ``timer`` as its clock."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    timer.sync()
    timed = time_interleaved(fns, rounds=rounds, clock=timer)
    out = {}
    for name in fns:
        stats = timed.stats(name)
        out[name] = {"median_ms": stats.median_ms, "p90_ms": stats.p90_ms, "min_ms": stats.min_ms, "runs": stats.runs}
    return out


def environment(device: torch.device, dtype_name: str) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": dtype_name,
        "device": str(device),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["sm_count"] = props.multi_processor_count
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    return env


def make_sample(adapter: LlavaAdapter, sys_tokens: int, text_tokens: int, seed: int):
    """The benchmark prompt: ``sys_tokens`` random ids, the image, ``text_tokens`` random ids."""
    spec = adapter.spec
    gen = torch.Generator().manual_seed(seed)
    v = spec.visual_tokens
    image_id = adapter.image_token_id
    low = 5  # past the demo tokenizer's special tokens
    ids = torch.randint(low, spec.vocab_size, (sys_tokens + v + text_tokens,), generator=gen)
    ids[ids == image_id] = low
    ids[sys_tokens : sys_tokens + v] = image_id
    pixels = torch.randn(1, 3, spec.image_size, spec.image_size, generator=gen)
    vision = adapter.vision(pixels.to(adapter.device, adapter.dtype))
    return build_sample(adapter, ids, sys_tokens, sys_tokens + v, vision.features[0], vision.cls_attention[0])


def compare(reference, logits: torch.Tensor, kv_lengths: list[int]) -> dict:
    """How one engine's output differs from the executor's on the same prompt."""
    ref = reference.logits.float()
    got = logits.float().reshape(-1)
    ref_kv = [int(c.keys.shape[1]) for c in reference.cache]
    return {
        "max_abs_logit_diff": float((ref - got).abs().max()),
        "logit_scale": float(ref.abs().max()),
        "same_greedy_token": int(ref.argmax()) == int(got.argmax()),
        "same_kv_lengths": ref_kv == kv_lengths,
    }


def baked_kv_lengths(outputs: tuple, num_layers: int) -> list[int]:
    # outputs: logits, then (key, value, position) per layer
    return [int(outputs[1 + 3 * layer].shape[2]) for layer in range(num_layers)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llava-1.5-7b")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's decoder layers (smoke runs)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    ap.add_argument("--sys-tokens", type=int, default=35)
    ap.add_argument("--text-tokens", type=int, default=100)
    ap.add_argument("--budget", type=float, default=0.3, help="GSOP budget (fraction of dense FLOPs)")
    ap.add_argument("--tokens", type=float, default=64.0, help="AutoPrune T")
    ap.add_argument("--combined-budget", type=float, default=0.7,
                    help="GSOP budget of the combined plan (its operations plus AutoPrune at --tokens)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile phases")
    ap.add_argument("--configs", default="dense,gsop,autoprune,combined",
                    help="comma list of dense, gsop, autoprune, combined (dense is always measured); the compile order")
    ap.add_argument("--one-phase", action="store_true",
                    help="compile every configuration (in --configs order), then time them in one phase")
    ap.add_argument("--deadline-s", type=float, default=1e9,
                    help="start no compile after this many seconds (a device lease is short)")
    ap.add_argument("--out", type=Path, default=Path("out/gpu-prefill.json"))
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    results: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "environment": environment(device, args.dtype), "errors": {}}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # -- model and prompt ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    overrides = {} if args.layers is None else {"layers": args.layers}
    model, processor = random_llava(args.preset, args.seed, dtype=dtype, device=device, **overrides)
    adapter = LlavaAdapter.from_model(model, processor)
    spec = adapter.spec
    sample = make_sample(adapter, args.sys_tokens, args.text_tokens, args.seed)
    results["model"] = {"preset": args.preset, "spec": spec.to_json(), "build_s": time.perf_counter() - t0,
                        "parameters": sum(p.numel() for p in model.parameters()),
                        "prompt_tokens": sample.num_tokens}
    log(f"model {args.preset} ({results['model']['parameters'] / 1e9:.2f} B params) on {device} "
        f"in {results['model']['build_s']:.1f} s; prompt {sample.num_tokens} tokens")
    save()

    # -- configurations ----------------------------------------------------------------------------------
    plan = heuristic_plan(spec)
    selection = plan.select(args.budget)
    section = AutoPruneSection(tokens=args.tokens)
    combined_selection = plan.select(args.combined_budget)
    gsop_name, ap_name = f"gsop-{args.budget:g}", f"autoprune-T{args.tokens:g}"
    combined_name = f"combined-gsop{args.combined_budget:g}-T{args.tokens:g}"
    available = {
        "dense": lambda: {"ops": frozenset(), "policy": None, "module": BakedPrefill(adapter)},
        "gsop": lambda: {"ops": selection.ops, "policy": None, "module": BakedPrefill(adapter, selection.ops)},
        "autoprune": lambda: {
            "ops": frozenset(),
            "policy": AutoPrunePolicy(section, spec, mode="table"),  # the graph's schedule table
            "module": BakedPrefill(adapter, autoprune=AutoPruneBake.for_model(
                section, spec.num_layers, spec.visual_tokens)),
        },
        "combined": lambda: {
            "ops": combined_selection.ops,
            "policy": AutoPrunePolicy(section, spec, mode="table"),
            "module": BakedPrefill(adapter, combined_selection.ops, autoprune=AutoPruneBake.for_model(
                section, spec.num_layers, spec.visual_tokens)),
        },
    }
    names = {"dense": "dense", "gsop": gsop_name, "autoprune": ap_name, "combined": combined_name}
    wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        ap.error(f"--configs: unknown {unknown}; choose from {sorted(available)}")
    if "dense" not in wanted:
        wanted.append("dense")
    # dense first for the reference runs (FLOPs ratios), the compile order as given
    configs = {names[c]: available[c]() for c in ["dense", *(c for c in wanted if c != "dense")]}
    compile_order = [names[c] for c in wanted]
    executor = PlanExecutor(adapter)
    inputs = tuple(t.to(device) for t in BakedPrefill.inputs_from_sample(sample))
    lm = model.model.language_model
    embeds = sample.embeds[None]

    def hf_prefill():
        out = lm(inputs_embeds=embeds, use_cache=True)
        return model.lm_head(out.last_hidden_state[:, -1:])

    # -- reference runs and correctness --------------------------------------------------------------------
    results["configs"] = {}
    references = {}
    for name, cfg in configs.items():
        cfg["module"].to(device).eval()
        ref = executor.prefill(sample, cfg["ops"], cfg["policy"], with_cache=True)
        references[name] = ref
        entry = {
            "flops": ref.flops,
            "visual_tokens_per_layer": ref.visual_tokens_per_layer,
            "kv_tokens_per_layer": [int(c.keys.shape[1]) for c in ref.cache],
        }
        if cfg["ops"]:
            entry["plan_ops"] = len(cfg["ops"])
            entry["plan_budget"] = args.budget if name == gsop_name else args.combined_budget
            entry["plan_flops_ratio"] = (selection if name == gsop_name else combined_selection).flops_ratio
        decision = getattr(ref.policy, "decision", None)
        if decision is not None:
            entry["autoprune"] = {"i1": decision.i1, "k": decision.k, "n0": decision.n0}
        with torch.no_grad():
            out = cfg["module"](*inputs)
        entry["baked_vs_executor"] = compare(ref, out[0], baked_kv_lengths(out, spec.num_layers))
        results["configs"][name] = entry
    dense_flops = results["configs"]["dense"]["flops"]
    for entry in results["configs"].values():
        entry["flops_ratio"] = entry["flops"] / dense_flops
        entry["flops_speedup"] = dense_flops / entry["flops"]
    with torch.no_grad():
        results["configs"]["dense"]["hf_vs_executor"] = compare(
            references["dense"], hf_prefill()[0, -1], [int(c.keys.shape[1]) for c in references["dense"].cache])
    log(f"dense prefill: {dense_flops / 1e12:.4f} TFLOPs (decoder matmuls)")
    for name, entry in results["configs"].items():
        log(f"{name}: FLOPs ratio {entry['flops_ratio']:.4f}; baked vs executor {entry['baked_vs_executor']}")
    save()

    # -- eager phase ---------------------------------------------------------------------------------------
    timer = Timer(device)
    fns: dict[str, Callable[[], object]] = {"hf/dense": hf_prefill}
    for name, cfg in configs.items():
        fns[f"executor/{name}"] = (lambda c=cfg: executor.prefill(sample, c["ops"], c["policy"], with_cache=True))
        fns[f"baked/{name}"] = (lambda m=cfg["module"]: m(*inputs))
    log(f"eager phase: {len(fns)} engines x {args.rounds} interleaved rounds")
    with torch.no_grad():
        results["eager"] = interleaved(timer, fns, args.rounds, args.warmup)
    results["peak_memory_gib"] = (torch.cuda.max_memory_allocated() / 2**30) if device.type == "cuda" else None
    save()
    report(results)

    # -- compiled phases ------------------------------------------------------------------------------------
    # torch.compile in two modes: "default" (inductor kernels) and "reduce-overhead" (the same kernels replayed
    # as CUDA graphs, which removes the per-kernel launch cost that dominates batch-1 prefill). Dense and GSOP
    # (static shapes) are compiled and timed first; AutoPrune (run-time counts) after, in a phase of its own,
    # so that a compile failure there cannot cost the numbers already taken.
    if not args.no_compile:
        torch._dynamo.config.cache_size_limit = 64
        # AutoPrune's run-time counts (.item()) break the graph there: with scalars captured instead, inductor
        # (torch 2.13) fails on matmuls whose sizes are unbacked symbols. The pieces between breaks compile.
        torch._dynamo.config.capture_scalar_outputs = False
        modes = ["default"] + (["reduce-overhead"] if device.type == "cuda" else [])
        engines = {"default": "compiled", "reduce-overhead": "cudagraphs"}
        results["compile"] = {}
        alive: dict[str, Callable[[], object]] = {"baked/dense": fns["baked/dense"]}

        def compile_one(name: str, mode: str) -> None:
            key = f"{engines[mode]}/{name}"
            if time.perf_counter() - t0 > args.deadline_s:
                results["errors"][f"compile/{key}"] = "skipped: --deadline-s reached"
                log(f"skipping {key}: deadline")
                return
            log(f"compiling {key}")
            entry = results["compile"][key] = {}
            fn = torch.compile(configs[name]["module"], mode=mode)
            try:
                t1 = time.perf_counter()
                with torch.no_grad():
                    for _ in range(3 if mode == "reduce-overhead" else 1):  # cudagraphs record on a later call
                        out = fn(*inputs)
                    timer.sync()
                entry["compile_s"] = time.perf_counter() - t1
                entry["vs_executor"] = compare(references[name], out[0], baked_kv_lengths(out, spec.num_layers))
                alive[key] = lambda f=fn: f(*inputs)
                log(f"  {entry['compile_s']:.1f} s; vs executor {entry['vs_executor']}")
            except Exception as exc:  # a failed compile is a result too; the other engines go on
                results["errors"][f"compile/{key}"] = traceback.format_exc(limit=12)
                log(f"  failed: {type(exc).__name__}: {str(exc)[:300]}")
            save()

        def timed_phase(phase: str, names: list[str]) -> None:
            fns_phase = {}
            for key in names:  # an engine that no longer runs (a later compile broke it) is left out
                if key not in alive:
                    continue
                try:
                    with torch.no_grad():
                        alive[key]()
                    fns_phase[key] = alive[key]
                except Exception:
                    results["errors"][f"{phase}/{key}"] = traceback.format_exc(limit=12)
                    log(f"  {key} no longer runs; left out of {phase}")
            log(f"{phase}: {len(fns_phase)} engines x {args.rounds} interleaved rounds")
            with torch.no_grad():
                results[phase] = interleaved(timer, fns_phase, args.rounds, args.warmup)
            save()
            report(results)

        if args.one_phase:  # compile in --configs order, then time everything together
            for name in compile_order:
                for mode in modes:
                    compile_one(name, mode)
            timed_phase("compiled", ["baked/dense", *(f"{engines[m]}/{n}" for n in compile_order for m in modes)])
        else:
            static = [n for n in configs if configs[n]["policy"] is None]
            for mode in modes:
                for name in static:
                    compile_one(name, mode)
            timed_phase("compiled", ["baked/dense", *(f"{engines[m]}/{n}" for m in modes for n in static)])
            dynamic = [n for n in configs if configs[n]["policy"] is not None]
            for mode in modes:
                for name in dynamic:
                    compile_one(name, mode)
            dense_keys = ["baked/dense", *(f"{engines[m]}/dense" for m in modes)]
            timed_phase("compiled-autoprune",
                        [*dense_keys, *(f"{engines[m]}/{n}" for m in modes for n in dynamic)])
    results["markdown"] = report(results, echo=False)
    save()
    log(f"done; results in {args.out}")
    return results


def report(results: dict, echo: bool = True) -> str:
    """Markdown tables, one per timing phase: per engine and configuration, median ms, speedup over that
    engine's dense run in the same phase, FLOPs speedup and efficiency (printed when ``echo``)."""
    configs = results["configs"]
    lines: list[str] = []
    for phase in ("eager", "compiled", "compiled-autoprune"):
        timings = results.get(phase)
        if not timings:
            continue
        lines += ["", f"{phase} phase", "",
                  "| engine | config | FLOPs ratio | median ms | p90 ms | speedup vs dense | FLOPs speedup | efficiency |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for key, t in timings.items():
            engine, name = key.split("/", 1)
            dense = timings.get(f"{engine}/dense")
            cfg = configs[name]
            speedup = dense["median_ms"] / t["median_ms"] if dense else float("nan")
            lines.append(f"| {engine} | {name} | {cfg['flops_ratio']:.4f} | {t['median_ms']:.2f} | {t['p90_ms']:.2f} | "
                         f"{speedup:.3f} | {cfg['flops_speedup']:.3f} | {speedup / cfg['flops_speedup']:.3f} |")
    env = results["environment"]
    lines += ["", f"{env.get('gpu', env['device'])}, {env['dtype']}, torch {env['torch']}, CUDA {env['cuda']}, "
              f"transformers {env.get('transformers')}; peak memory GiB {results.get('peak_memory_gib')}"]
    text = "\n".join(lines)
    if echo:
        print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
