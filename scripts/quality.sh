#!/usr/bin/env bash
# The quality benchmark of issue 14: LLaRA variants against their recommender, text-only tuning and
# count baselines on the same fixed candidates, with 95% intervals and paired p-values.
#
#   scripts/quality.sh                 # Steam (1,186 test users), SmolLM2-135M, the budget below
#   DATASET=lastfm SR=../shared/recmodels/lastfm-sasrec.safetensors scripts/quality.sh
#
# Knobs (environment): DATASET (steam), SR (LLaRA's released SASRec of the dataset), SAMPLES training
# rows per tune run (200), BATCH × ACCUM per optimizer step (4 × 2), LR (5e-4), VALID rows validated on
# (32), TEST_LIMIT (all), GEN_LIMIT rows evaluated by generation (64; empty: all), SEED (42), THREADS (2),
# VARIANTS (the runs below; NAME-bf16: NAME with --dtype bf16), TABLE_ONLY=1 (run nothing, only write the table), CAND_SEEDS (extra candidate seeds the test split is also scored on, e.g. "1 2":
# `data prepare --seed S` draws other fixed candidate sets for the same users). Finished steps are skipped on a re-run (delete runs/quality/DATASET/X to redo X).
# Output: runs/quality/DATASET/*, docs/results/quality.md for Steam (quality-DATASET.md for others): table,
# commands and wall times.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${LLARA_SHARED:-../shared}"
DATASET="${DATASET:-steam}"
SR="${SR:-$SHARED/recmodels/$DATASET-sasrec.safetensors}"
LLM="${LLM:-$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}"
LLARA="${LLARA:-target/release/llara}"
SAMPLES="${SAMPLES:-200}"
BATCH="${BATCH:-4}"
ACCUM="${ACCUM:-2}"
LR="${LR:-5e-4}"
VALID="${VALID:-32}"
TEST_LIMIT="${TEST_LIMIT:-}"
GEN_LIMIT="${GEN_LIMIT-64}"
SEED="${SEED:-42}"
THREADS="${THREADS:-2}"
CAND_SEEDS="${CAND_SEEDS:-}"
VARIANTS="${VARIANTS:-hybrid-prior text-only}"
OUT="${OUT:-runs/quality/$DATASET}"
# Steam's table is the headline file (docs/results/quality.md); other datasets get their own.
if [ "$DATASET" = steam ]; then RESULTS="${RESULTS:-docs/results/quality.md}"; else RESULTS="${RESULTS:-docs/results/quality-$DATASET.md}"; fi
[ -x "$LLARA" ] || cargo build --release
mkdir -p "$OUT"
LOG="$OUT/commands.txt"
touch "$LOG"
. scripts/lib.sh
# TABLE_ONLY=1: run nothing, only write the table from what the run folders already hold.
if [ -n "${TABLE_ONLY:-}" ]; then run() { echo "TABLE_ONLY: not run: $*" >&2; }; fi
limit=()
[ -n "$TEST_LIMIT" ] && limit=(--limit "$TEST_LIMIT")
# GEN_LIMIT= (empty): generation on every test user too.
gen_limit=()
[ -n "$GEN_LIMIT" ] && gen_limit=(--limit "$GEN_LIMIT")

[ -f "$OUT/data/meta.json" ] ||
  run "$LLARA" -q data prepare --from llara-jsonl "$SHARED/datasets/$DATASET" --out "$OUT/data" --seed "$SEED" --force

# The LLaRA variants: name → tune flags.
flags_of() {
  case "$1" in
    # Any variant with bf16 projection weights on the CPU (the bf16 GEMM): VARIANTS="hybrid-prior hybrid-prior-bf16".
    *-bf16) echo "$(flags_of "${1%-bf16}") --dtype bf16" ;;
    # The recommended setting: hybrid prompts with a [UserEmb] state token and s_fc rows on the
    # candidates, a scoring head over the hidden states that starts from the recommender's own scores.
    # The same flags under other names, which only tell the rows apart: hybrid-prior-lr is run under another
    # LR (LR=5e-3 VARIANTS=hybrid-prior-lr ...); -caser / -gru4rec read LLaRA's other recommenders (the prior,
    # the tokens and the projector input from Caser / GRU4Rec, see sr_of).
    hybrid-prior | hybrid-prior-lr | hybrid-prior-caser | hybrid-prior-gru4rec) echo "--curriculum hybrid-only --objective both --head-prior --user-token --cand-emb output" ;;
    # The same with the head at 100× the run's learning rate (LR 5e-4: the head at 5e-2).
    hybrid-prior-headlr) echo "--curriculum hybrid-only --objective both --head-prior --user-token --cand-emb output --head-lr 5e-2" ;;
    # The same head and behaviour tokens without the recommender prior (what the LLM reads by itself).
    # hybrid-head-long: the same flags, run with more training rows (SAMPLES=1000 VARIANTS=hybrid-head-long ...):
    # whether more optimizer steps let the LLM learn the ranking by itself.
    hybrid-head | hybrid-head-long) echo "--curriculum hybrid-only --objective both --user-token --cand-emb output" ;;
    # Ablations of the recommended setting, one lever each.
    hybrid-prior-input) echo "--curriculum hybrid-only --objective both --head-prior --user-token --cand-emb input" ;;
    hybrid-prior-nouser) echo "--curriculum hybrid-only --objective both --head-prior --cand-emb output" ;;
    hybrid-prior-warmup) echo "--curriculum hybrid-only --objective both --head-prior --user-token --cand-emb output --projector-warmup 8" ;;
    hybrid-prior-listwise) echo "--curriculum hybrid-only --objective listwise --head-prior --user-token --cand-emb output" ;;
    # The listwise loss over the candidates' answer log-likelihoods (one packed pass per row), no head.
    hybrid-answer) echo "--curriculum hybrid-only --objective both --ranker answer --user-token --cand-emb output" ;;
    # The one-token verbalizer: lettered candidates, the softmax over the labels' log-probabilities.
    hybrid-letter) echo "--curriculum hybrid-only --objective both --ranker answer --answer letter --user-token --cand-emb output" ;;
    text-letter) echo "--curriculum text-only --objective both --ranker answer --answer letter" ;;
    # The backbone as it is: no step moves it (lr 0), text prompts, answers scored by log-likelihood.
    untuned) echo "--curriculum text-only --objective generative --max-steps 1" ;;
    # Text-only prompt tuning (titles only), the same head and loss.
    text-only) echo "--curriculum text-only --objective both" ;;
    # The paper: linear curriculum, generative loss, LLaRA's input-side item tokens.
    paper) echo "--curriculum linear --objective generative" ;;
    *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}

lr_of() { if [ "$1" = untuned ]; then echo 0; else echo "$LR"; fi; }
# Variants named *-caser / *-gru4rec read LLaRA's released Caser / GRU4Rec of the dataset instead.
sr_of() {
  case "$1" in
    *-caser) echo "$SHARED/recmodels/$DATASET-caser.safetensors" ;;
    *-gru4rec) echo "$SHARED/recmodels/$DATASET-gru4rec.safetensors" ;;
    *) echo "$SR" ;;
  esac
}

for v in $VARIANTS; do
  r="$OUT/llara-$v"
  if [ ! -f "$r/metrics.json" ] || ! grep -q '"finished": true' "$r/metrics.json"; then
    # shellcheck disable=SC2046
    run "$LLARA" -q tune --data "$OUT/data" --sr "$(sr_of "$v")" --llm "$LLM" $(flags_of "$v") \
      --epochs 1 --batch-size "$BATCH" --grad-accum "$ACCUM" --lr "$(lr_of "$v")" --max-train-samples "$SAMPLES" \
      --valid-samples "$VALID" --max-new-tokens 32 --seed "$SEED" --threads "$THREADS" --out "$r" --force
  fi
  [ -f "$r/eval-test-score/metrics.json" ] ||
    run "$LLARA" -q eval --run "$r" --split test --mode score "${limit[@]}" --threads "$THREADS" --json
  [ -f "$r/eval-test/metrics.json" ] ||
    run "$LLARA" -q eval --run "$r" --split test "${gen_limit[@]}" --max-new-tokens 32 --threads "$THREADS" --json
  [ -f "$r/eval-test-constrained/metrics.json" ] ||
    run "$LLARA" -q eval --run "$r" --split test --constrained "${gen_limit[@]}" --max-new-tokens 32 --threads "$THREADS" --json
  for cs in $CAND_SEEDS; do
    [ -f "$OUT/data-$cs/meta.json" ] ||
      run "$LLARA" -q data prepare --from llara-jsonl "$SHARED/datasets/$DATASET" --out "$OUT/data-$cs" --seed "$cs" --force
    [ -f "$r/eval-test-score-cands$cs/metrics.json" ] ||
      run "$LLARA" -q eval --run "$r" --data "$OUT/data-$cs" --split test --mode score "${limit[@]}" --threads "$THREADS" --out "$r/eval-test-score-cands$cs" --json
  done
done

# The recommenders and the count baselines on the same candidates (per-row scores for the paired tests).
# LLaRA's other released recommenders of the dataset, and a SASRec llara trains on the same rows.
for arch in gru4rec caser; do
  w="$SHARED/recmodels/$DATASET-$arch.safetensors"
  [ -f "$w" ] && { [ -f "$OUT/$arch/scores.jsonl" ] ||
    run "$LLARA" -q eval-sr --model "$w" --data "$OUT/data" --split test --out "$OUT/$arch" --json; }
done
[ -f "$OUT/sasrec-llara-run/metrics.json" ] ||
  run "$LLARA" -q train-sr --data "$OUT/data" --model sasrec --seed "$SEED" --threads "$THREADS" --out "$OUT/sasrec-llara-run" --force
[ -f "$OUT/sasrec-llara/scores.jsonl" ] ||
  run "$LLARA" -q eval-sr --model "$OUT/sasrec-llara-run" --data "$OUT/data" --split test --out "$OUT/sasrec-llara" --json
# SASRec and the count baselines on the main candidates and on every extra candidate seed's.
for cs in "" $CAND_SEEDS; do
  data="$OUT/data${cs:+-$cs}"
  for b in sasrec popularity markov cooccurrence; do
    m="$b"; [ "$b" = sasrec ] && m="$SR"
    [ -f "$OUT/$b${cs:+-cands$cs}/scores.jsonl" ] ||
      run "$LLARA" -q eval-sr --model "$m" --data "$data" --split test --out "$OUT/$b${cs:+-cands$cs}" --json
  done
done

CAND_SEEDS="$CAND_SEEDS" python3 scripts/quality_table.py "$OUT" "$DATASET" $VARIANTS > "$RESULTS.partial"
{
  echo
  echo "## Commands (wall time of each after it)"
  echo
  echo '```'
  cat "$LOG"
  echo '```'
  echo
  echo "Budget: SAMPLES=$SAMPLES BATCH=$BATCH ACCUM=$ACCUM LR=$LR VALID=$VALID TEST_LIMIT=${TEST_LIMIT:-all} GEN_LIMIT=${GEN_LIMIT:-all} SEED=$SEED THREADS=$THREADS; CPU: $(lscpu | sed -n 's/^Model name: *//p') ($(nproc) cores)"
} >> "$RESULTS.partial"
mv "$RESULTS.partial" "$RESULTS"
echo "wrote $RESULTS"
