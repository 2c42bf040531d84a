#!/usr/bin/env bash
# Prepares every real dataset in ../shared (or $LLARA_SHARED) into runs/data/: LLaRA's LastFM, Steam
# and MovieLens splits, and MovieLens-100K rebuilt from the raw GroupLens files.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${LLARA_SHARED:-../shared}"
LLARA="${LLARA:-cargo run --release --quiet --}"
for d in lastfm steam movielens; do
  $LLARA data prepare --from llara-jsonl "$SHARED/datasets/$d" --out "runs/data/$d" --force
done
$LLARA data prepare --from movielens-100k "$SHARED/datasets/raw/ml-100k" --out runs/data/movielens-100k --force
for d in lastfm steam movielens movielens-100k; do
  $LLARA data stats "runs/data/$d" | head -9
done
