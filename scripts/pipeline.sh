#!/usr/bin/env bash
# The whole LLaRA pipeline on real data, on a CPU budget:
#   prepare → train-sr (SASRec, GRU4Rec, Caser) → tune (linear, text-only, hybrid-only curricula, on the
#   trained SASRec) → eval (generation and candidate scoring) → report (table, CSV, training curves).
#
#   scripts/pipeline.sh lastfm                       # ../shared/datasets/lastfm with the shared SmolLM2 GGUF
#   scripts/pipeline.sh movielens HuggingFaceTB/SmolLM2-135M-Instruct   # a hub id where there is network
#   SAMPLES=1024 SR_EPOCHS=60 scripts/pipeline.sh steam                 # bigger budget
#
# Budget knobs (environment): SAMPLES training rows per tune run (384), VALID validation rows (48),
# TEST_LIMIT test rows evaluated (all), SR_EPOCHS (60), SEED (42), THREADS (2). Results: runs/pipeline/DATASET
# and the report in RESULTS (docs/results/pipeline-DATASET), with the exact commands and wall times.
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET="${1:?usage: scripts/pipeline.sh DATASET [LLM]}"
SHARED="${LLARA_SHARED:-../shared}"
LLM="${2:-$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}"
LLARA="${LLARA:-target/release/llara}"
SAMPLES="${SAMPLES:-384}"
VALID="${VALID:-48}"
TEST_LIMIT="${TEST_LIMIT:-}"
SR_EPOCHS="${SR_EPOCHS:-60}"
SEED="${SEED:-42}"
THREADS="${THREADS:-2}"
OUT="${OUT:-runs/pipeline/$DATASET}"
RESULTS="${RESULTS:-docs/results/pipeline-$DATASET}"
[ -x "$LLARA" ] || cargo build --release
mkdir -p "$OUT"
LOG="$OUT/commands.txt"
: > "$LOG"
. scripts/lib.sh
limit=()
[ -n "$TEST_LIMIT" ] && limit=(--limit "$TEST_LIMIT")

run "$LLARA" -q data prepare --from llara-jsonl "$SHARED/datasets/$DATASET" --out "$OUT/data" --seed "$SEED" --force
runs=()
for m in sasrec gru4rec caser; do
  run "$LLARA" -q train-sr --data "$OUT/data" --model "$m" --epochs "$SR_EPOCHS" --patience 15 --seed "$SEED" \
    --out "$OUT/sr-$m" --force
  runs+=("$OUT/sr-$m")
done
for c in linear text-only hybrid-only; do
  run "$LLARA" -q tune --config configs/cpu-budget.toml --data "$OUT/data" --sr "$OUT/sr-sasrec" --llm "$LLM" \
    --curriculum "$c" --max-train-samples "$SAMPLES" --valid-samples "$VALID" --seed "$SEED" --threads "$THREADS" \
    --out "$OUT/llara-$c" --force
  run "$LLARA" -q eval --run "$OUT/llara-$c" --split test "${limit[@]}" --threads "$THREADS" --json
  run "$LLARA" -q eval --run "$OUT/llara-$c" --split test --mode score "${limit[@]}" --threads "$THREADS" --json
  runs+=("$OUT/llara-$c")
done
run "$LLARA" -q report "${runs[@]}" --out "$RESULTS"
cp "$LOG" "$RESULTS/commands.txt"
echo "budget: SAMPLES=$SAMPLES VALID=$VALID TEST_LIMIT=${TEST_LIMIT:-all} SR_EPOCHS=$SR_EPOCHS SEED=$SEED THREADS=$THREADS LLM=$LLM" >> "$RESULTS/commands.txt"
echo "wrote $RESULTS"
