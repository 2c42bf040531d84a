#!/usr/bin/env bash
# Runs on a GPU machine with what scripts/gpu-build.sh packed (dist/gpu/): CPU-vs-CUDA parity of the
# engine's logits (tiny built-in Llama, and SmolLM2-135M when ../shared is there), a short LLaRA tuning
# run and both evaluations on CUDA, and the LLM benchmark, then one summary table. Under 8 minutes.
#
#   bash dist/gpu/gpu-check.sh           # from the repository root
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
LLARA="$HERE/llara"
SHARED="${LLARA_SHARED:-../shared}"
GGUF="$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
W="${OUT:-/tmp/llara-gpu-check}"
mkdir -p "$W"
declare -a SUMMARY
row() { SUMMARY+=("| $1 | $2 | $3 |"); }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"

# 1. The device is usable and a clear error comes back otherwise.
if "$LLARA" llm info --llm builtin:tiny --device cuda > "$W/info.txt" 2>&1; then row "CUDA device" ok "$(head -1 "$W/info.txt")"; else row "CUDA device" FAIL "$(tail -1 "$W/info.txt")"; fi

# 2. Logit parity CPU vs CUDA (f32), max |difference| computed by llara itself.
parity() {
  local name=$1 spec=$2 tol=$3
  "$LLARA" -q llm logits --llm "$spec" --prompt "The capital of France is Paris, and the capital of Italy is" \
    --device cpu --out "$W/$name-cpu.safetensors" > /dev/null 2>&1 &&
  "$LLARA" -q llm logits --llm "$spec" --prompt "The capital of France is Paris, and the capital of Italy is" \
    --device cuda --dtype f32 --out "$W/$name-cuda.safetensors" --compare "$W/$name-cpu.safetensors" \
    > "$W/$name-parity.txt" 2>&1
  local rc=$? d
  d=$(grep -oE 'max \|difference\| [0-9.e+-]+' "$W/$name-parity.txt" | awk '{print $3}')
  if [ $rc -eq 0 ] && awk -v d="$d" -v t="$tol" 'BEGIN{exit !(d != "" && d <= t)}'; then
    row "logits $name CPU vs CUDA" ok "max diff $d (tol $tol)"
  else
    row "logits $name CPU vs CUDA" FAIL "${d:-$(tail -1 "$W/$name-parity.txt")}"
  fi
}
parity tiny builtin:tiny 1e-4
[ -f "$GGUF" ] && parity smollm2 "$GGUF" 2e-3

# 3. A short LLaRA run on CUDA (SmolLM2 when available, else the tiny model) and both evaluations.
LLM=builtin:tiny; [ -f "$GGUF" ] && LLM="$GGUF"
start=$SECONDS
if "$LLARA" -q tune --data "$HERE/data-lastfm" --sr "$HERE/lastfm-sasrec.safetensors" --llm "$LLM" --device cuda \
     --curriculum linear --batch-size 4 --grad-accum 1 --max-train-samples 32 --valid-samples 8 --max-new-tokens 16 \
     --out "$W/tune" --force > "$W/tune.txt" 2>&1; then
  row "llara tune on CUDA (8 steps)" ok "$((SECONDS - start)) s; $(tail -1 "$W/tune.txt" | cut -c1-80)"
  for mode in generate score; do
    if "$LLARA" -q eval --run "$W/tune" --device cuda --split test --limit 32 --mode "$mode" --json > "$W/eval-$mode.txt" 2>&1; then
      row "llara eval --mode $mode on CUDA" ok "$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("%.2f rows/s, HR@1 %.3f" % (r["rows"] / r["seconds"], r["hr@1"]))' "$W/eval-$mode.txt" 2>/dev/null || tail -c 120 "$W/eval-$mode.txt")"
    else
      row "llara eval --mode $mode on CUDA" FAIL "$(tail -1 "$W/eval-$mode.txt")"
    fi
  done
else
  row "llara tune on CUDA" FAIL "$(tail -1 "$W/tune.txt")"
fi

# 4. Throughput: the LoRA training step and generation.
if [ "$LLM" != builtin:tiny ]; then
  if "$LLARA" -q llm bench --llm "$LLM" --device cuda --batch 4 --seq-len 256 --steps 5 --warmup 2 > "$W/bench.txt" 2>&1; then
    row "llm bench on CUDA" ok "$(tail -1 "$W/bench.txt" | python3 -c 'import json,sys; r=json.load(sys.stdin)["report"]; print("train %.0f tok/s, decode %.0f tok/s, peak RSS %.2f GB" % (r["train_tokens_per_second"], r["gen_decode_tokens_per_second"], r["peak_rss_bytes"] / 1e9))' 2>/dev/null || tail -c 160 "$W/bench.txt")"
  else
    row "llm bench on CUDA" FAIL "$(tail -1 "$W/bench.txt")"
  fi
fi

echo
echo "| check | result | detail |"
echo "|---|---|---|"
printf '%s\n' "${SUMMARY[@]}"
! printf '%s\n' "${SUMMARY[@]}" | grep -q "| FAIL |"
