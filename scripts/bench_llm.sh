#!/usr/bin/env bash
# LLM engine throughput: a LoRA training step (forward + backward + AdamW on the adapters, loss on
# the answer span) and greedy generation, llara vs PyTorch + PEFT on the same weights (SmolLM2-135M
# from the shared GGUF, dequantized to f32), same shapes, same thread count, interleaved, median
# of REPEATS runs. Needs `pip install torch transformers peft gguf`.
#
#   scripts/bench_llm.sh                     # writes docs/results/llm_speed.md
#   REPEATS=1 THREADS=2 BATCH=4 SEQ=256 scripts/bench_llm.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${LLARA_SHARED:-../shared}"
LLARA="${LLARA:-target/release/llara}"
REPEATS="${REPEATS:-3}"
THREADS="${THREADS:-2}"
BATCH="${BATCH:-4}"
SEQ="${SEQ:-256}"
GGUF="${GGUF:-$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}"
OUT=runs/bench-llm
[ -x "$LLARA" ] || cargo build --release
mkdir -p "$OUT" docs/results
results="$OUT/results.jsonl"
: > "$results"
args=(--batch "$BATCH" --seq-len "$SEQ" --answer-len 32 --steps 3 --warmup 1 --lora-r 8 --lora-alpha 16
      --lora-dropout 0.05 --gen-prompt-len 256 --gen-new-tokens 32)
for r in $(seq 1 "$REPEATS"); do
  python3 scripts/reference/lora_step_torch.py --llm "$GGUF" --threads "$THREADS" "${args[@]}" 2>/dev/null \
    | tail -1 >> "$results"
  "$LLARA" -q llm bench --llm "$GGUF" --threads "$THREADS" "${args[@]}" | tail -1 >> "$results"
done
python3 - "$results" "$BATCH" "$SEQ" "$THREADS" "$REPEATS" > docs/results/llm_speed.md <<'PY'
import json, statistics, sys, platform
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
batch, seq, threads, repeats = sys.argv[2:6]
def med(impl, key):
    xs = [r["report"][key] for r in rows if r["impl"] == impl and r["report"].get(key) is not None]
    return statistics.median(xs) if xs else float("nan")
torch_v = next((r.get("torch", "?") for r in rows if r["impl"] != "llara"), "?")
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print("# LLM engine speed: llara vs PyTorch + PEFT\n")
print(f"SmolLM2-135M-Instruct (shared GGUF dequantized to f32), LoRA r 8 / alpha 16 / dropout 0.05 on q,k,v,o,gate,up,down,")
print(f"AdamW on the adapters; training batch {batch} × {seq} tokens, loss on the last 32 tokens of each row;")
print(f"generation: 32 greedy tokens after a 256-token prompt, adapters merged. {threads} threads, {cpu},")
print(f"median of {repeats} interleaved runs; PyTorch {torch_v} + transformers + PEFT (`scripts/reference/lora_step_torch.py`).")
print("Produced by `scripts/bench_llm.sh`.\n")
print("| | llara | PyTorch + PEFT | ratio |")
print("|---|---:|---:|---:|")
for key, label, scale, fmt in [
    ("train_tokens_per_second", "training tokens/s", 1, "{:.1f}"),
    ("train_seconds_per_step", "seconds per training step", 1, "{:.2f}"),
    ("gen_decode_tokens_per_second", "generation tokens/s (decode)", 1, "{:.1f}"),
    ("gen_prefill_seconds", "prefill seconds (256 tokens, batch 1, warm)", 1, "{:.2f}"),
    ("gen_first_prefill_seconds", "first prefill after merging the adapters (cold)", 1, "{:.2f}"),
    ("peak_rss_bytes", "peak RSS, GB (whole process)", 1e-9, "{:.2f}"),
]:
    a, b = med("llara", key) * scale, med("pytorch+peft", key) * scale
    lower_better = key in ("train_seconds_per_step", "gen_prefill_seconds", "gen_first_prefill_seconds", "peak_rss_bytes")
    ratio = (b / a) if lower_better else (a / b)
    print(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio:.2f}× |")
print("\nRatios are llara's advantage (above 1: llara faster or smaller). llara's peak after loading and")
print(f"after training: {med('llara', 'peak_rss_after_load_bytes')*1e-9:.2f} GB / {med('llara', 'peak_rss_after_train_bytes')*1e-9:.2f} GB.")
PY
cat docs/results/llm_speed.md
