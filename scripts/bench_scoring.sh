#!/usr/bin/env bash
# Candidate scoring speed: `llara eval --mode score` with the prompt's KV cache shared by the 20 packed
# candidates vs. every candidate running the whole prompt again (--no-prompt-cache), on the first
# ROWS test rows of a tune run (default: the CPU-budget LastFM run of configs/cpu-budget.toml).
#
#   scripts/bench_scoring.sh                  # writes docs/results/scoring_speed.md
#   RUN=runs/tune/lastfm ROWS=16 scripts/bench_scoring.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LLARA="${LLARA:-target/release/llara}"
RUN="${RUN:-runs/tune/lastfm-cpu-budget}"
ROWS="${ROWS:-8}"
THREADS="${THREADS:-2}"
[ -x "$LLARA" ] || cargo build --release
[ -f "$RUN/run.json" ] || { echo "no tune run at $RUN (llara tune --config configs/cpu-budget.toml)"; exit 1; }
mkdir -p docs/results runs/bench-scoring
with=$("$LLARA" -q eval --run "$RUN" --split test --mode score --limit "$ROWS" --threads "$THREADS" --json --out runs/bench-scoring/cache)
without=$("$LLARA" -q eval --run "$RUN" --split test --mode score --limit "$ROWS" --threads "$THREADS" --json --no-prompt-cache --out runs/bench-scoring/nocache)
python3 - "$with" "$without" "$RUN" "$ROWS" "$THREADS" > docs/results/scoring_speed.md <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
run, rows, threads = sys.argv[3:6]
print("# Candidate scoring: shared prompt cache vs. none\n")
print(f"`llara eval --mode score` on the first {rows} test rows of `{run}` (20 candidates each), {threads} threads.")
print("Produced by `scripts/bench_scoring.sh`.\n")
print("| | rows/s | seconds | HR@1 | NDCG@10 |")
print("|---|---:|---:|---:|---:|")
for name, r in [("shared prompt cache", a), ("no cache (prompt per candidate)", b)]:
    print(f"| {name} | {r['rows'] / r['seconds']:.3f} | {r['seconds']:.1f} | {r['hr@1']:.3f} | {r['ndcg@10']:.3f} |")
print(f"\nSpeed-up of the cache: {b['seconds'] / a['seconds']:.1f}× (same rankings: both score the same tokens).")
PY
cat docs/results/scoring_speed.md
