#!/usr/bin/env bash
# Issue 14's GPU measurements in four 10-minute calls on one 4-GPU host (nvidia-h200-x4;
# every ratio is taken within one call, and each row names its GPU). Send each call as soon
# as the one before returns: the machine goes back after 30 s idle, and /tmp (the wheels,
# the 1-GPU baseline) only lives while it is warm.
#   carry: .whl (litgpt, the zarr stack, jsonargparse) and .carry/ao (torchao, float8 rows)
#   bash benchmarks/device_perf.sh one-gpu    # 4 single-GPU jobs side by side, one per GPU
#   bash benchmarks/device_perf.sh fsdp       # 1B on 4 GPUs; 7B, seq 4,096: no / op checkpointing
#   bash benchmarks/device_perf.sh 7b         # 7B: the faster mode at micro-batch 4, seq 8,192
#   bash benchmarks/device_perf.sh recheck    # after the first three: the 1-GPU rows again,
#       profiled, with the float8 loss curves; the 1B scaling row profiled, and DDP beside it
#   bash benchmarks/device_perf.sh liger-tests  # issue 29 (carry .whl from
#       benchmarks/perf_wheels.sh): tests/test_liger.py, its GPU parity tests included
#   bash benchmarks/device_perf.sh liger      # issue 29, on 2+ GPUs: litgpt and the fit path
#       with and without Liger's kernels, micro-batch 8 on GPU 0 and 16 on GPU 1
# one-gpu, each GPU a process with compiled litgpt in it: GPU 0 the fit path at micro-batch 8,
# its TSM+ATE overhead row and clipping as a separate pass, profiled; GPU 1 litgpt and the fit path at micro-batch 16
# (the same work for both); GPU 2 the float8 rows; GPU 3 the 1-GPU baseline of the scaling
# table (strategies.py single, compiled), which `fsdp` divides by, then the FSDP fit row.
# Results and logs go to $OUT.
set -uo pipefail
PHASE=${1:?one-gpu, fsdp, 7b, recheck, liger-tests or liger}
SITE=/tmp/perf-site
if [ ! -d "$SITE" ]; then
  shopt -s nullglob  # .carry/ao (torchao) only where float8 rows run
  python3 -m pip install -q --no-deps --no-compile --target "$SITE" .whl/*.whl .carry/ao/*.whl \
    2>&1 | grep -v WARNING | tail -3
  shopt -u nullglob
fi
export PYTHONPATH=$PWD:$SITE PYTHONUNBUFFERED=1
RESULTS=/tmp/perf-results
mkdir -p "$RESULTS"
FIT=(python3 benchmarks/fit_throughput.py --steps 20 --warmup 8 --domains code_c,en_legal)
STRATEGIES=(python3 benchmarks/strategies.py --compile --steps 20 --warmup 5)
collect() {  # after every run: what a call killed at its limit has written still comes back
  cp "$RESULTS"/*.jsonl "$OUT/" 2>/dev/null
  tail -c 20000 "$RESULTS"/*.log > "$OUT/logs.txt" 2>/dev/null
}
strategies_row() {  # one STRATEGY row (aquila_fsdp) on all 4 GPUs, stopped after LIMIT seconds
  timeout "${LIMIT:-200}" "${STRATEGIES[@]}" --strategy "${STRATEGY:-aquila_fsdp}" --devices 4 "$@" \
    --out "$RESULTS/strategies.jsonl" > "$RESULTS/last.log" 2>&1
  echo "rc $? for $*"; grep -A6 '^| strategy' "$RESULTS/last.log"
  grep -m3 'Error' "$RESULTS/last.log"; cat "$RESULTS/last.log" >> "$RESULTS/fsdp.log"
  pkill -f benchmarks/strategies.py; sleep 3; collect  # ranks a timeout left behind
}
wait_side_by_side() {  # for the one-GPU jobs in JOBS, collecting as they go; then their tables
  (while sleep 30; do collect; done) &
  local collector=$!
  wait "${JOBS[@]}"
  kill "$collector"
  for log in fit_b8 fit_b16 fit_float8 gpu3; do
    [ -f "$RESULTS/$log.log" ] && grep -A14 '^device:' "$RESULTS/$log.log"
  done
  grep -A6 '^| strategy' "$RESULTS/gpu3.log"
}
nvidia-smi --query-gpu=index,name,memory.used,utilization.gpu --format=csv,noheader

case $PHASE in
one-gpu)
  CUDA_VISIBLE_DEVICES=0 "${FIT[@]}" --rows litgpt,fit-cudnn,fit-cudnn-no-tsm-ate,fit-cudnn-clip-multiply \
    --profile "$RESULTS/profile" --out "$RESULTS/fit_b8.jsonl" > "$RESULTS/fit_b8.log" 2>&1 &
  JOBS=($!)
  CUDA_VISIBLE_DEVICES=1 "${FIT[@]}" --batch-size 16 --rows litgpt,fit-cudnn,fit-float8 \
    --out "$RESULTS/fit_b16.jsonl" > "$RESULTS/fit_b16.log" 2>&1 &
  JOBS+=($!)
  CUDA_VISIBLE_DEVICES=2 "${FIT[@]}" --rows litgpt,fit-float8,fit-float8-rowwise \
    --out "$RESULTS/fit_float8.jsonl" > "$RESULTS/fit_float8.log" 2>&1 &
  JOBS+=($!)
  (export CUDA_VISIBLE_DEVICES=3
   "${STRATEGIES[@]}" --strategy single --devices 1 --out "$RESULTS/strategies.jsonl"
   "${FIT[@]}" --rows litgpt,fit-best-fsdp --out "$RESULTS/fit_fsdp.jsonl") \
    > "$RESULTS/gpu3.log" 2>&1 &
  JOBS+=($!)
  wait_side_by_side
  tar czf "$OUT/profile.tgz" -C "$RESULTS" profile 2>/dev/null; collect ;;
fsdp)
  LIMIT=150 strategies_row --global-batch 32
  for mode in none op; do  # 7B, seq 4,096, micro-batch 2: the issue's row used full
    strategies_row --preset aquila2-7b --seq-len 4096 --global-batch 8 --loss-impl chunked \
      --activation-checkpointing "$mode" --loss-steps 1,5,10
  done ;;
7b)
  # the faster of the two modes that ran in `fsdp` (a mode that failed wrote no row)
  MODE=$(python3 - "$RESULTS/strategies.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
rows = [r for r in rows if r["preset"] == "aquila2-7b" and r["seq_len"] == 4096]
print(max(rows, key=lambda r: r["tokens_per_sec"])["activation_checkpointing"] if rows else "full")
PY
)
  echo "7B rows with activation checkpointing: $MODE"
  strategies_row --preset aquila2-7b --seq-len 4096 --global-batch 16 --loss-impl chunked \
    --activation-checkpointing "$MODE" --loss-steps 1,5,10
  strategies_row --preset aquila2-7b --seq-len 8192 --global-batch 4 --loss-impl chunked \
    --activation-checkpointing "$MODE" --loss-steps 1,5,10 ;;
recheck)
  CUDA_VISIBLE_DEVICES=0 "${FIT[@]}" --rows litgpt,aquila-plain,fit-cudnn,fit-cudnn-no-tsm-ate \
    --profile "$RESULTS/profile" --out "$RESULTS/fit_b8.jsonl" > "$RESULTS/fit_b8.log" 2>&1 &
  JOBS=($!)
  CUDA_VISIBLE_DEVICES=1 "${FIT[@]}" --batch-size 16 --rows litgpt,fit-cudnn,fit-float8 \
    --out "$RESULTS/fit_b16.jsonl" > "$RESULTS/fit_b16.log" 2>&1 &
  JOBS+=($!)
  CUDA_VISIBLE_DEVICES=2 "${FIT[@]}" --rows litgpt,fit-cudnn,fit-float8 \
    --out "$RESULTS/fit_float8.jsonl" > "$RESULTS/fit_float8.log" 2>&1 &
  JOBS+=($!)
  CUDA_VISIBLE_DEVICES=3 "${STRATEGIES[@]}" --strategy single --devices 1 \
    --profile "$RESULTS/profile" --out "$RESULTS/strategies.jsonl" > "$RESULTS/gpu3.log" 2>&1 &
  JOBS+=($!)
  wait_side_by_side
  LIMIT=150 strategies_row --global-batch 32 --profile "$RESULTS/profile"
  STRATEGY=ddp LIMIT=150 strategies_row --global-batch 32
  tar czf "$OUT/profile.tgz" -C "$RESULTS" profile 2>/dev/null; collect ;;
liger-tests)
  python3 -m pytest tests/test_liger.py -v 2>&1 | tail -25 | tee "$OUT/liger_tests.txt" ;;
liger)
  # the rows most wanted first: a row cut off by the limit writes nothing
  LIGER_ROWS=litgpt,fit-liger-all,fit-best,fit-liger,fit-liger-loss,fit-cudnn-liger,fit-cudnn
  CUDA_VISIBLE_DEVICES=0 timeout 560 "${FIT[@]}" --rows "$LIGER_ROWS" \
    --out "$RESULTS/fit_b8.jsonl" > "$RESULTS/fit_b8.log" 2>&1 &
  JOBS=($!)
  CUDA_VISIBLE_DEVICES=1 timeout 560 "${FIT[@]}" --batch-size 16 --rows "$LIGER_ROWS" \
    --out "$RESULTS/fit_b16.jsonl" > "$RESULTS/fit_b16.log" 2>&1 &
  JOBS+=($!)
  wait_side_by_side; collect ;;
*) echo "unknown phase $PHASE"; exit 2 ;;
esac
exit 0
