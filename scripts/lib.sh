# Shared by the experiment drivers (source it): `run CMD...` echoes the command into $LOG, runs it and
# appends its wall time, so a results folder keeps the exact commands and how long each took.
run() {
  local start=$SECONDS
  echo "+ $*" | tee -a "$LOG"
  "$@"
  echo "  ($((SECONDS - start)) s)" | tee -a "$LOG"
}

# `tune_tokens_per_second RUN/train_log.jsonl`: a tune run's training throughput (real tokens over step
# time), leaving out the first step (warm-up).
tune_tokens_per_second() {
  python3 -c 'import json, sys
log = [json.loads(l) for l in open(sys.argv[1])][1:]
print("%.1f" % (sum(l["tokens"] for l in log) / sum(l["tokens"] / l["tokens_per_second"] for l in log)))' "$1"
}
