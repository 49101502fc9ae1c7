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

echo "== 5. the plan's FLOPs ladder (also drawn: $OUT/plan-ladder.png), and the operations at a 0.8 budget"
prune-export plan show "$OUT/plan.json" --budget 0.8 --plot "$OUT/plan-ladder.png"

echo "== 6. accuracy and FLOPs under the plan at that budget"
prune-export eval "$OUT/model" --data "$OUT/data/data.jsonl" --plan "$OUT/plan.json" --budget 0.8 --max-new-tokens 4

echo "== 7. a FastV-like fixed schedule (keep 4 visual tokens after layer 1)"
prune-export eval "$OUT/model" --data "$OUT/data/data.jsonl" --keep-schedule 1:4 --max-new-tokens 4

echo "== 8. AutoPrune: the schedule for T=4 at k=0.2, then eval with per-sample schedules"
prune-export autoprune-schedule "$OUT/model" --tokens 4 --k 0.2
prune-export eval "$OUT/model" --data "$OUT/data/data.jsonl" --autoprune-tokens 4 --max-new-tokens 4

echo "== 9. the whole trade-off at once: dense, the plan at three budgets, AutoPrune T=8/4 and two fixed schedules"
echo "   (accuracy is 0 on a random model; agreement says how many answers pruning changed; plots in $OUT/sweep)"
rm -rf "$OUT/sweep"
prune-export sweep "$OUT/model" --data "$OUT/data/data.jsonl" --out "$OUT/sweep" --plan "$OUT/plan.json" \
  --budgets 0.9,0.8,0.7 --autoprune-tokens 8,4 --keep-schedule 1:8 --keep-schedule 1:4 --max-new-tokens 4

echo "== 10. a bigger random LLaVA in which matmuls dominate (8 layers, hidden 1024, 576 visual tokens)"
prune-export demo-model "$OUT/model-bench" --preset bench --seed 0 --overwrite

echo "== 11. bake: dense and AutoPrune T=64 builds (export, graph passes, parity check against the executor)"
prune-export build "$OUT/model-bench" --out "$OUT/build-dense" --overwrite
prune-export build "$OUT/model-bench" --out "$OUT/build-autoprune" --autoprune-tokens 64 --overwrite

echo "== 12. what is in the pruned build, counted from its graphs"
prune-export inspect "$OUT/build-autoprune"

echo "== 13. the pruned build answers a question (random weights: the words are noise, the path is real)"
IMAGE=$(ls "$OUT"/data/images/* | head -n 1)
prune-export run "$OUT/build-autoprune" --image "$IMAGE" --question "What color is the circle?" \
  --max-new-tokens 8 --json

echo "== 14. the pruned build's answers on the demo rows, against the dense build's (agreement, first-token KL)"
prune-export eval "$OUT/build-autoprune" --data "$OUT/data/data.jsonl" --reference "$OUT/build-dense" \
  --max-new-tokens 8 --limit 4

echo "== 15. end to end, pruned vs dense, interleaved: time to first token and decode ms/token"
prune-export bench "$OUT/build-autoprune" --baseline "$OUT/build-dense" --generate 8 --runs 4 --warmup 1

echo "== 16. deploy the pruned build as a Triton model repository, serve it on 127.0.0.1, ask it over HTTP"
prune-export deploy "$OUT/build-autoprune" --repo "$OUT/triton-repo" --name llava_autoprune --overwrite
PORT=${PORT:-8000}
prune-export serve "$OUT/triton-repo" --http-port "$PORT" --grpc-port $((PORT + 1)) --metrics-port $((PORT + 2)) \
  > "$OUT/triton-server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
if ! prune-export ask "http://127.0.0.1:$PORT" --image "$IMAGE" --question "What color is the circle?" \
     --max-new-tokens 8 --wait 300 --json; then
  echo "the server did not answer; its log ($OUT/triton-server.log) ends with:"; tail -n 20 "$OUT/triton-server.log"
  exit 1
fi
kill -TERM $SERVER
wait $SERVER
trap - EXIT
echo "server stopped; serve $OUT/triton-repo in production with the NGC Triton container ($OUT/triton-repo/README.md)"
