"""Decode ms/token on a GPU at LLaVA-1.5-7B shapes: after a dense prefill and after pruned ones.

The decode graph of a build (``exporter.decode.DecodeStep``, what ``decode.onnx`` is exported from) runs in
PyTorch eager on the caches the executor's prefill leaves: dense, GSOP at budget 0.3 (heuristic ordering)
and AutoPrune T=64, on the 711-token prompt of ``bench_prefill.py``. Reference: HuggingFace's decoder with
its dynamic cache, one token at a time after the same dense prefill. Each engine runs ``--new-tokens``
greedy steps per call; calls are interleaved, timed with CUDA events, medians, divided by the steps.

    python benchmarks/gpu/bench_decode.py [--new-tokens 32] [--rounds 10] [--out out/gpu-decode.json]
    python benchmarks/gpu/bench_decode.py --preset tiny --device cpu --dtype fp32 --tokens 4 --budget 0.95
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_prefill import DTYPES, Timer, environment, interleaved, make_sample  # noqa: E402
from common import heuristic_plan  # noqa: E402

from exporter.adapters.llava import LlavaAdapter  # noqa: E402
from exporter.autoprune_policy import AutoPrunePolicy  # noqa: E402
from exporter.decode import DecodeStep  # noqa: E402
from exporter.demo import random_llava  # noqa: E402
from exporter.executor import PlanExecutor  # noqa: E402
from prune_core.plan import AutoPruneSection  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llava-1.5-7b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    ap.add_argument("--sys-tokens", type=int, default=35)
    ap.add_argument("--text-tokens", type=int, default=100)
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--tokens", type=float, default=64.0)
    ap.add_argument("--combined-budget", type=float, default=0.7)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("out/gpu-decode.json"))
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    results: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "environment": environment(device, args.dtype)}

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    overrides = {} if args.layers is None else {"layers": args.layers}
    model, processor = random_llava(args.preset, args.seed, dtype=dtype, device=device, **overrides)
    adapter = LlavaAdapter.from_model(model, processor)
    spec = adapter.spec
    sample = make_sample(adapter, args.sys_tokens, args.text_tokens, args.seed)
    executor = PlanExecutor(adapter)
    selection = heuristic_plan(spec).select(args.budget)
    configs = {
        "dense": (frozenset(), None),
        f"gsop-{args.budget:g}": (selection.ops, None),
        f"autoprune-T{args.tokens:g}": (frozenset(), AutoPrunePolicy(AutoPruneSection(tokens=args.tokens), spec, mode="table")),
        f"combined-gsop{args.combined_budget:g}-T{args.tokens:g}": (
            heuristic_plan(spec).select(args.combined_budget).ops,
            AutoPrunePolicy(AutoPruneSection(tokens=args.tokens), spec, mode="table")),
    }
    step = DecodeStep(adapter).eval()
    n = args.new_tokens
    fns, results["configs"] = {}, {}
    for name, (ops, policy) in configs.items():
        pre = executor.prefill(sample, ops, policy, with_cache=True)
        past: list[torch.Tensor] = []
        for c in pre.cache:
            length = int(c.keys.shape[1])
            pos = torch.arange(length, device=device) + (c.next_position - length)
            past += [c.keys[None], c.values[None], pos[None]]
        first = int(torch.argmax(pre.logits))
        kv_tokens = sum(int(c.keys.shape[1]) for c in pre.cache)  # before continue_greedy appends to them

        def run(past: list[torch.Tensor] = past, first: int = first) -> list[int]:
            token, cache, out = first, list(past), []
            with torch.no_grad():
                for _ in range(n):
                    res = step(torch.tensor([[token]], device=device), *cache)
                    token = int(torch.argmax(res[0]))
                    cache = list(res[1:])
                    out.append(token)
            return out

        reference = executor.continue_greedy(pre, n + 1)[1:]  # the executor's tokens after the first
        got = run()
        results["configs"][name] = {"kv_tokens": kv_tokens,
                                    "same_tokens_as_executor": got == reference[: len(got)]}  # fmt: skip
        fns[f"decode/{name}"] = run
        log(f"{name}: {results['configs'][name]}")

    lm = model.model.language_model
    with torch.no_grad():
        hf_out = lm(inputs_embeds=sample.embeds[None].to(device), use_cache=True)
    hf_cache, prompt_len = hf_out.past_key_values, sample.num_tokens
    hf_first = int(torch.argmax(model.lm_head(hf_out.last_hidden_state[:, -1])))

    def hf_run() -> None:
        token = hf_first
        with torch.no_grad():
            for i in range(n):
                out = lm(input_ids=torch.tensor([[token]], device=device), past_key_values=hf_cache, use_cache=True,
                         cache_position=torch.tensor([prompt_len + i], device=device))
                token = int(torch.argmax(model.lm_head(out.last_hidden_state[:, -1])))
        for layer in hf_cache.layers:  # back to the prompt (crop()'s argument changed meaning across versions)
            layer.keys = layer.keys[..., :prompt_len, :]
            layer.values = layer.values[..., :prompt_len, :]

    fns["hf/dense"] = hf_run
    timer = Timer(device)
    timings = interleaved(timer, fns, args.rounds, args.warmup)
    results["timings_ms_per_call"] = timings
    lines = ["| engine | config | KV tokens (all layers) | ms/token | vs dense decode |", "| --- | --- | --- | --- | --- |"]
    dense_ms = timings["decode/dense"]["median_ms"] / n
    for key, t in timings.items():
        engine, name = key.split("/")
        ms = t["median_ms"] / n
        kv = results["configs"].get(name, {}).get("kv_tokens", "-")
        lines.append(f"| {engine} | {name} | {kv} | {ms:.2f} | {dense_ms / ms:.3f} |")
    results["markdown"] = "\n".join(lines)
    print(f"\n{results['environment']}\n\n{results['markdown']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
