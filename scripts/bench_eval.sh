#!/usr/bin/env bash
# Evaluation speed on LastFM's test split with SmolLM2-135M: llara's generation-based evaluation vs.
# Hugging Face transformers `generate` on the same weights, adapter and prompts
# (scripts/reference/generate_hf.py), llara's score-based evaluation (shared prompt cache, packed
# candidates), and the prompts alone (generation stopped after one token: the ceiling of any evaluation
# that reads each prompt once), run interleaved REPEATS times; medians go to docs/results/eval_speed.md.
#
#   scripts/bench_eval.sh                         # the pipeline's LastFM text-only run, 32 rows, 3 repeats
#   RUN=runs/tune/x ROWS=64 REPEATS=5 scripts/bench_eval.sh
#   LLARA_BF16=0 scripts/bench_eval.sh           # without the `--dtype bf16` rows (bf16 weights, bf16 GEMM)
#
# Text-only runs are used because their prompts are plain text that transformers can take as they are.
# Needs: pip install torch transformers peft gguf.
set -euo pipefail
cd "$(dirname "$0")/.."
LLARA="${LLARA:-target/release/llara}"
RUN="${RUN:-runs/pipeline/lastfm/llara-text-only}"
ROWS="${ROWS:-32}"
REPEATS="${REPEATS:-3}"
THREADS="${THREADS:-2}"
BATCH="${BATCH:-8}"
MAX_NEW="${MAX_NEW:-32}"
LLARA_BF16="${LLARA_BF16:-1}"
OUTFILE="${OUTFILE:-docs/results/eval_speed.md}"
[ -x "$LLARA" ] || cargo build --release
[ -f "$RUN/run.json" ] || { echo "no tune run at $RUN (scripts/pipeline.sh lastfm makes one)"; exit 1; }
GGUF=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["llm_source"]["path"])' "$RUN/run.json")
case "$GGUF" in *.gguf) ;; *) echo "$RUN was tuned on $GGUF; this benchmark loads a GGUF"; exit 1 ;; esac
W=runs/bench-eval
mkdir -p "$W" "$(dirname "$OUTFILE")"
: > "$W/results.jsonl"
for i in $(seq "$REPEATS"); do
  g=$("$LLARA" -q eval --run "$RUN" --split test --limit "$ROWS" --batch-size "$BATCH" --max-new-tokens "$MAX_NEW" \
    --threads "$THREADS" --json --out "$W/gen")
  echo "{\"who\":\"llara generate\",\"r\":$g}" >> "$W/results.jsonl"
  h=$(python3 scripts/reference/generate_hf.py --gguf "$GGUF" --adapter "$RUN/adapter" \
    --predictions "$W/gen/predictions.jsonl" --limit "$ROWS" --batch "$BATCH" --max-new-tokens "$MAX_NEW" \
    --threads "$THREADS" 2>/dev/null | tail -1)
  echo "{\"who\":\"transformers generate\",\"r\":$h}" >> "$W/results.jsonl"
  s=$("$LLARA" -q eval --run "$RUN" --split test --mode score --limit "$ROWS" --batch-size "$BATCH" --threads "$THREADS" --json \
    --out "$W/score")
  echo "{\"who\":\"llara score\",\"r\":$s}" >> "$W/results.jsonl"
  p=$("$LLARA" -q eval --run "$RUN" --split test --limit "$ROWS" --batch-size "$BATCH" --max-new-tokens 1 \
    --threads "$THREADS" --json --out "$W/prefill")
  echo "{\"who\":\"llara prompts only\",\"r\":$p}" >> "$W/results.jsonl"
  if [ "$LLARA_BF16" = 1 ]; then
    g=$("$LLARA" -q eval --run "$RUN" --split test --limit "$ROWS" --batch-size "$BATCH" --max-new-tokens "$MAX_NEW" \
      --threads "$THREADS" --dtype bf16 --json --out "$W/gen-bf16")
    echo "{\"who\":\"llara generate bf16\",\"r\":$g}" >> "$W/results.jsonl"
    s=$("$LLARA" -q eval --run "$RUN" --split test --mode score --limit "$ROWS" --batch-size "$BATCH" --threads "$THREADS" \
      --dtype bf16 --json --out "$W/score-bf16")
    echo "{\"who\":\"llara score bf16\",\"r\":$s}" >> "$W/results.jsonl"
  fi
done
python3 - "$W/results.jsonl" "$RUN" "$ROWS" "$THREADS" "$BATCH" "$MAX_NEW" "$GGUF" "$REPEATS" > "$OUTFILE" <<'PY'
import json, statistics, sys
path, run, rows, threads, batch, max_new, gguf, repeats = sys.argv[1:9]
by = {}
for line in open(path):
    d = json.loads(line)
    by.setdefault(d["who"], []).append(d["r"])
med = {k: statistics.median(v["rows"] / v["seconds"] for v in vs) for k, vs in by.items()}
print("# Evaluation speed: llara vs. transformers `generate`\n")
print(f"The first {rows} test rows of `{run}` ({gguf}, its LoRA adapter merged")
print(f"into the weights in both), {threads} threads, batches of {batch}, greedy, at most {max_new} new tokens, stop at a newline;")
print(f"median of {repeats} interleaved runs. Produced by `scripts/bench_eval.sh`.\n")
print("| evaluation | rows/s (median) | runs (rows/s) | note |")
print("|---|---:|---|---|")
for k, vs in by.items():
    runs = ", ".join(f"{v['rows'] / v['seconds']:.3f}" for v in vs)
    note = ""
    if k == "transformers generate":
        note = f"answers identical to llara's: {vs[-1]['same_answers']}/{vs[-1]['rows']}"
    elif k.startswith("llara generate"):
        note = f"ValidRatio {vs[-1]['valid_ratio']:.3f}, HR@1 {vs[-1]['hr@1']:.3f}"
    elif k == "llara prompts only":
        note = "generation with --max-new-tokens 1: each prompt's prefill and one token"
    else:
        note = f"HR@1 {vs[-1]['hr@1']:.3f}, HR@5 {vs[-1]['hr@5']:.3f}, NDCG@10 {vs[-1]['ndcg@10']:.3f}"
    print(f"| {k} | {med[k]:.3f} | {runs} | {note} |")
g, h, s = med["llara generate"], med["transformers generate"], med["llara score"]
print(f"\nllara generation vs. transformers generate: **{g / h:.2f}×**; score-based vs. llara generation-based")
print(f"evaluation: **{s / g:.2f}×** (20 candidates ranked per row vs. one greedy answer). Reading the prompts")
print(f"alone runs at {med['llara prompts only'] / g:.2f}× generation: the most any evaluation that reads each prompt once can reach here.")
if "llara generate bf16" in med:
    print(f"\n`--dtype bf16` (bf16 projection weights, the bf16 GEMM) against f32: generation **{med['llara generate bf16'] / g:.2f}×**,")
    print(f"scoring **{med['llara score bf16'] / s:.2f}×** (rows/s).")
PY
cat "$OUTFILE"
