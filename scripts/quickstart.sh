#!/usr/bin/env bash
# The main job end to end on the embedded default: a tiny random LLaVA built here, CPU only.
# Every step is a plain prune-export command; copy them for your own model folder.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-out/quickstart}
mkdir -p "$OUT"

echo "== 1. a tiny random LLaVA-1.5 model and a synthetic VQA set"
prune-export demo-model "$OUT/model" --preset tiny --seed 0 --overwrite
prune-export demo-data "$OUT/data" --samples 8

echo "== 2. what the model costs"
prune-export info "$OUT/model"

echo "== 3. dense accuracy and FLOPs"
prune-export eval "$OUT/model" --data "$OUT/data/data.jsonl" --max-new-tokens 4

echo "== 4. GSOP search on the calibration data (label-free KL metric), resumable"
rm -f "$OUT/plan.json" "$OUT/plan.json.journal.jsonl"
prune-export search "$OUT/model" --calib "$OUT/data/data.jsonl" --out "$OUT/plan.json" \
  --metric kl --tolerance 0.5 --steps 8 --key-danger-layers 2

echo "== 5. the plan's FLOPs ladder, and the operations at a 0.8 budget"
prune-export plan show "$OUT/plan.json" --budget 0.8

echo "== 6. accuracy and FLOPs under the plan at that budget"
prune-export eval "$OUT/model" --data "$OUT/data/data.jsonl" --plan "$OUT/plan.json" --budget 0.8 --max-new-tokens 4

echo "== 7. a FastV-like fixed schedule (keep 4 visual tokens after layer 1)"
prune-export eval "$OUT/model" --data "$OUT/data/data.jsonl" --keep-schedule 1:4 --max-new-tokens 4

echo "== 8. AutoPrune: the schedule for T=4 at k=0.2, then eval with per-sample schedules"
prune-export autoprune-schedule "$OUT/model" --tokens 4 --k 0.2
prune-export eval "$OUT/model" --data "$OUT/data/data.jsonl" --autoprune-tokens 4 --max-new-tokens 4

echo "== 9. bake: dense and pruned builds (export, graph passes, parity check against the executor)"
prune-export build "$OUT/model" --out "$OUT/build-dense" --overwrite
prune-export build "$OUT/model" --out "$OUT/build-plan" --plan "$OUT/plan.json" --budget 0.8 --overwrite
prune-export build "$OUT/model" --out "$OUT/build-autoprune" --autoprune-tokens 4 --overwrite
prune-export build "$OUT/model" --out "$OUT/build-autoprune-trt" --autoprune-tokens 4 --target tensorrt --overwrite

echo "== 10. what is in a build, counted from the graph"
prune-export inspect "$OUT/build-plan"
prune-export inspect "$OUT/build-autoprune-trt"

echo "== 11. measured prefill latency, pruned vs dense, on ONNX Runtime (tiny model: overhead-bound)"
prune-export bench "$OUT/build-autoprune" --baseline "$OUT/build-dense" --runs 5
