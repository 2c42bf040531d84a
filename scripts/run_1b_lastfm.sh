#!/usr/bin/env bash
# End to end past toy size: `llara tune` (4 steps) and `llara eval --mode score` on 32 LastFM test rows with a
# 1.24 B Llama-shaped backbone (random weights of configs/llama-1b.json), bf16, peak RSS by `/usr/bin/time -v`.
# Figures: docs/results/memory_7b.md (~10 min on 2 cores).
set -euxo pipefail
cd "$(dirname "$0")/.."
L="${LLARA:-target/release/llara}"
SHARED="${LLARA_SHARED:-../shared}"
DTYPE="${DTYPE:-bf16}"
[ -x "$L" ] || cargo build --release
[ -f runs/big/lastfm/meta.json ] || "$L" -q data prepare --from llara-jsonl "$SHARED/datasets/lastfm" --out runs/big/lastfm --seed 42 --force
/usr/bin/time -v "$L" tune --data runs/big/lastfm --sr "$SHARED/recmodels/lastfm-sasrec.safetensors" \
  --llm builtin:random:configs/llama-1b.json --dtype "$DTYPE" --checkpoint-layers --batch-size 1 --grad-accum 1 \
  --max-steps 4 --max-train-samples 4 --valid-samples 2 --max-new-tokens 8 --threads 2 --seed 42 \
  --out "runs/big/tune-1b-$DTYPE" --force
/usr/bin/time -v "$L" eval --run "runs/big/tune-1b-$DTYPE" --split test --mode score --limit 32 --batch-size 1 \
  --threads 2 --json
