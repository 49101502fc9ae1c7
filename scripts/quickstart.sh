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

echo "== 4. a FastV-like fixed schedule (keep 4 visual tokens after layer 1)"
prune-export eval "$OUT/model" --data "$OUT/data/data.jsonl" --keep-schedule 1:4 --max-new-tokens 4
