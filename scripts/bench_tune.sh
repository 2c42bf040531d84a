#!/usr/bin/env bash
# The product's main speed figure: a LoRA training step on the real LLaRA workload (hybrid prompts from
# LastFM, SmolLM2-135M from the shared GGUF in f32, LLaRA's SASRec, batch 4), llara vs. PyTorch + PEFT
# replaying the very batches llara trained on (scripts/reference/tune_step_torch.py, f32 and bf16
# autocast), and llara `--dtype bf16` (bf16 projection weights, the bf16 GEMM) on the same batches,
# interleaved, REPEATS times per thread count; medians and peak RSS go to docs/results/tune_speed.md.
#
#   scripts/bench_tune.sh                      # 1 and 2 threads, 3 repeats, 8 steps (the first is warm-up)
#   LLARA_BF16=0 scripts/bench_tune.sh         # without llara's bf16 runs
#   THREADS_LIST=2 REPEATS=1 STEPS=4 scripts/bench_tune.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
SHARED="${LLARA_SHARED:-../shared}"
LLARA="${LLARA:-target/release/llara}"
REPEATS="${REPEATS:-3}"
THREADS_LIST="${THREADS_LIST:-1 2}"
STEPS="${STEPS:-8}"
BATCH="${BATCH:-4}"
BF16="${BF16:-1}"
LLARA_BF16="${LLARA_BF16:-1}"
DATA="${DATA:-runs/data/lastfm}"
SR="${SR:-$SHARED/recmodels/lastfm-sasrec.safetensors}"
GGUF="${GGUF:-$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}"
OUTFILE="${OUTFILE:-docs/results/tune_speed.md}"
[ -x "$LLARA" ] || cargo build --release
[ -f "$DATA/meta.json" ] || "$LLARA" -q data prepare --from llara-jsonl "$SHARED/datasets/lastfm" --out "$DATA"
W=runs/bench-tune
mkdir -p "$W" "$(dirname "$OUTFILE")"
results="$W/results.jsonl"
: > "$results"
have_torch=0
python3 -c "import torch, peft" 2>/dev/null && have_torch=1
[ "$have_torch" = 1 ] || echo "PyTorch + PEFT are not installed: llara alone (pip install torch transformers peft for the reference)" >&2
for th in $THREADS_LIST; do
  for r in $(seq "$REPEATS"); do
    rm -rf "$W/run"
    /usr/bin/time -f '%M' -o "$W/rss.txt" "$LLARA" -q tune --data "$DATA" --sr "$SR" --llm "$GGUF" \
      --curriculum hybrid-only --batch-size "$BATCH" --grad-accum 1 --max-train-samples $((BATCH * STEPS)) \
      --epochs 1 --valid-samples 0 --seed 42 --threads "$th" --dump-batches "$W/batches.jsonl" --out "$W/run" \
      > /dev/null
    tps=$(tune_tokens_per_second "$W/run/train_log.jsonl")
    echo "{\"impl\": \"llara\", \"threads\": $th, \"tokens_per_second\": $tps, \"peak_rss_bytes\": $(( $(tail -1 "$W/rss.txt") * 1024 ))}" >> "$results"
    if [ "$LLARA_BF16" = 1 ]; then
      rm -rf "$W/run-bf16"
      /usr/bin/time -f '%M' -o "$W/rss.txt" "$LLARA" -q tune --data "$DATA" --sr "$SR" --llm "$GGUF" \
        --curriculum hybrid-only --batch-size "$BATCH" --grad-accum 1 --max-train-samples $((BATCH * STEPS)) \
        --epochs 1 --valid-samples 0 --seed 42 --threads "$th" --dtype bf16 --out "$W/run-bf16" > /dev/null
      tps=$(tune_tokens_per_second "$W/run-bf16/train_log.jsonl")
      echo "{\"impl\": \"llara+bf16\", \"threads\": $th, \"tokens_per_second\": $tps, \"peak_rss_bytes\": $(( $(tail -1 "$W/rss.txt") * 1024 ))}" >> "$results"
    fi
    # The reference reads the recommender's weights file (a train-sr run folder holds model.safetensors).
    srw="$SR"; [ -d "$SR" ] && srw="$SR/model.safetensors"
    [ "$have_torch" = 1 ] || continue
    python3 scripts/reference/tune_step_torch.py --gguf "$GGUF" --sr "$srw" --batches "$W/batches.jsonl" \
      --threads "$th" 2>/dev/null | tail -1 >> "$results"
    if [ "$BF16" = 1 ]; then
      python3 scripts/reference/tune_step_torch.py --gguf "$GGUF" --sr "$srw" --batches "$W/batches.jsonl" \
        --threads "$th" --bf16 2>/dev/null | tail -1 >> "$results"
    fi
  done
done
python3 - "$results" "$REPEATS" "$STEPS" "$BATCH" > "$OUTFILE" <<'PY'
import json, statistics, sys, platform
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
repeats, steps, batch = sys.argv[2:5]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
torch_v = next((r["torch"] for r in rows if "torch" in r), "?")
def med(impl, th, key):
    xs = [r[key] for r in rows if r["impl"] == impl and r["threads"] == th and r.get(key) is not None]
    return statistics.median(xs) if xs else float("nan")
threads = sorted({r["threads"] for r in rows})
impls = [i for i in ["llara", "llara+bf16", "pytorch+peft", "pytorch+peft+bf16"] if any(r["impl"] == i for r in rows)]
print("# LLaRA training step: llara vs. PyTorch + PEFT on the same batches\n")
print(f"Hybrid LastFM prompts (`llara tune --curriculum hybrid-only`, batch {batch}, {steps} steps, the first left out),")
print("SmolLM2-135M-Instruct from the shared Q4_1 GGUF dequantized to f32, LoRA r 8 / alpha 32 / dropout 0.1 on all")
print("seven projections, the projector on LLaRA's SASRec embeddings, loss on the answer tokens, AdamW. The reference")
print(f"replays the batches llara dumped (`--dump-batches`). {cpu}; PyTorch {torch_v}; median of {repeats} interleaved runs.")
print("Tokens are real (unpadded) prompt + answer tokens. Produced by `scripts/bench_tune.sh`.\n")
print("`llara+bf16` is `llara tune --dtype bf16`: bf16 projection weights multiplied by the bf16 GEMM under f32")
print("activations (its kernel: the `gemm` line of `llara llm info --dtype bf16`).\n")
print("| threads | implementation | tokens/s | llara ÷ it | llara+bf16 ÷ it | peak RSS (GB) |")
print("|---:|---|---:|---:|---:|---:|")
for th in threads:
    ours = med("llara", th, "tokens_per_second")
    ours16 = med("llara+bf16", th, "tokens_per_second")
    for impl in impls:
        t = med(impl, th, "tokens_per_second")
        print(f"| {th} | {impl} | {t:.1f} | {ours / t:.2f}× | {ours16 / t:.2f}× | {med(impl, th, 'peak_rss_bytes') / 1e9:.2f} |")
if len(threads) > 1:
    lo, hi = threads[0], threads[-1]
    print("\nThread scaling (tokens/s at {} ÷ at {} threads): ".format(hi, lo) + ", ".join(
        f"{impl} {med(impl, hi, 'tokens_per_second') / med(impl, lo, 'tokens_per_second'):.2f}×" for impl in impls))
th = threads[-1]
if "pytorch+peft" in impls:
    print(f"\ntraining tokens/s ratio vs PyTorch f32: {med('llara', th, 'tokens_per_second') / med('pytorch+peft', th, 'tokens_per_second'):.2f}× ({th} threads)")
if "pytorch+peft+bf16" in impls and "llara+bf16" in impls:
    print(f"training tokens/s ratio, llara bf16 vs PyTorch bf16 autocast: {med('llara+bf16', th, 'tokens_per_second') / med('pytorch+peft+bf16', th, 'tokens_per_second'):.2f}× ({th} threads)")
if "llara+bf16" in impls:
    print(f"llara bf16 ÷ llara f32: {med('llara+bf16', th, 'tokens_per_second') / med('llara', th, 'tokens_per_second'):.2f}× ({th} threads)")
PY
cat "$OUTFILE"
