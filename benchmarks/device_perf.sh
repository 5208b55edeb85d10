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
# Issue 29 on ONE GPU (nvidia-h100-x1; the 4-GPU phases above need a host that is not lent
# now). Build the carry here with `FLASH=1 bash benchmarks/perf_wheels.sh`; every call waits
# for nothing, so send the next one as soon as one returns (/tmp lives while the machine is
# warm). Each phase keeps the peer in its own call, and ends inside 10 minutes.
#   bash benchmarks/device_perf.sh detached SECONDS   # issue 29's one-GPU rows still wanted as
#       one sitting (the `sitting` phase) in a process session of its own, so it goes on between
#       calls: the first call starts it; every call stages the flash parts it carries (if any),
#       waits up to SECONDS and returns what has been written. The sitting now needs no flash:
#       carry [".whl", ".carry/ao"] in the first call, and send each call as soon as one returns.
#   The phases below are the same work in single calls (the functions rows_*):
#   bash benchmarks/device_perf.sh speed    # carry .whl .carry/flash1: micro-batch 8, litgpt
#       and fit-best, profiled, with memory per phase and snapshots
#   bash benchmarks/device_perf.sh speed16  # carry .carry/flash2 .carry/ao: micro-batch 16,
#       litgpt, fit-best and fit-cudnn; then
#       flash-attn-4 (installed once both parts came): its GPU equality test, and
#       litgpt and fit-best-flash at micro-batch 8
#   bash benchmarks/device_perf.sh long     # seq 8,192 / 16,384 / 32,768: litgpt and fit-best
#   bash benchmarks/device_perf.sh 7b-1gpu  # aquila2-7b, adamw8bit, full checkpointing
#       (it held an H100 at 71.3 GiB on 2026-12-07; issue 29 also wants it on an H200)
# one-gpu, each GPU a process with compiled litgpt in it: GPU 0 the fit path at micro-batch 8,
# its TSM+ATE overhead row and clipping as a separate pass, profiled; GPU 1 litgpt and the fit path at micro-batch 16
# (the same work for both); GPU 2 the float8 rows; GPU 3 the 1-GPU baseline of the scaling
# table (strategies.py single, compiled), which `fsdp` divides by, then the FSDP fit row.
# Results and logs go to $OUT.
set -uo pipefail
PHASE=${1:?detached, sitting, speed, speed16, long, 7b-1gpu (one GPU); one-gpu, fsdp, 7b, recheck}
SITE=/tmp/perf-site
if [ ! -d "$SITE" ]; then
  python3 -m pip install -q --no-deps --no-compile --target "$SITE" .whl/*.whl \
    $(ls .carry/ao/*.whl 2>/dev/null) 2>&1 | grep -v WARNING | tail -3
elif [ ! -d "$SITE/torchao" ] && ls .carry/ao/*.whl >/dev/null 2>&1; then  # a later call's
  python3 -m pip install -q --no-deps --no-compile --target "$SITE" .carry/ao/*.whl 2>&1 \
    | grep -v WARNING | tail -3
fi
export PYTHONPATH=$PWD:$SITE PYTHONUNBUFFERED=1
stage_flash() {  # .carry/flash*/ (perf_wheels.sh FLASH=1) gather here; once whole, one install
  local inbox=/tmp/flash-in first base n k
  [ -d /tmp/flash-site ] && return 0
  ls .carry/flash*/* >/dev/null 2>&1 || return 0
  mkdir -p "$inbox" && cp -n .carry/flash*/* "$inbox/"
  for first in "$inbox"/*.part-1-of-*; do
    [ -f "$first" ] || continue
    n=${first##*-of-}; base=${first%.part-1-of-*}
    for k in $(seq 1 "$n"); do
      [ -f "$base.part-$k-of-$n" ] || { echo "flash-attn-4: part $k of $n not here yet"; return 0; }
    done
    for k in $(seq 1 "$n"); do cat "$base.part-$k-of-$n"; done > "$base" && rm "$base".part-*
  done
  # one install for the wheels (installed apart, the CuTe DSL packages do not import), then
  # the CUDA 13 library wheel's unpacked tree (carried as tar.xz) over it
  python3 -m pip install -q --no-deps --no-compile --target /tmp/flash-site.new "$inbox"/*.whl \
    2>&1 | grep -v WARNING | tail -3
  for packed in "$inbox"/*.tar.xz; do tar xJf "$packed" -C /tmp/flash-site.new; done
  mv /tmp/flash-site.new /tmp/flash-site
  echo "flash-attn-4 installed: $(ls /tmp/flash-site | grep -c -i -E 'flash|cutlass') entries"
}
use_flash() {  # flash-attn-4 importable once installed (a sitting started before it came)
  [ -d /tmp/flash-site ] || return 1
  case ":$PYTHONPATH:" in *:/tmp/flash-site:*) return 0 ;; esac
  export PYTHONPATH=$PYTHONPATH:/tmp/flash-site:/tmp/flash-site/nvidia_cutlass_dsl/dsl_packages
}
stage_flash
use_flash
RESULTS=/tmp/perf-results
mkdir -p "$RESULTS"
FIT=(python3 benchmarks/fit_throughput.py --steps 20 --warmup 8 --domains code_c,en_legal)
STRATEGIES=(python3 benchmarks/strategies.py --compile --steps 20 --warmup 5)
collect() {  # after every run: what a call killed at its limit has written still comes back.
  # Few files: the device tool returns at most 8, so every rows file goes into one
  cat "$RESULTS"/*.jsonl > "$OUT/rows.jsonl" 2>/dev/null
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
# Issue 29's one-GPU work, one function per piece; the phases below run one each, the sitting
# all of them in order. Each writes its rows to $RESULTS as they end.
rows_b8() {  # micro-batch 8: the peer and the fit path, profiled, memory per phase
  timeout 420 "${FIT[@]}" --rows litgpt,fit-best \
    --profile "$RESULTS/profile" --memory-steps 1 --memory "$RESULTS/memory" \
    --out "$RESULTS/fit_b8.jsonl" > "$RESULTS/fit_b8.log" 2>&1
}
rows_b16() {  # fit-cudnn: the 1-GPU config's standard loss, against fit-best's chunked one
  timeout 480 "${FIT[@]}" --batch-size 16 --rows litgpt,fit-best,fit-cudnn \
    --out "$RESULTS/fit_b16.jsonl" > "$RESULTS/fit_b16.log" 2>&1
}
rows_flash() {  # its own litgpt row beside it; needs both flash parts staged
  use_flash || { echo "flash-attn-4 not installed: its rows skipped"; return 0; }
  timeout 120 python3 -m pytest tests -q -m gpu -k flash 2>&1 | tail -5 > "$RESULTS/flash_tests.log"
  timeout 300 "${FIT[@]}" --rows litgpt,fit-best-flash \
    --out "$RESULTS/fit_flash.jsonl" > "$RESULTS/fit_flash.log" 2>&1
}
rows_long() {  # 16,384 tokens per step (32,768 at the longest); checkpointing where memory needs it
  local shape seq batch mode
  for shape in "8192 2 none" "16384 1 op" "32768 1 full"; do
    read -r seq batch mode <<< "$shape"
    timeout 200 "${FIT[@]}" --rows litgpt,fit-best --seq-len "$seq" --batch-size "$batch" \
      --steps 10 --warmup 5 --activation-checkpointing "$mode" \
      --out "$RESULTS/fit_long.jsonl" > "$RESULTS/long_$seq.log" 2>&1
  done
}
rows_7b() {  # peak 71.3 GiB on an H100 (2026-12-07); every row profiled: the fit row idled
  # 21% in torchao's per-parameter optimizer steps after the clip's launches (litgpt does not
  # clip; its profile was not taken): fit-best-no-clip says what the clip costs there
  timeout 780 "${FIT[@]}" --preset aquila2-7b --rows fit-best,fit-best-no-clip,litgpt --seq-len 4096 \
    --batch-size 1 --steps 5 --warmup 3 --optimizer adamw8bit --activation-checkpointing full \
    --memory-steps 1 --memory "$RESULTS/memory_7b" --profile "$RESULTS/profile_7b" \
    --out "$RESULTS/fit_7b.jsonl" > "$RESULTS/fit_7b.log" 2>&1
}
rows_7b_h200() {  # on an H200 only (141 GB): the 7B without activation checkpointing (what
  # the memory buys), per-op checkpointing if that runs out of memory; unprofiled
  nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 || return 0
  local mode
  for mode in none op; do
    timeout 540 "${FIT[@]}" --preset aquila2-7b --rows fit-best,litgpt --seq-len 4096 \
      --batch-size 1 --steps 5 --warmup 3 --optimizer adamw8bit --activation-checkpointing "$mode" \
      --memory-steps 1 --memory "$RESULTS/memory_7b_$mode" \
      --out "$RESULTS/fit_7b_h200.jsonl" > "$RESULTS/fit_7b_h200_$mode.log" 2>&1
    grep -q "OutOfMemory\|out of memory" "$RESULTS/fit_7b_h200_$mode.log" || break
  done
}
rows_optimizer() {  # the 8-bit AdamW step alone at 7B shapes: torchao's against ours
  # (compiled once), our layout and litgpt's; host and wall time; then its GPU test
  timeout 120 python3 -m pytest tests -q -m gpu -k adamw8bit 2>&1 | tail -5 \
    > "$RESULTS/adamw8bit_tests.log"
  timeout 420 python3 benchmarks/optimizer_host.py --preset aquila2-7b --steps 5 --warmup 2 \
    --out "$RESULTS/optimizer_host.jsonl" > "$RESULTS/optimizer_host.log" 2>&1
}
pack_profiles() {  # the traces of the profiled rows (1B and 7B) as one file
  tar czf "$OUT/profile.tgz" -C "$RESULTS" $(cd "$RESULTS" && ls -d profile profile_7b \
    2>/dev/null) 2>/dev/null
}
summary() {  # the tables and errors of the logs named
  local log
  for log in "$@"; do
    [ -f "$RESULTS/$log" ] || continue
    echo "== $log"; grep -E '^\| |^device:|rror|passed|failed|skipped' "$RESULTS/$log" | tail -24
  done
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
  pack_profiles; collect ;;
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
  pack_profiles; collect ;;
speed)
  rows_b8; summary fit_b8.log; tar czf "$OUT/memory.tgz" -C "$RESULTS" memory 2>/dev/null
  pack_profiles; collect ;;
speed16)
  rows_b16; rows_flash; summary fit_b16.log flash_tests.log fit_flash.log; collect ;;
long)
  rows_long; summary long_8192.log long_16384.log long_32768.log; collect ;;
7b-1gpu)
  rows_7b; rows_optimizer; summary fit_7b.log adamw8bit_tests.log optimizer_host.log
  pack_profiles; collect ;;
sitting)  # issue 29's rows still wanted (micro-batch 16, flash and the long rows were measured
  # on 2026-12-07: phases speed16 and long): the 7B with and without clipping beside litgpt,
  # all profiled, the clip reusing the monitor's norm, AdamW8bit compiled once; the 8-bit
  # step alone, torchao's and ours; then micro-batch 8 again; on an H200, the 7B without
  # checkpointing
  rows_7b; rows_optimizer; rows_b8; rows_7b_h200
  echo "sitting ended" ;;
detached)
  WAIT=${2:?seconds to wait}
  PIDFILE=/tmp/perf-sitting.pid
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "sitting $(cat "$PIDFILE") still running"
  elif [ -f "$PIDFILE" ]; then
    echo "sitting $(cat "$PIDFILE") has ended"
  else
    setsid nohup bash "$0" sitting > "$RESULTS/sitting.log" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"; echo "started sitting $(cat "$PIDFILE")"
  fi
  START=$SECONDS
  while kill -0 "$(cat "$PIDFILE")" 2>/dev/null && [ $((SECONDS - START)) -lt "$WAIT" ]; do
    sleep 5
  done
  summary $(cd "$RESULTS" && ls ./*.log 2>/dev/null)
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
  # the snapshots that say where the fit path's memory goes: litgpt and fit-best, micro-batch 8
  tar czf "$OUT/memory.tgz" -C "$RESULTS" $(cd "$RESULTS" && ls memory/litgpt.* \
    memory/fit-best.* 2>/dev/null) 2>/dev/null
  pack_profiles
  tar czf "$OUT/logs.tgz" -C "$RESULTS" $(cd "$RESULTS" && ls ./*.log 2>/dev/null) 2>/dev/null
  collect ;;
*) echo "unknown phase $PHASE"; exit 2 ;;
esac
exit 0
