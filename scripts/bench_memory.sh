#!/usr/bin/env bash
# Training memory: peak RSS of `llara tune` on the LastFM CPU-budget workload (hybrid prompts, SmolLM2-135M
# in f32) for several batch sizes, with and without activation checkpointing, and of the LoRA training step
# (`llara llm bench`, synthetic tokens) for several sequence lengths. Writes docs/results/memory.md.
#
#   scripts/bench_memory.sh
#   BATCHES="1 4" SEQS="128 256" scripts/bench_memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
SHARED="${LLARA_SHARED:-../shared}"
LLARA="${LLARA:-target/release/llara}"
BATCHES="${BATCHES:-1 2 4 8}"
SEQS="${SEQS:-128 256 512}"
THREADS="${THREADS:-2}"
DATA="${DATA:-runs/data/lastfm}"
SR="${SR:-$SHARED/recmodels/lastfm-sasrec.safetensors}"
GGUF="${GGUF:-$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}"
OUTFILE="${OUTFILE:-docs/results/memory.md}"
[ -x "$LLARA" ] || cargo build --release
[ -f "$DATA/meta.json" ] || "$LLARA" -q data prepare --from llara-jsonl "$SHARED/datasets/lastfm" --out "$DATA"
W=runs/bench-memory
mkdir -p "$W" "$(dirname "$OUTFILE")"
gb() { awk '{printf "%.2f", $1 / 1048576}' "$1"; }
{
  echo "# Training memory (peak RSS)"
  echo
  echo "Whole-process peak RSS (\`/usr/bin/time -f %M\`), SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to f32),"
  echo "LoRA r 8 on all seven projections, $THREADS threads. Produced by \`scripts/bench_memory.sh\`."
  echo
  echo "## \`llara tune\` on LastFM hybrid prompts (3 optimizer steps, no validation)"
  echo
  echo "| batch | peak RSS (GB) | with --checkpoint-layers (GB) | tokens/s | tokens/s with checkpointing |"
  echo "|---:|---:|---:|---:|---:|"
  for b in $BATCHES; do
    row="| $b"
    tps=()
    for ck in "" "--checkpoint-layers"; do
      rm -rf "$W/run"
      /usr/bin/time -f '%M' -o "$W/rss.txt" "$LLARA" -q tune --data "$DATA" --sr "$SR" --llm "$GGUF" \
        --curriculum hybrid-only --batch-size "$b" --grad-accum 1 --max-train-samples $((3 * b)) --epochs 1 \
        --valid-samples 0 --seed 42 --threads "$THREADS" $ck --out "$W/run" > /dev/null
      row="$row | $(gb "$W/rss.txt")"
      tps+=("$(tune_tokens_per_second "$W/run/train_log.jsonl")")
    done
    echo "$row | ${tps[0]} | ${tps[1]} |"
  done
  echo
  echo "## LoRA training step on synthetic tokens (\`llara llm bench\`, batch 4, 2 steps)"
  echo
  echo "| sequence length | peak RSS (GB) | with --checkpoint (GB) |"
  echo "|---:|---:|---:|"
  for t in $SEQS; do
    row="| $t"
    for ck in "" "--checkpoint"; do
      /usr/bin/time -f '%M' -o "$W/rss.txt" "$LLARA" -q llm bench --llm "$GGUF" --threads "$THREADS" --batch 4 \
        --seq-len "$t" --answer-len 32 --steps 2 --warmup 0 --gen-prompt-len 8 --gen-new-tokens 2 $ck > /dev/null
      row="$row | $(gb "$W/rss.txt")"
    done
    echo "$row |"
  done
} > "$OUTFILE"
cat "$OUTFILE"
