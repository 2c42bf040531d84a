#!/usr/bin/env bash
# The recipe search behind llara's default recommender recipe (docs/results/sr_recipe_search.md):
# losses (one-negative BCE, full softmax, sampled softmax, gBCE), L2, learning rate, dropout, width,
# batch size and weight averaging for SASRec on LastFM (seeds 1-3 for the promising ones), and the
# chosen dropout for GRU4Rec, Caser and MovieLens. Every run states all flags that differ from
# LLaRA's recipe, so a later change of defaults does not change what a line means.
#   scripts/sr_recipe_search.sh        # ~2 h on 2 cores (two runs at a time)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${LLARA_SHARED:-../shared}"
LLARA="${LLARA:-target/release/llara}"
JOBS="${JOBS:-2}"
OUT=runs/sr-search
DATA=runs/sr-quality/data
[ -x "$LLARA" ] || cargo build --release
for d in lastfm movielens; do
  [ -f "$DATA/$d/meta.json" ] || "$LLARA" -q data prepare --from llara-jsonl "$SHARED/datasets/$d" --out "$DATA/$d" --force
done
mkdir -p "$OUT"
# name | dataset | model | seeds | flags (on top of LLaRA's recipe: lr 1e-3, L2 1e-4, batch 256, hidden 64)
base="--dropout 0.1 --ema 0 --select expected-hr1"
runs=$(cat <<LIST
bce|lastfm|sasrec|1|--loss bce $base --epochs 60 --patience 15
ce|lastfm|sasrec|1|--loss ce $base --epochs 60 --patience 15
sampled|lastfm|sasrec|1|--loss sampled $base --epochs 60 --patience 15
gbce|lastfm|sasrec|1|--loss gbce $base --epochs 60 --patience 15
bce-l0|lastfm|sasrec|1|--loss bce $base --l2 0 --epochs 60 --patience 15
ce-l0|lastfm|sasrec|1|--loss ce $base --l2 0 --epochs 60 --patience 15
sampled-l0|lastfm|sasrec|1|--loss sampled $base --l2 0 --epochs 60 --patience 15
gbce-l0|lastfm|sasrec|1|--loss gbce $base --l2 0 --epochs 60 --patience 15
bce-lr3|lastfm|sasrec|1|--loss bce $base --lr 3e-3 --epochs 100 --patience 15
sampled-l0-lr3|lastfm|sasrec|1|--loss sampled $base --l2 0 --lr 3e-3 --epochs 100 --patience 15
gbce-l0-lr3|lastfm|sasrec|1|--loss gbce $base --l2 0 --lr 3e-3 --epochs 100 --patience 15
sampled-n1k|lastfm|sasrec|1|--loss sampled $base --l2 0 --negatives 1024 --epochs 100 --patience 15
bce-h128|lastfm|sasrec|1|--loss bce $base --hidden 128 --epochs 100 --patience 15
bce-d3|lastfm|sasrec|1 2|--loss bce $base --dropout 0.3 --epochs 100 --patience 15
ce-d3|lastfm|sasrec|1|--loss ce $base --dropout 0.3 --epochs 100 --patience 15
bce-lr3-d3|lastfm|sasrec|1 2|--loss bce $base --lr 3e-3 --dropout 0.3 --epochs 100 --patience 15
bce-d5|lastfm|sasrec|1 2 3|--loss bce $base --dropout 0.5 --epochs 150 --patience 20
bce-lr3-d5|lastfm|sasrec|1|--loss bce $base --lr 3e-3 --dropout 0.5 --epochs 150 --patience 20
ce-d5|lastfm|sasrec|1|--loss ce $base --dropout 0.5 --epochs 150 --patience 20
sampled-d5|lastfm|sasrec|1|--loss sampled $base --dropout 0.5 --epochs 150 --patience 20
bce-d6|lastfm|sasrec|1 2 3|--loss bce $base --dropout 0.6 --epochs 150 --patience 20
bce-d7|lastfm|sasrec|1|--loss bce $base --dropout 0.7 --epochs 150 --patience 20
h128-d6|lastfm|sasrec|1|--loss bce $base --dropout 0.6 --hidden 128 --epochs 150 --patience 20
bs128-d6|lastfm|sasrec|1|--loss bce $base --dropout 0.6 --batch-size 128 --epochs 150 --patience 20
ema-d6|lastfm|sasrec|1 2|--loss bce --select expected-hr1 --dropout 0.6 --ema 0.999 --epochs 150 --patience 20
bce-d5|movielens|sasrec|1 2|--loss bce $base --dropout 0.5 --epochs 150 --patience 20
gru-d3|lastfm|gru4rec|1|--loss bce $base --dropout 0.3 --epochs 150 --patience 20
gru-d5|lastfm|gru4rec|1|--loss bce $base --dropout 0.5 --epochs 150 --patience 20
gru-d5|movielens|gru4rec|1|--loss bce $base --dropout 0.5 --epochs 150 --patience 20
gru-default-p60|lastfm|gru4rec|2 3|--loss bce --select expected-hr1 --dropout 0.6 --ema 0.999 --epochs 150 --patience 60
caser-d5|lastfm|caser|1|--loss bce $base --dropout 0.5 --epochs 150 --patience 20
caser-d5|movielens|caser|1|--loss bce $base --dropout 0.5 --epochs 150 --patience 20
LIST
)
jobs_file="$OUT/jobs.txt"
: > "$jobs_file"
while IFS='|' read -r name d m seeds flags; do
  for s in $seeds; do
    run="$OUT/$name-$d-$m-s$s"
    [ -f "$run/metrics.json" ] && continue
    echo "$LLARA -q train-sr --data $DATA/$d --model $m --seed $s $flags --out $run --force > $run.log 2>&1" >> "$jobs_file"
  done
done <<< "$runs"
xargs -P "$JOBS" -I{} bash -c '{}' < "$jobs_file"
python3 scripts/sr_search_table.py "$OUT" > docs/results/sr_recipe_search.md
cat docs/results/sr_recipe_search.md
