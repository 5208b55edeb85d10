#!/usr/bin/env bash
# The mixing benchmark as one detached sitting that outlives the 10-minute commands: the first
# call starts device_sitting.sh in a process session of its own (setsid), so its runs go on
# between calls without being stopped and resumed; every call (the first included) then waits
# up to SECONDS for it and returns what the runs have written so far in $OUT/runs.tgz
# (no checkpoints). Runs stop only when the machine goes back, so send the next call at once.
#   POLICIES="doremi bandit" SEEDS="1 2" REFERENCE_SEED=1 GPUS="0 1 2 3" LIMIT=1500 \
#       bash benchmarks/mixing/device_detached.sh 560      # first call: starts, then waits
#   bash benchmarks/mixing/device_detached.sh 560          # later calls: wait, collect
#   POLICIES=... SEEDS=... bash benchmarks/mixing/device_detached.sh 560
#                     # once the sitting has ended: a new one, with the runs already done kept
#   bash benchmarks/mixing/device_detached.sh stop         # end it: its runs leave the GPUs
# The environment (POLICIES, SEEDS, LIMIT, ...) is device_sitting.sh's; LIMIT is now the whole
# detached sitting's, across calls. Send each call as the very next thing after the last one
# returns (the files of every call stay under its files_at to be copied later): a machine
# idle for 30 s goes back, and once one did, after a single file copy in between.
set -uo pipefail
WAIT=${1:?seconds to wait, or stop}
PIDFILE=/tmp/mixing-sitting.pid
LOG=/tmp/mixing-sitting.log
START=$SECONDS
if [ "$WAIT" = stop ]; then
  # the sitting leads its own process session, so its group is the sitting, the driver and
  # every fit process; `pkill -f` on a pattern also matches the shell running this command
  [ -f "$PIDFILE" ] && kill -TERM -- "-$(cat "$PIDFILE")" 2>/dev/null
  for _ in $(seq 1 60); do
    pgrep -g "$(cat "$PIDFILE" 2>/dev/null || echo 0)" >/dev/null || exit 0
    sleep 1
  done
  kill -KILL -- "-$(cat "$PIDFILE")" 2>/dev/null
  exit 0
fi
if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  echo "sitting $(cat "$PIDFILE") still running"
elif [ -f "$PIDFILE" ] && [ -z "${POLICIES:-}" ]; then
  echo "sitting $(cat "$PIDFILE") has ended"
else  # no sitting yet, or the last has ended and this call names the runs of a new one
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
