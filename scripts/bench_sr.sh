#!/usr/bin/env bash
# Training speed of llara's recommenders vs. the PyTorch reference (scripts/reference/sr_torch.py:
# the same models, loss, optimiser and batch size), interleaved on the same machine, one epoch of
# LastFM's train split each, median of REPEATS runs. PyTorch runs LLaRA's recipe (dropout 0.1, raw
# weights), so llara runs it too (`--dropout 0.1 --ema 0`); llara's default recipe (dropout 0.6, the
# weight average) is timed beside it. Without PyTorch (`pip install torch`) its columns are left empty.
#
#   scripts/bench_sr.sh                 # writes docs/results/sr_speed.md
#   REPEATS=3 DATASET=lastfm MODELS="sasrec gru4rec caser" scripts/bench_sr.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${LLARA_SHARED:-../shared}"
LLARA="${LLARA:-target/release/llara}"
REPEATS="${REPEATS:-3}"
DATASET="${DATASET:-lastfm}"
MODELS="${MODELS:-sasrec gru4rec caser}"
OUT=runs/bench-sr
[ -x "$LLARA" ] || cargo build --release
mkdir -p "$OUT" docs/results
DATA="$OUT/data/$DATASET"
[ -f "$DATA/meta.json" ] || "$LLARA" -q data prepare --from llara-jsonl "$SHARED/datasets/$DATASET" --out "$DATA" --force
results="$OUT/results.jsonl"
: > "$results"
have_torch=0
python3 -c "import torch" 2>/dev/null && have_torch=1
llara_epoch() { # impl model threads repeat flags...
  local impl=$1 m=$2 t=$3 r=$4; shift 4
  "$LLARA" -q train-sr --data "$DATA" --model "$m" --epochs 1 --threads "$t" "$@" --out "$OUT/run" --force > /dev/null
  python3 -c "
import json; e=json.loads(open('$OUT/run/train_log.jsonl').readline())
print(json.dumps({'impl':'$impl','model':'$m','threads':$t,'repeat':$r,'examples_per_second':e['examples_per_second'],'seconds':e['seconds']}))" >> "$results"
}
for r in $(seq 1 "$REPEATS"); do
  for m in $MODELS; do
    for t in 1 2; do
      if [ "$have_torch" = 1 ]; then
        python3 scripts/reference/sr_torch.py --data "$DATA" --model "$m" --threads "$t" --epochs 1 \
          | python3 -c "import json,sys; d=json.load(sys.stdin); d['repeat']=$r; print(json.dumps(d))" >> "$results"
      fi
      # PyTorch's GRU4Rec (LLaRA's) has no dropout.
      drop=0.1; [ "$m" = gru4rec ] && drop=0
      llara_epoch llara "$m" "$t" "$r" --dropout "$drop" --ema 0
    done
    llara_epoch llara-default "$m" 1 "$r"
  done
done
python3 - "$results" "$DATASET" "$REPEATS" > docs/results/sr_speed.md <<'PY'
import json, statistics, sys, platform, os
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(impl, m, t):
    xs = [r["examples_per_second"] for r in rows if r["impl"] == impl and r["model"] == m and r["threads"] == t]
    return statistics.median(xs) if xs else float("nan")
torch_v = next((r["torch"] for r in rows if r["impl"] == "pytorch"), "?")
print(f"# Recommender training speed: llara vs. PyTorch\n")
print(f"One epoch of {sys.argv[2]}'s train split (batch 256, hidden 64, BCE with one negative, Adam), "
      f"median of {sys.argv[3]} interleaved runs, examples per second; PyTorch {torch_v} on {os.cpu_count()} cores. "
      "Command: `scripts/bench_sr.sh`.\n")
print("| model | PyTorch 1 thr | PyTorch 2 thr | llara 1 thr | llara 2 thr | best llara / best PyTorch | llara default recipe (dropout 0.6, EMA), 1 thr |")
print("|---|---|---|---|---|---|---|")
f = lambda x: "-" if x != x else f"{x:.0f}"
for m in dict.fromkeys(r["model"] for r in rows):
    p1, p2, l1, l2 = med("pytorch", m, 1), med("pytorch", m, 2), med("llara", m, 1), med("llara", m, 2)
    ratio = max(l1, l2) / max(p1, p2) if p1 == p1 else float("nan")
    print(f"| {m} | {f(p1)} | {f(p2)} | {f(l1)} | {f(l2)} | {'-' if ratio != ratio else f'{ratio:.2f}×'} | {f(med('llara-default', m, 1))} |")
PY
cat docs/results/sr_speed.md
