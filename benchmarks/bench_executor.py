"""Executor overhead: prefill of the plan executor with an empty plan vs the plain HuggingFace forward.

Both run the decoder on the same embeddings (image features merged) and return the last token's logits
with a KV cache; the vision tower is outside both. Prints the medians of interleaved runs and their ratio
(target: executor / HF <= 1.10).

    python benchmarks/bench_executor.py [--model out/bench-model] [--rounds 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_QUESTION, bench_image, ensure_bench_model, interleaved_medians, setup_threads  # noqa: E402

from exporter.adapters import load_adapter  # noqa: E402
from exporter.executor import PlanExecutor  # noqa: E402
from exporter.sample import prepare_sample  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: build the bench preset)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    setup_threads(args.threads)
    model_dir = args.model or ensure_bench_model()
    adapter = load_adapter(model_dir)
    sample = prepare_sample(adapter, bench_image(), BENCH_QUESTION)
    executor = PlanExecutor(adapter)
    embeds = sample.embeds.unsqueeze(0)

    def hf() -> torch.Tensor:
        with torch.no_grad():
            return adapter.model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1).logits[0, -1]

    def ours() -> torch.Tensor:
        return executor.prefill(sample, with_cache=True).logits

    diff = float((hf().float() - ours()).abs().max())
    med = interleaved_medians({"hf": hf, "executor": ours}, rounds=args.rounds)
    ratio = med["executor"] / med["hf"]
    spec = adapter.spec
    print(f"model: {model_dir} ({spec.num_layers} layers, hidden {spec.hidden_size}, "
          f"{sample.num_tokens} prompt tokens, {spec.visual_tokens} visual), torch {torch.__version__}, "
          f"{args.threads} threads")
    print(f"max |logit diff| executor vs HF: {diff:.2e}")
    print(f"{'':>10} {'median ms':>10}")
    print(f"{'HF':>10} {med['hf'] * 1e3:>10.1f}")
    print(f"{'executor':>10} {med['executor'] * 1e3:>10.1f}")
    print(f"ratio executor/HF: {ratio:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
