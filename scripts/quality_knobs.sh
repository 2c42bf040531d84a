#!/usr/bin/env bash
# Does more training move LLaRA's HR@1 on a CPU budget? Tunes the linear-curriculum LLaRA on the
# pipeline's LastFM data and SASRec with each training-set size in SIZES (the 0 entry is the untuned
# backbone with a freshly initialised projector: one step at lr 0), scores the first TEST_LIMIT test rows
# by candidate scoring and by generation, and writes docs/results/quality_knobs.md.
#
#   scripts/pipeline.sh lastfm          # first: the data and the SASRec in runs/pipeline/lastfm
#   SIZES="192 768" scripts/quality_knobs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LLARA="${LLARA:-target/release/llara}"
SHARED="${LLARA_SHARED:-../shared}"
DATASET="${DATASET:-lastfm}"
BASE="${BASE:-runs/pipeline/$DATASET}"
LLM="${LLM:-$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}"
SIZES="${SIZES:-192 768}"
CURRICULUM="${CURRICULUM:-linear}"
TEST_LIMIT="${TEST_LIMIT:-61}"
VALID="${VALID:-32}"
SEED="${SEED:-42}"
THREADS="${THREADS:-2}"
OUTFILE="${OUTFILE:-docs/results/quality_knobs-$DATASET.md}"
[ -x "$LLARA" ] || cargo build --release
[ -f "$BASE/sr-sasrec/model.safetensors" ] || { echo "no $BASE/sr-sasrec: run scripts/pipeline.sh $DATASET first"; exit 1; }
W=runs/knobs/$DATASET
mkdir -p "$W"
LOG="$W/commands.txt"
: > "$LOG"
. scripts/lib.sh
runs=()
for n in $SIZES; do
  out="$W/$CURRICULUM-$n"
  if [ "$n" = 0 ]; then
    extra=(--max-train-samples 4 --batch-size 4 --grad-accum 1 --lr 0 --min-lr 0)
  else
    extra=(--max-train-samples "$n")
  fi
  run "$LLARA" -q tune --config configs/cpu-budget.toml --data "$BASE/data" --sr "$BASE/sr-sasrec" --llm "$LLM" \
    --curriculum "$CURRICULUM" "${extra[@]}" --valid-samples "$VALID" --seed "$SEED" --threads "$THREADS" \
    --out "$out" --force
  run "$LLARA" -q eval --run "$out" --split test --limit "$TEST_LIMIT" --threads "$THREADS" --json
  run "$LLARA" -q eval --run "$out" --split test --mode score --limit "$TEST_LIMIT" --threads "$THREADS" --json
  runs+=("$out")
done
run "$LLARA" -q report "$BASE/sr-sasrec" "${runs[@]}" --out "$W/report"
{
  echo "# Training budget vs. LLaRA quality ($DATASET, SmolLM2-135M, curriculum $CURRICULUM)"
  echo
  echo "Produced by \`SIZES=\"$SIZES\" scripts/quality_knobs.sh\` (seed $SEED, $THREADS threads; the first"
  echo "$TEST_LIMIT test rows, 20 fixed candidates each: chance HR@1 0.05, HR@5 0.25, HR@10 0.5). A training-set size"
  echo "of 0 is the untuned backbone (one step at lr 0: the adapter is zero, the projector freshly initialised)."
  echo
  cat "$W/report/report.md"
  echo
  echo '```'
  cat "$LOG"
  echo '```'
} > "$OUTFILE"
cat "$OUTFILE"
