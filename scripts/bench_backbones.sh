#!/usr/bin/env bash
# Peak memory and speed of the LoRA training step and of generation on backbones of real shape with random
# weights (`builtin:random:CONFIG`, no download), per weight storage (--dtype f32, bf16, q8_0, q4_k), against
# the memory guard's estimate printed before loading. One `llara llm bench` per row under `/usr/bin/time -v`:
# batch 1 × SEQ tokens (answer 16), LoRA r 8 on all seven projections, one step, generation of 4 tokens after
# a SEQ-token prompt, THREADS threads, activation checkpointing for models of 1 B parameters and more.
#
#   scripts/bench_backbones.sh                                   # writes docs/results/backbones.md
#   MODELS="configs/llama-1b.json" DTYPES="bf16 q4_k" scripts/bench_backbones.sh
#   MODELS="configs/llama2-7b.json" DTYPES=q4_k OUTFILE=runs/7b.md scripts/bench_backbones.sh   # ~7 min a row
set -euo pipefail
cd "$(dirname "$0")/.."
LLARA="${LLARA:-target/release/llara}"
MODELS="${MODELS:-configs/smollm2-135m.json configs/llama-1b.json configs/llama2-7b.json}"
DTYPES="${DTYPES:-f32 bf16 q8_0 q4_k}"
SEQ="${SEQ:-512}"
THREADS="${THREADS:-2}"
OUTFILE="${OUTFILE:-docs/results/backbones.md}"
W=runs/bench-backbones
[ -x "$LLARA" ] || cargo build --release
mkdir -p "$W" "$(dirname "$OUTFILE")"
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')
{
  echo "# Backbones of real shape: peak memory and speed per weight storage"
  echo
  echo "$cpu, $THREADS threads; random weights of the config's shape; batch 1 × $SEQ tokens, LoRA r 8 on all"
  echo "seven projections, one training step, 4 generated tokens after a $SEQ-token prompt. Peak RSS is the"
  echo "whole process (\`/usr/bin/time -v\`), in 10⁹ bytes (GiB in brackets). Produced by \`scripts/bench_backbones.sh\`."
  echo
  echo "| model | --dtype | estimate (GB) | after load (GB) | after train (GB) | peak (GB) | train tokens/s | decode tokens/s | load (s) |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
} > "$OUTFILE.partial"
for m in $MODELS; do
  spec="builtin:random:$m"
  ckpt=()
  [ "$m" = configs/smollm2-135m.json ] || ckpt=(--checkpoint)
  for dt in $DTYPES; do
    tag="$(basename "$m" .json)-$dt"
    if ! /usr/bin/time -v "$LLARA" llm bench --llm "$spec" --dtype "$dt" --batch 1 --seq-len "$SEQ" --answer-len 16 \
        --steps 1 --warmup 0 --gen-prompt-len "$SEQ" --gen-new-tokens 4 --threads "$THREADS" "${ckpt[@]}" \
        > "$W/$tag.json" 2> "$W/$tag.err"; then
      why=$(grep -m1 -o 'estimated peak memory.*' "$W/$tag.err" | cut -c1-80 || true)
      echo "| $m | $dt | refused or failed: ${why:-see $W/$tag.err} | | | | | | |" >> "$OUTFILE.partial"
      continue
    fi
    python3 - "$m" "$dt" "$W/$tag.json" "$W/$tag.err" >> "$OUTFILE.partial" <<'PY'
import json, re, sys
m, dt, out, err = sys.argv[1:5]
r = json.loads(open(out).read().strip().splitlines()[-1])["report"]
text = open(err).read()
est = re.search(r"estimated peak memory ([0-9.]+) GB", text)
load = re.search(r"loaded .* in ([0-9.]+)s", text)
peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) * 1024
g = lambda b: f"{b / 1e9:.2f} ({b / 2**30:.2f})"
print(f"| {m} | {dt} | {est.group(1) if est else ''} | {g(r['peak_rss_after_load_bytes'])} | "
      f"{g(r['peak_rss_after_train_bytes'])} | {g(peak)} | {r['train_tokens_per_second']:.2f} | "
      f"{r['gen_decode_tokens_per_second']:.2f} | {load.group(1) if load else ''} |")
PY
  done
done
mv "$OUTFILE.partial" "$OUTFILE"
cat "$OUTFILE"
