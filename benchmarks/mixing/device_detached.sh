#!/usr/bin/env bash
# The mixing benchmark as one detached sitting (device_sitting.sh) that outlives the device
# tool's 10-minute commands: the first call starts it in a process session of its own
# (setsid), so its runs go on between calls; every call copies the carried corpus archives
# (.carry/corpus*.tar.xz) into the sitting's inbox (a corpus too large for the first call's
# 64 MiB arrives with a later one and is prepared while the first runs train), waits up to
# SECONDS, prints the driver's progress and returns what the runs have written in
# $OUT/runs.tgz (no checkpoints). Runs stop only when the machine goes back, so send the next
# call at once.
# Carry the wheels and the archives with every call (the device tool's carry list
# [".whl", ".carry"]: both may be git-ignored, and what is ignored travels only when named).
#   bash benchmarks/mixing/device_detached.sh 560     # first call: starts, then waits
#   bash benchmarks/mixing/device_detached.sh 560     # later calls: wait, collect
#   bash benchmarks/mixing/device_detached.sh stop    # end it: its runs leave the GPU
# The sitting's environment (SETTINGS, WAVES, SLOTS, ...) is device_sitting.sh's, read once,
# when it starts.
set -uo pipefail
WAIT=${1:?seconds to wait, or stop}
WORK=/tmp/mixing
PIDFILE=$WORK/sitting.pid
LOG=$WORK/sitting.log
START=$SECONDS
mkdir -p "$WORK/inbox"
if [ "$WAIT" = stop ]; then
  # the sitting leads its own process session, so its group is the sitting, the driver and
  # every fit process
  [ -f "$PIDFILE" ] && kill -TERM -- "-$(cat "$PIDFILE")" 2>/dev/null
  for _ in $(seq 1 60); do
    pgrep -g "$(cat "$PIDFILE" 2>/dev/null || echo 0)" >/dev/null || exit 0
    sleep 1
  done
  kill -KILL -- "-$(cat "$PIDFILE")" 2>/dev/null
  exit 0
fi
for archive in .carry/corpus*.tar.xz; do
  [ -f "$archive" ] && [ ! -f "$WORK/inbox/$(basename "$archive")" ] \
    && cp "$archive" "$WORK/inbox/" && echo "inbox: $(basename "$archive")"
done
if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  echo "sitting $(cat "$PIDFILE") still running"
elif [ -f "$PIDFILE" ]; then
  echo "sitting $(cat "$PIDFILE") has ended"
else
  setsid nohup bash benchmarks/mixing/device_sitting.sh > "$LOG" 2>&1 < /dev/null &
  echo $! > "$PIDFILE"
  echo "started sitting $(cat "$PIDFILE")"
fi
while kill -0 "$(cat "$PIDFILE")" 2>/dev/null && [ $((SECONDS - START)) -lt "$WAIT" ]; do
  sleep 5
done
tail -8 "$LOG"
grep -c " done after " "$WORK/driver.log" 2>/dev/null | sed 's/^/runs done: /'
grep -E "FAILED|Error|cannot run" "$WORK/driver.log" 2>/dev/null | tail -5
tail -4 "$WORK/driver.log" 2>/dev/null
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
[ -n "${OUT:-}" ] && tar czf "$OUT/runs.tgz" -C "$WORK" --exclude checkpoints runs \
  $(cd "$WORK" && ls ./*.log 2>/dev/null)
exit 0
