#!/usr/bin/env bash
# The long soak of issue 31: one `llara tune` run (tiny model, synthetic data, 300 steps, gradients clipped at
# most steps, a validation after each epoch) cut by SIGINT at CUTS different points and resumed each time must
# end with the same bytes as the same run left alone: every file of the run folder (tune.toml with its --out
# replaced) and every field of train_log.jsonl but the wall-clock tokens_per_second. A third, uninterrupted
# process must match too. Writes docs/results/soak_resume.md (the cuts, the steps they landed on, whether each
# was a clipped step, and the comparison). The fast case of this is the test
# `sigint_at_clipped_steps_and_resume_give_the_uninterrupted_bytes`.
#
#   scripts/soak_resume.sh                 # 12 cuts, ~5 min on 2 cores
#   CUTS=20 THREADS=2 scripts/soak_resume.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LLARA="${LLARA:-target/release/llara}"
CUTS="${CUTS:-12}"
THREADS="${THREADS:-1}"
CLIP="${CLIP:-2.8}"
OUTFILE="${OUTFILE:-docs/results/soak_resume.md}"
W=runs/soak
[ -x "$LLARA" ] || cargo build --release
rm -rf "$W" && mkdir -p "$W"
"$LLARA" -q data synth --users 60 --items 40 --candidates 5 --out "$W/data" --force > /dev/null
"$LLARA" -q train-sr --data "$W/data" --epochs 2 --hidden 16 --out "$W/sr" --force > /dev/null
args=(tune --data "$W/data" --sr "$W/sr" --llm builtin:tiny --epochs 30 --batch-size 1 --grad-accum 1 --lr 5e-3
  --max-steps 300 --valid-samples 2 --max-new-tokens 4 --seed 11 --quiet --threads "$THREADS"
  --max-grad-norm "$CLIP" --checkpoint-minutes 0)
steps() { [ -f "$1/train_log.jsonl" ] && wc -l < "$1/train_log.jsonl" || echo 0; }
ckpt() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["step"])' "$1/checkpoint/state.json"; }

"$LLARA" "${args[@]}" --out "$W/straight" > /dev/null 2>&1
"$LLARA" "${args[@]}" --out "$W/again" > /dev/null 2>&1
# Cut points spread over the run: after roughly 300·i/(CUTS+1) logged steps.
cuts=()
for i in $(seq 1 "$CUTS"); do
  target=$(( 300 * i / (CUTS + 1) ))
  if [ "$i" = 1 ]; then
    "$LLARA" "${args[@]}" --out "$W/cut" > /dev/null 2> "$W/cut-$i.err" &
  else
    "$LLARA" tune --resume "$W/cut" --quiet > /dev/null 2> "$W/cut-$i.err" &
  fi
  pid=$!
  while [ "$(steps "$W/cut")" -lt "$target" ] && kill -0 "$pid" 2> /dev/null; do sleep 0.02; done
  kill -INT "$pid" 2> /dev/null || true
  rc=0; wait "$pid" || rc=$?
  [ "$rc" = 130 ] || { echo "cut $i: exit status $rc, expected 130"; cat "$W/cut-$i.err"; exit 1; }
  cuts+=("$target:$(ckpt "$W/cut")")
done
"$LLARA" tune --resume "$W/cut" --quiet > /dev/null 2>&1

python3 - "$W" "$CLIP" "$THREADS" "$OUTFILE" "${cuts[@]}" <<'PY'
import json, os, sys
w, clip, threads, outfile, cuts = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
def tree(d):
    out = []
    for root, _, files in os.walk(d):
        out += [os.path.relpath(os.path.join(root, f), d) for f in files]
    return sorted(out)
def log(d):
    rows = [json.loads(l) for l in open(os.path.join(d, "train_log.jsonl"))]
    for r in rows:
        r.pop("tokens_per_second")
    return rows
def same(a, b):
    da, db = os.path.join(w, a), os.path.join(w, b)
    if tree(da) != tree(db):
        return f"file lists differ: {sorted(set(tree(da)) ^ set(tree(db)))}"
    for f in tree(da):
        x, y = open(os.path.join(da, f), "rb").read(), open(os.path.join(db, f), "rb").read()
        if f == "tune.toml":
            x, y = x.replace(da.encode(), b"RUN"), y.replace(db.encode(), b"RUN")
        if f == "train_log.jsonl":
            if log(da) != log(db):
                return "train_log.jsonl differs"
        elif x != y:
            return f"{f} differs"
    return f"identical ({len(tree(da))} files)"
straight = log(os.path.join(w, "straight"))
clipped = {r["step"] for r in straight if r["grad_norm"] > clip}
cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
lines = [
    "# Soak: one tune run cut by SIGINT and resumed, against the same run left alone",
    "",
    f"{cpu}, {threads} thread(s). `scripts/soak_resume.sh`: tiny model, synthetic data (60 users, 40 items),",
    f"300 optimizer steps of one row, `--max-grad-norm {clip}` (the gradient was clipped at {len(clipped)} of 300",
    "steps), a validation after each of the two epochs; the cut run was stopped by SIGINT after the log had",
    "reached each target below and resumed with `llara tune --resume`.",
    "",
    "| cut | SIGINT after logged step | checkpoint (resumed from) step | that step's gradient clipped |",
    "|---:|---:|---:|---|",
]
for i, c in enumerate(cuts, 1):
    target, at = map(int, c.split(":"))
    lines.append(f"| {i} | {target} | {at} | {'yes' if at - 1 in clipped else 'no'} |")
lines += [
    "",
    f"- cut and resumed {len(cuts)} times vs uninterrupted: **{same('straight', 'cut')}**",
    f"- a second uninterrupted process vs the first: **{same('straight', 'again')}**",
    "",
    "Every file of the run folder compared byte for byte (adapter, projector, optimizer state, checkpoint,",
    "`checkpoint.prev/`, `best/`, metrics, checksums; `tune.toml` with its `--out` path replaced) and every",
    "field of every `train_log.jsonl` line but the wall-clock `tokens_per_second`.",
]
open(outfile, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
bad = "identical" not in same("straight", "cut") or "identical" not in same("straight", "again")
sys.exit(1 if bad else 0)
PY
