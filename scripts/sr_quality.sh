#!/usr/bin/env bash
# Quality of llara's sequential recommenders against LLaRA's released checkpoints and the count
# baselines, on the fixed test candidate sets of LastFM and MovieLens (LLaRA's splits in ../shared):
#   each of SASRec, GRU4Rec, Caser trained by llara with seeds 1..5 per recipe (VARIANTS) -> mean ± std
#   of HR@1, expected HR@1 (over every candidate set) and NDCG@5; LLaRA's released weights and the
#   popularity / Markov / co-occurrence baselines scored by `llara eval-sr` on the same candidates.
# Writes runs/sr-quality/ and docs/results/sr_quality.md.
#
#   scripts/sr_quality.sh                  # the default recipe (about 45 minutes on 2 cores)
#   VARIANTS="default dros" JOBS=2 SEEDS="1 2 3 4 5" DATASETS="lastfm movielens" scripts/sr_quality.sh
#   TRAIN=0 scripts/sr_quality.sh          # only score and tabulate the runs already there
#
# Variants: default = `llara train-sr` with no flags (the recommended recipe); dros = LLaRA's own
# recipe (one-negative BCE, dropout 0.1, selection by the fixed sets' HR@1, 60 epochs, patience 15);
# ce, sampled, gbce = the default recipe with that loss; p20 = the default recipe with patience 20 for
# every model (GRU4Rec's default is 60: MODELS=gru4rec VARIANTS=p20 shows why).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${LLARA_SHARED:-../shared}"
LLARA="${LLARA:-target/release/llara}"
JOBS="${JOBS:-2}"
SEEDS="${SEEDS:-1 2 3 4 5}"
DATASETS="${DATASETS:-lastfm movielens}"
MODELS="${MODELS:-sasrec gru4rec caser}"
VARIANTS="${VARIANTS:-default}"
OUT=runs/sr-quality
flags_of() {
  case "$1" in
    default) echo "" ;;
    dros) echo "--loss bce --dropout 0.1 --select hr1 --ema 0 --epochs 60 --patience 15" ;;
    ce|sampled|gbce) echo "--loss $1" ;;
    p20) echo "--patience 20" ;;
    *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}
[ -x "$LLARA" ] || cargo build --release
mkdir -p "$OUT" docs/results
for d in $DATASETS; do
  [ -f "$OUT/data/$d/meta.json" ] || "$LLARA" -q data prepare --from llara-jsonl "$SHARED/datasets/$d" --out "$OUT/data/$d" --force
done
jobs_file="$OUT/jobs.txt"
: > "$jobs_file"
for v in $VARIANTS; do
  f=$(flags_of "$v")
  mkdir -p "$OUT/$v"
  for m in $MODELS; do for d in $DATASETS; do for s in $SEEDS; do
    run="$OUT/$v/$d-$m-s$s"
    [ -f "$run/metrics.json" ] && continue
    echo "$LLARA -q train-sr --data $OUT/data/$d --model $m --seed $s $f --out $run --force > $run.log 2>&1" >> "$jobs_file"
  done; done; done
done
if [ "${TRAIN:-1}" = 1 ]; then
  start=$(date +%s)
  xargs -P "$JOBS" -I{} bash -c '{}' < "$jobs_file"
  echo "training took $(( $(date +%s) - start )) s" | tee "$OUT/wall.txt"
fi
# LLaRA's released checkpoints and the count baselines on the same candidate sets; every model's
# per-row ranks (scores.jsonl) for the paired comparison.
for v in $VARIANTS; do for d in $DATASETS; do for m in $MODELS; do for s in $SEEDS; do
  run="$OUT/$v/$d-$m-s$s"
  [ -f "$run/metrics.json" ] && "$LLARA" -q eval-sr --model "$run" --data "$OUT/data/$d" --out "$run/eval-test" > /dev/null
done; done; done; done
for d in $DATASETS; do
  for m in $MODELS; do
    w="$SHARED/recmodels/$d-$m.safetensors"
    [ -f "$w" ] || continue
    "$LLARA" -q eval-sr --model "$w" --data "$OUT/data/$d" --json --out "$OUT/released-$d-$m" > "$OUT/released-$d-$m.json"
  done
  for b in popularity markov cooccurrence; do
    "$LLARA" -q eval-sr --model "$b" --data "$OUT/data/$d" --json > "$OUT/baseline-$d-$b.json"
  done
done
python3 scripts/sr_quality_table.py "$OUT" $VARIANTS > docs/results/sr_quality.md
cat docs/results/sr_quality.md
