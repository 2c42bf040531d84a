# Shared by the experiment drivers (source it): `run CMD...` echoes the command into $LOG, runs it and
# appends its wall time, so a results folder keeps the exact commands and how long each took.
run() {
  local start=$SECONDS
  echo "+ $*" | tee -a "$LOG"
  "$@"
  echo "  ($((SECONDS - start)) s)" | tee -a "$LOG"
}
