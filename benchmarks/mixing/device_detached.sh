#!/usr/bin/env bash
# The mixing benchmark as one detached sitting that outlives the 10-minute commands: the first
# call starts device_sitting.sh in a process session of its own (setsid), so its runs go on
# between calls without being stopped and resumed; every call (the first included) then waits
# up to SECONDS for it and returns what the runs have written so far in $OUT/runs.tgz
# (no checkpoints). Runs stop only when the machine goes back, so send the next call at once.
#   POLICIES="doremi bandit" SEEDS="1 2" REFERENCE_SEED=1 GPUS="0 1 2 3" LIMIT=1500 \
#       bash benchmarks/mixing/device_detached.sh 560      # first call: starts, then waits
#   bash benchmarks/mixing/device_detached.sh 560          # later calls: wait, collect
# The environment (POLICIES, SEEDS, LIMIT, ...) is device_sitting.sh's; LIMIT is now the whole
# detached sitting's, across calls.
set -uo pipefail
WAIT=${1:?seconds to wait}
PIDFILE=/tmp/mixing-sitting.pid
LOG=/tmp/mixing-sitting.log
START=$SECONDS
if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  echo "sitting $(cat "$PIDFILE") still running"
elif [ -f "$PIDFILE" ]; then
  echo "sitting $(cat "$PIDFILE") has ended"
else
  mkdir -p /tmp/mixing-out
  OUT=/tmp/mixing-out setsid nohup bash benchmarks/mixing/device_sitting.sh \
    > "$LOG" 2>&1 < /dev/null &
  echo $! > "$PIDFILE"
  echo "started sitting $(cat "$PIDFILE")"
fi
while kill -0 "$(cat "$PIDFILE")" 2>/dev/null && [ $((SECONDS - START)) -lt "$WAIT" ]; do
  sleep 5
done
tail -30 "$LOG"
for run in /tmp/mixing-runs/*/; do  # where each run is: the last step its metrics reached
  [ -f "$run/tsm/metrics.jsonl" ] && echo "$(basename "$run"): $(tail -c 300 "$run/tsm/metrics.jsonl" \
    | grep -o '"step": *[0-9]*' | tail -1)$([ -f "$run/done.json" ] && echo ' done')"
done
tar czf "$OUT/runs.tgz" -C /tmp/mixing-runs --exclude checkpoints .
