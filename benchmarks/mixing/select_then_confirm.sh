#!/usr/bin/env bash
# Selection, then confirmation, without a person between them (issue 11's protocol: policy
# settings are chosen on seeds named beforehand and confirmed on fresh ones). Waits up to
# SECONDS for the running detached sitting (device_detached.sh); once it has ended, picks the
# candidate with the lowest mean final domain average over the selection seeds
# (`mixing.py select`) and starts a new detached sitting of that policy and the baselines on
# the confirmation seeds, then waits for it for the rest of SECONDS. Later calls are plain
# `device_detached.sh SECONDS`. A failed selection (a candidate's run unfinished) starts
# nothing and says why.
#   CANDIDATES="doremi doremi-natural-ref" SELECT_SEEDS="1 2" BASELINES="natural" \
#   CONFIRM_SEEDS="3 4" REFERENCE_SEED=1 GPUS="0 1 2 3" LIMIT=1300 \
#       bash benchmarks/mixing/select_then_confirm.sh 560
set -uo pipefail
WAIT=${1:?seconds to wait}
START=$SECONDS
PIDFILE=/tmp/mixing-sitting.pid
MARK=/tmp/mixing-confirmation.started
POLICIES= bash benchmarks/mixing/device_detached.sh "$WAIT"  # wait for the selection sitting
if [ -f "$MARK" ] || kill -0 "$(cat "$PIDFILE" 2>/dev/null || echo 0)" 2>/dev/null; then
  exit 0  # the confirmation sitting runs already, or the selection one has not ended
fi
# shellcheck disable=SC2086
CHOSEN=$(PYTHONPATH=$PWD python3 benchmarks/mixing.py select --out /tmp/mixing-runs \
  --policies $CANDIDATES --seeds $SELECT_SEEDS) || exit 1
echo "selected $CHOSEN on seeds $SELECT_SEEDS; confirming with ${BASELINES:-} on $CONFIRM_SEEDS"
echo "$CHOSEN" > "$MARK"
POLICIES="$CHOSEN ${BASELINES:-}" SEEDS="$CONFIRM_SEEDS" \
  bash benchmarks/mixing/device_detached.sh $((WAIT - (SECONDS - START)))
