#!/usr/bin/env bash
# `llara tune` (2 steps) and `llara eval --mode score` (2 test rows) on the Llama-2-7B shape with random weights
# kept in q4_k blocks, LastFM, peak RSS by `/usr/bin/time -v`. Figures: docs/results/memory_7b.md (~20 min on
# 2 cores).
set -euxo pipefail
cd "$(dirname "$0")/.."
L="${LLARA:-target/release/llara}"
SHARED="${LLARA_SHARED:-../shared}"
[ -x "$L" ] || cargo build --release
[ -f runs/big/lastfm/meta.json ] || "$L" -q data prepare --from llara-jsonl "$SHARED/datasets/lastfm" --out runs/big/lastfm --seed 42 --force
/usr/bin/time -v "$L" tune --data runs/big/lastfm --sr "$SHARED/recmodels/lastfm-sasrec.safetensors" \
  --llm builtin:random:configs/llama2-7b.json --dtype q4_k --checkpoint-layers --batch-size 1 --grad-accum 1 \
  --max-steps 2 --max-train-samples 2 --valid-samples 1 --max-new-tokens 4 --threads 2 --seed 42 \
  --out runs/big/tune-7b-q4k --force
/usr/bin/time -v "$L" eval --run runs/big/tune-7b-q4k --split test --mode score --limit 2 --batch-size 1 --threads 2 --json
