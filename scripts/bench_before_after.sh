#!/usr/bin/env bash
# Two llara binaries on the same workloads, interleaved: the LLaRA training step of bench_tune.sh (hybrid
# LastFM prompts, SmolLM2-135M f32 from the shared GGUF, LLaRA's SASRec, batch 4, 2 threads) and one
# train-sr epoch per model of bench_sr.sh (LastFM, LLaRA's recipe, 1 thread). For refactors that must not
# change speed. Medians of REPEATS runs go to OUTFILE.
#
#   OLD=/tmp/llara-old NEW=target/release/llara scripts/bench_before_after.sh
#   TUNE_THREADS="1 2" SR_MODELS= OUTFILE=/tmp/t.md OLD=… scripts/bench_before_after.sh   # the tune step only
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${LLARA_SHARED:-../shared}"
OLD="${OLD:?OLD=path of the earlier llara binary}"
NEW="${NEW:-target/release/llara}"
REPEATS="${REPEATS:-3}"
STEPS="${STEPS:-6}"
TUNE_THREADS="${TUNE_THREADS:-2}"
SR_MODELS="${SR_MODELS-sasrec gru4rec caser}"
OUTFILE="${OUTFILE:-docs/results/before_after.md}"
W=runs/bench-before-after
DATA="$W/data/lastfm"
GGUF="$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
SR="$SHARED/recmodels/lastfm-sasrec.safetensors"
mkdir -p "$W" "$(dirname "$OUTFILE")"
[ -f "$DATA/meta.json" ] || "$NEW" -q data prepare --from llara-jsonl "$SHARED/datasets/lastfm" --out "$DATA" --force
results="$W/results.jsonl"
: > "$results"
for r in $(seq "$REPEATS"); do
  for impl in old new; do
    bin=$OLD; [ "$impl" = new ] && bin=$NEW
    for th in $TUNE_THREADS; do
      rm -rf "$W/run"
      "$bin" -q tune --data "$DATA" --sr "$SR" --llm "$GGUF" --curriculum hybrid-only --batch-size 4 --grad-accum 1 \
        --max-train-samples $((4 * STEPS)) --epochs 1 --valid-samples 0 --seed 42 --threads "$th" --out "$W/run" > /dev/null
      python3 - "$W/run/train_log.jsonl" "$impl" "$th" >> "$results" <<'PY'
import json, sys
steps = [json.loads(l) for l in open(sys.argv[1])][1:]  # the first step is warm-up
tok = sum(s["tokens"] for s in steps); sec = sum(s["tokens"] / s["tokens_per_second"] for s in steps)
print(json.dumps({"impl": sys.argv[2], "bench": f"tune step tokens/s ({sys.argv[3]} threads)", "value": tok / sec}))
PY
    done
    for m in $SR_MODELS; do
      drop=0.1; [ "$m" = gru4rec ] && drop=0
      "$bin" -q train-sr --data "$DATA" --model "$m" --epochs 1 --threads 1 --dropout "$drop" --ema 0 --out "$W/sr" --force > /dev/null
      python3 -c "
import json; e=json.loads(open('$W/sr/train_log.jsonl').readline())
print(json.dumps({'impl':'$impl','bench':'train-sr $m examples/s (1 thread)','value':e['examples_per_second']}))" >> "$results"
    done
  done
done
python3 - "$results" "$REPEATS" > "$OUTFILE" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print("# Before / after: the same workloads on two llara binaries\n")
print(f"{cpu}; median of {sys.argv[2]} interleaved runs each; produced by `scripts/bench_before_after.sh`.\n")
print("| workload | before | after | after ÷ before | runs before | runs after |")
print("|---|---:|---:|---:|---|---|")
for b in dict.fromkeys(r["bench"] for r in rows):
    o = [r["value"] for r in rows if r["bench"] == b and r["impl"] == "old"]
    n = [r["value"] for r in rows if r["bench"] == b and r["impl"] == "new"]
    mo, mn = statistics.median(o), statistics.median(n)
    print(f"| {b} | {mo:.1f} | {mn:.1f} | {mn / mo:.3f} | {', '.join(f'{x:.0f}' for x in o)} | {', '.join(f'{x:.0f}' for x in n)} |")
PY
cat "$OUTFILE"
