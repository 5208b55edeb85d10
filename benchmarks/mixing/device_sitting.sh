#!/usr/bin/env bash
# One sitting of the mixing benchmark on a lent GPU machine (docs/benchmarks.md, "Mixing"):
# runs longer than one 10-minute command go on over several sittings, each resuming from the
# runs' last.ckpt while the machine stays warm. Carry the corpus archive and the wheels:
#   carry: .carry/corpus.tar.xz, .whl (zarr stack, jsonargparse wheels for the GPU image);
#   the archive is benchmarks/mixing/README.md's corpus with its tokenizer (42.7 MB, under
#   one call's 64 MiB):
#     tar -C /work -cJf .carry/corpus.tar.xz --exclude=mixing-corpus/store.zarr mixing-corpus
#   POLICIES="uniform doremi" SEEDS=1 REFERENCE_SEED=1 bash benchmarks/mixing/device_sitting.sh
# Everything the table needs comes back in $OUT/runs.tgz (no checkpoints). A machine lost
# between sittings loses its store and checkpoints: the store is prepared again (about 30 s
# on 16 cores) and unfinished runs start over. Runs finished earlier are taken from
# .carry/mixing-done/ (run folders, or runs.tgz files as they came back, which are ~5x
# smaller): after every sitting put its runs.tgz there and carry that folder too, or a fresh
# machine trains the finished runs again (it did once, and spent a whole sitting on it).
set -uo pipefail
START=$SECONDS
LIMIT=${LIMIT:-555}            # seconds of this sitting before runs are stopped
GPUS=${GPUS:-0}
STORE=/tmp/mixing-store.zarr
RUNS=/tmp/mixing-runs
python3 -m pip install --no-deps -q .whl/*.whl 2>&1 | grep -v WARNING | tail -3
if [ ! -f "$STORE/zarr.json" ]; then
  mkdir -p /tmp/mixing-corpus-src && tar xJf .carry/corpus.tar.xz -C /tmp/mixing-corpus-src
  t=$SECONDS
  AQUILA="python3 -m lightning_aquila.cli" bash benchmarks/mixing/prepare_store.sh \
    /tmp/mixing-corpus-src/mixing-corpus "$STORE" > /tmp/prepare.log 2>&1 \
    || { tail -20 /tmp/prepare.log; exit 1; }
  echo "store prepared in $((SECONDS - t)) s"
fi
mkdir -p "$RUNS" /tmp/mixing-done
for archive in .carry/mixing-done/*.tgz; do  # runs.tgz of earlier sittings, as they came back
  [ -f "$archive" ] && tar xzf "$archive" -C /tmp/mixing-done
done
for done in .carry/mixing-done/*/ /tmp/mixing-done/*/; do
  [ -f "$done/done.json" ] && [ ! -d "$RUNS/$(basename "$done")" ] && cp -r "$done" "$RUNS/"
done
# shellcheck disable=SC2086
PYTHONPATH=$PWD python3 benchmarks/mixing.py run --store "$STORE" --out "$RUNS" \
  --policies ${POLICIES:-uniform doremi} --seeds ${SEEDS:-1} --gpus $GPUS \
  --reference-seed "${REFERENCE_SEED:-0}" --checkpoint-every "${CHECKPOINT_EVERY:-500}" \
  --deadline $((LIMIT - (SECONDS - START))) \
  --fit-args --trainer.max_steps "${MAX_STEPS:-6104}" ${FIT_ARGS:-} 2>&1 | tail -25
tar czf "$OUT/runs.tgz" -C "$RUNS" --exclude checkpoints .
