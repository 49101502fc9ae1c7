#!/usr/bin/env bash
# The main job end to end on the embedded defaults, CPU only: the trained demo LLaVA shipped with the package
# (accuracy: what pruning costs in answers) and a bigger random one in which matmuls dominate (latency).
# Every step is a plain prune-export command; copy them for your own model folder.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-out/quickstart}
mkdir -p "$OUT"

echo "== 1. the trained demo LLaVA-1.5 (196 visual tokens) and two fresh sets of its task it never saw:"
echo "   100 questions to evaluate on, 40 to calibrate the search on"
prune-export demo-model "$OUT/model" --preset trained --overwrite
prune-export demo-data "$OUT/data" --samples 100 --seed 1
prune-export demo-data "$OUT/calib" --samples 40 --seed 2

echo "== 2. what the model costs"
prune-export info "$OUT/model"

echo "== 3. dense accuracy and FLOPs"
prune-export eval "$OUT/model" --data "$OUT/data/data.jsonl" --max-new-tokens 3

echo "== 4. GSOP search on the calibration set (label-free KL metric), resumable"
rm -f "$OUT/plan.json" "$OUT/plan.json.journal.jsonl"
prune-export search "$OUT/model" --calib "$OUT/calib/data.jsonl" --out "$OUT/plan.json" \
  --metric kl --tolerance 0.05 --steps 8

echo "== 5. the plan's FLOPs ladder (also drawn: $OUT/plan-ladder.png), and the operations at a 0.5 budget"
prune-export plan show "$OUT/plan.json" --budget 0.5 --plot "$OUT/plan-ladder.png"

echo "== 6. accuracy and FLOPs under the plan at that budget"
prune-export eval "$OUT/model" --data "$OUT/data/data.jsonl" --plan "$OUT/plan.json" --budget 0.5 --max-new-tokens 3

echo "== 7. a FastV-like fixed schedule (keep 32 of the 196 visual tokens after layer 1)"
prune-export eval "$OUT/model" --data "$OUT/data/data.jsonl" --keep-schedule 1:32 --max-new-tokens 3

echo "== 8. AutoPrune: the schedule for T=96 at k=0.2, then eval with per-sample schedules, keeping the visual"
echo "   tokens' original positions (this small model reads positions; the reference renumbering costs it answers)"
prune-export autoprune-schedule "$OUT/model" --tokens 96 --k 0.2
prune-export eval "$OUT/model" --data "$OUT/data/data.jsonl" --autoprune-tokens 96 --autoprune-positions original \
  --max-new-tokens 3

echo "== 9. the whole trade-off at once: dense, the plan at three budgets, AutoPrune T=128/96/64 (renumbered"
echo "   positions, the reference) and two fixed schedules: accuracy, retention, agreement with the dense answers,"
echo "   KL, FLOPs (plots in $OUT/sweep)"
rm -rf "$OUT/sweep"
prune-export sweep "$OUT/model" --data "$OUT/data/data.jsonl" --out "$OUT/sweep" --plan "$OUT/plan.json" \
  --budgets 0.7,0.5,0.4 --autoprune-tokens 128,96,64 --keep-schedule 1:64 --keep-schedule 1:8 --max-new-tokens 3

echo "== 10. bake AutoPrune T=96 (original positions) into a build of the trained model; it answers a question"
prune-export build "$OUT/model" --out "$OUT/build-trained" --autoprune-tokens 96 --autoprune-positions original \
  --max-new-tokens 8 --overwrite
row() { python -c "import json, sys; print(json.loads(open(sys.argv[1]).readline())[sys.argv[2]])" "$OUT/data/data.jsonl" "$1"; }
IMAGE="$OUT/data/$(row image)"; QUESTION=$(row question); ANSWER=$(row answer)
echo "   $IMAGE: $QUESTION (the right answer: $ANSWER)"
prune-export run "$OUT/build-trained" --image "$IMAGE" --question "$QUESTION" --max-new-tokens 8 --json

echo "== 11. a bigger random LLaVA in which matmuls dominate (8 layers, hidden 1024, 576 visual tokens): latency"
prune-export demo-model "$OUT/model-bench" --preset bench --seed 0 --overwrite

echo "== 12. bake: dense and AutoPrune T=64 builds (export, graph passes, parity check against the executor)"
prune-export build "$OUT/model-bench" --out "$OUT/build-dense" --overwrite
prune-export build "$OUT/model-bench" --out "$OUT/build-autoprune" --autoprune-tokens 64 --overwrite

echo "== 13. what is in the pruned build, counted from its graphs"
prune-export inspect "$OUT/build-autoprune"

echo "== 14. the pruned build's answers against the dense build's (random weights: only agreement and KL mean"
echo "   anything here; the trained model above has the accuracy)"
prune-export eval "$OUT/build-autoprune" --data "$OUT/data/data.jsonl" --reference "$OUT/build-dense" \
  --max-new-tokens 8 --limit 4

echo "== 15. end to end, pruned vs dense, interleaved: time to first token and decode ms/token"
prune-export bench "$OUT/build-autoprune" --baseline "$OUT/build-dense" --generate 8 --runs 4 --warmup 1

echo "== 16. deploy the trained model's pruned build as a Triton model repository, serve it on 127.0.0.1,"
echo "   ask it step 10's question over HTTP"
prune-export deploy "$OUT/build-trained" --repo "$OUT/triton-repo" --name llava_autoprune --overwrite
PORT=${PORT:-8000}
prune-export serve "$OUT/triton-repo" --http-port "$PORT" --grpc-port $((PORT + 1)) --metrics-port $((PORT + 2)) \
  > "$OUT/triton-server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
if ! prune-export ask "http://127.0.0.1:$PORT" --image "$IMAGE" --question "$QUESTION" \
     --max-new-tokens 8 --wait 300 --json; then
  echo "the server did not answer; its log ($OUT/triton-server.log) ends with:"; tail -n 20 "$OUT/triton-server.log"
  exit 1
fi
kill -TERM $SERVER
wait $SERVER
trap - EXIT
echo "server stopped; serve $OUT/triton-repo in production with the NGC Triton container ($OUT/triton-repo/README.md)"
