#!/usr/bin/env bash
# Quality of llara's sequential recommenders against LLaRA's released checkpoints, on the fixed test
# candidate sets of LastFM and MovieLens (LLaRA's splits in ../shared):
#   each of SASRec, GRU4Rec, Caser trained by llara with seeds 1..5 -> mean ± std of HR@1 and NDCG@5,
#   and LLaRA's released weights scored by `llara eval-sr` on the same candidates.
# Writes runs/sr-quality/ and docs/results/sr_quality.md.
#
#   scripts/sr_quality.sh                  # all of it (about 15 minutes on 2 cores)
#   EPOCHS=60 PATIENCE=15 JOBS=2 SEEDS="1 2 3 4 5" DATASETS="lastfm movielens" scripts/sr_quality.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${LLARA_SHARED:-../shared}"
LLARA="${LLARA:-target/release/llara}"
EPOCHS="${EPOCHS:-60}"
PATIENCE="${PATIENCE:-15}"
JOBS="${JOBS:-2}"
SEEDS="${SEEDS:-1 2 3 4 5}"
DATASETS="${DATASETS:-lastfm movielens}"
MODELS="${MODELS:-sasrec gru4rec caser}"
OUT=runs/sr-quality
[ -x "$LLARA" ] || cargo build --release
mkdir -p "$OUT" docs/results
for d in $DATASETS; do
  [ -f "$OUT/data/$d/meta.json" ] || "$LLARA" -q data prepare --from llara-jsonl "$SHARED/datasets/$d" --out "$OUT/data/$d" --force
done
jobs_file="$OUT/jobs.txt"
: > "$jobs_file"
for d in $DATASETS; do for m in $MODELS; do for s in $SEEDS; do
  run="$OUT/runs/$d-$m-s$s"
  [ -f "$run/metrics.json" ] && continue
  echo "$LLARA -q train-sr --data $OUT/data/$d --model $m --seed $s --epochs $EPOCHS --patience $PATIENCE --out $run --force > $run.log 2>&1" >> "$jobs_file"
done; done; done
mkdir -p "$OUT/runs"
start=$(date +%s)
xargs -P "$JOBS" -I{} bash -c '{}' < "$jobs_file"
echo "training took $(( $(date +%s) - start )) s" | tee "$OUT/wall.txt"
# LLaRA's released checkpoints on the same candidate sets.
for d in $DATASETS; do for m in $MODELS; do
  w="$SHARED/recmodels/$d-$m.safetensors"
  [ -f "$w" ] || continue
  "$LLARA" -q eval-sr --model "$w" --data "$OUT/data/$d" --json > "$OUT/released-$d-$m.json"
done; done
python3 scripts/sr_quality_table.py "$OUT" "$EPOCHS" "$PATIENCE" > docs/results/sr_quality.md
cat docs/results/sr_quality.md
