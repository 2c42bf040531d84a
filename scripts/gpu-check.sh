#!/usr/bin/env bash
# Runs on a GPU machine with what scripts/gpu-build.sh packed (dist/gpu/): CPU-vs-CUDA parity of the
# engine's logits in f32 and bf16 (tiny built-in Llama, and SmolLM2-135M when ../shared is there), the
# first training steps' loss and gradient norm on CUDA (f32, bf16) against the CPU f32 path, a short LLaRA
# tuning run and both evaluations on CUDA, the LLM benchmark with peak GPU memory (nvidia-smi, sampled
# every 100 ms) on SmolLM2 and on a 1.24 B-parameter Llama of random weights (configs/llama-1b.json: real
# size, no download), then one summary table. Every timer waits for the device. Under 8 minutes.
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

# 2b. bf16 on CUDA against the CPU's f32 logits (bf16 rounding: a looser tolerance).
if [ -f "$GGUF" ] && [ -f "$W/smollm2-cpu.safetensors" ]; then
  "$LLARA" -q llm logits --llm "$GGUF" --prompt "The capital of France is Paris, and the capital of Italy is" \
    --device cuda --dtype bf16 --out "$W/smollm2-bf16.safetensors" --compare "$W/smollm2-cpu.safetensors" \
    > "$W/smollm2-bf16.txt" 2>&1
  d=$(grep -oE 'max \|difference\| [0-9.e+-]+' "$W/smollm2-bf16.txt" | awk '{print $3}')
  if [ -n "$d" ] && awk -v d="$d" 'BEGIN{exit !(d <= 1.0)}'; then row "logits smollm2 CPU f32 vs CUDA bf16" ok "max diff $d (tol 1.0)"
  else row "logits smollm2 CPU f32 vs CUDA bf16" FAIL "${d:-$(tail -1 "$W/smollm2-bf16.txt")}"; fi
fi

# 2c. Training parity: the same 3 steps (same seed, same batches, no dropout) on the CPU in f32 and on
#     CUDA in f32 and bf16; the logged loss and gradient norm (over every LoRA and projector tensor) of
#     each step must agree.
LLM_P=builtin:tiny; [ -f "$GGUF" ] && LLM_P="$GGUF"
step_run() { # name device dtype
  "$LLARA" -q tune --data "$HERE/data-lastfm" --sr "$HERE/lastfm-sasrec.safetensors" --llm "$LLM_P" --device "$2" \
    --dtype "$3" --curriculum hybrid-only --batch-size 2 --grad-accum 1 --max-train-samples 6 --valid-samples 0 \
    --lora-dropout 0 --seed 7 --out "$W/step-$1" --force > "$W/step-$1.txt" 2>&1
}
if step_run cpu cpu f32; then
  for v in "cuda f32 0.002" "cuda bf16 0.05"; do
    set -- $v
    if step_run "$1-$2" "$1" "$2"; then
      r=$(python3 - "$W/step-cpu/train_log.jsonl" "$W/step-$1-$2/train_log.jsonl" "$3" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]; b = [json.loads(l) for l in open(sys.argv[2])]
tol = float(sys.argv[3])
rel = lambda x, y: abs(x - y) / max(abs(y), 1e-6)
worst = max(max(rel(q["loss"], p["loss"]), rel(q["grad_norm"], p["grad_norm"])) for p, q in zip(a, b))
print(("ok" if len(a) == len(b) and worst <= tol else "FAIL") + f" worst relative difference {worst:.2e} over {len(b)} steps (tol {tol})")
PY
)
      row "tune steps CPU f32 vs CUDA $2" "${r%% *}" "${r#* }"
    else row "tune steps CPU f32 vs CUDA $2" FAIL "$(tail -1 "$W/step-$1-$2.txt")"; fi
  done
else
  row "tune steps on the CPU (reference)" FAIL "$(tail -1 "$W/step-cpu.txt")"
fi

# Peak GPU memory of a command: nvidia-smi sampled every 100 ms while it runs (MiB, whole device).
gpu_peak() { # file command...
  local f=$1; shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$f" 2>/dev/null &
  local mon=$!
  "$@"; local rc=$?
  kill $mon 2>/dev/null; wait $mon 2>/dev/null
  PEAK=$(sort -n "$f" | tail -1); PEAK=${PEAK:-?}
  return $rc
}

# 3. A short LLaRA run on CUDA (SmolLM2 when available, else the tiny model) and both evaluations. Its LoRA
#    dropout (0.1, the default) draws every mask on the GPU (`Dropout::mask_like`): a mask made on the host
#    would stop the first step with a device mismatch.
LLM=builtin:tiny; [ -f "$GGUF" ] && LLM="$GGUF"
start=$SECONDS
if "$LLARA" -q tune --data "$HERE/data-lastfm" --sr "$HERE/lastfm-sasrec.safetensors" --llm "$LLM" --device cuda \
     --curriculum linear --batch-size 4 --grad-accum 1 --max-train-samples 32 --valid-samples 8 --max-new-tokens 16 \
     --out "$W/tune" --force > "$W/tune.txt" 2>&1; then
  row "llara tune on CUDA (8 steps, dropout masks on the GPU)" ok "$((SECONDS - start)) s; $(tail -1 "$W/tune.txt" | cut -c1-80)"
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

# 4. Throughput and GPU memory: the LoRA training step and generation, SmolLM2 (f32, bf16) and a Llama of
#    1.24 B random parameters in bf16 (batch 4 × 256 tokens).
bench() { # label spec dtype
  if gpu_peak "$W/mem-$1.txt" "$LLARA" -q llm bench --llm "$2" --device cuda --dtype "$3" --batch 4 --seq-len 256 \
       --steps 5 --warmup 2 > "$W/bench-$1.txt" 2>&1; then
    row "llm bench $1 on CUDA" ok "$(tail -1 "$W/bench-$1.txt" | python3 -c 'import json,sys; r=json.load(sys.stdin)["report"]; print("train %.0f tok/s, decode %.0f tok/s" % (r["train_tokens_per_second"], r["gen_decode_tokens_per_second"]))' 2>/dev/null || tail -c 160 "$W/bench-$1.txt"), peak GPU memory $PEAK MiB"
  else
    row "llm bench $1 on CUDA" FAIL "$(tail -1 "$W/bench-$1.txt")"
  fi
}
if [ "$LLM" != builtin:tiny ]; then
  bench smollm2-f32 "$LLM" f32
  bench smollm2-bf16 "$LLM" bf16
fi
[ -f "$HERE/llama-1b.json" ] && bench llama-1b-random-bf16 "builtin:random:$HERE/llama-1b.json" bf16

echo
echo "| check | result | detail |"
echo "|---|---|---|"
printf '%s\n' "${SUMMARY[@]}"
! printf '%s\n' "${SUMMARY[@]}" | grep -q "| FAIL |"
