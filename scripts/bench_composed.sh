#!/usr/bin/env bash
# The composed path (what a GPU or a bf16 model runs) measured on the CPU: a LLaRA training step on the
# real workload of bench_tune.sh (hybrid LastFM prompts, SmolLM2-135M in f32, LLaRA's SASRec, batch 4,
# 2 threads) with the fused CPU kernels (`--fused auto`) and without (`--fused off`), for each binary in
# BINS ("label=path ..."; e.g. a build without the frozen-weight ops to see what they save). Tokens/s
# and whole-process peak RSS, medians of REPEATS runs, to OUTFILE.
#
#   BINS="after=target/release/llara" scripts/bench_composed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
SHARED="${LLARA_SHARED:-../shared}"
BINS="${BINS:-after=target/release/llara}"
REPEATS="${REPEATS:-2}"
STEPS="${STEPS:-5}"
DATA="${DATA:-runs/data/lastfm}"
SR="${SR:-$SHARED/recmodels/lastfm-sasrec.safetensors}"
GGUF="${GGUF:-$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}"
OUTFILE="${OUTFILE:-docs/results/composed_path.md}"
first=${BINS%%=*}; first_bin=${BINS#*=}; first_bin=${first_bin%% *}
[ -f "$DATA/meta.json" ] || "$first_bin" -q data prepare --from llara-jsonl "$SHARED/datasets/lastfm" --out "$DATA"
W=runs/bench-composed
mkdir -p "$W" "$(dirname "$OUTFILE")"
results="$W/results.jsonl"
: > "$results"
for r in $(seq "$REPEATS"); do
  for spec in $BINS; do
    label=${spec%%=*}; bin=${spec#*=}
    for fused in auto off; do
      rm -rf "$W/run"
      /usr/bin/time -f '%M' -o "$W/rss.txt" "$bin" -q tune --data "$DATA" --sr "$SR" --llm "$GGUF" \
        --curriculum hybrid-only --batch-size 4 --grad-accum 1 --max-train-samples $((4 * STEPS)) --epochs 1 \
        --valid-samples 0 --seed 42 --threads 2 --fused "$fused" --out "$W/run" > /dev/null
      tps=$(tune_tokens_per_second "$W/run/train_log.jsonl")
      loss=$(python3 -c "import json; print(json.loads(open('$W/run/train_log.jsonl').readlines()[-1])['loss'])")
      echo "{\"bin\": \"$label\", \"fused\": \"$fused\", \"tokens_per_second\": $tps, \"peak_rss_bytes\": $(( $(tail -1 "$W/rss.txt") * 1024 )), \"last_loss\": $loss}" >> "$results"
    done
  done
done
python3 - "$results" "$REPEATS" "$STEPS" > "$OUTFILE" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print("# The composed path on the CPU\n")
print(f"`llara tune` on hybrid LastFM prompts, SmolLM2-135M (Q4_1 GGUF → f32), batch 4, {sys.argv[3]} steps (the first")
print(f"left out of tokens/s), 2 threads; {cpu}; median of {sys.argv[2]} runs. `--fused off` runs every op's")
print("composed version (the GPU path). Produced by `scripts/bench_composed.sh`.\n")
print("| binary | --fused | tokens/s | peak RSS (GB) | last step's loss |")
print("|---|---|---:|---:|---:|")
for b in dict.fromkeys(r["bin"] for r in rows):
    for f in ["auto", "off"]:
        xs = [r for r in rows if r["bin"] == b and r["fused"] == f]
        if xs:
            med = lambda k: statistics.median(x[k] for x in xs)
            print(f"| {b} | {f} | {med('tokens_per_second'):.1f} | {med('peak_rss_bytes') / 1e9:.2f} | {xs[0]['last_loss']:.5f} |")
PY
cat "$OUTFILE"
