#!/usr/bin/env bash
# One sitting of the mixing benchmark on a lent GPU machine (docs/benchmarks.md, "Mixing"),
# started detached by device_detached.sh. It installs the carried wheels, prepares a shard
# store from every corpus archive in the inbox (device_detached.sh copies .carry/corpus*.tar.xz
# there on every call, so a corpus may arrive with a later call), then runs
# benchmarks/mixing.py over SETTINGS in the order of WAVES, SLOTS runs at a time on the GPU;
# a setting's runs start once its store is ready. Results: /tmp/mixing/runs (no checkpoints).
#   SETTINGS   "NAME=STORE:EPOCHS ..." with STORE a corpus archive's top folder, or that
#              folder followed by -cut for its CUT share of documents (cut_corpus.py); given,
#              a setting waits for its corpus to arrive; left out, the four settings of
#              docs/benchmarks.md whose corpus came with the first call (mixing-corpus/: A,
#              mixing-corpus-b/: B)
#   WAVES      "POLICIES:SEEDS;POLICIES:SEEDS;..." (mixing.py --wave, in order); left out,
#              the fixed mixtures and the default policy (effective-data-r3) on seeds 1-3,
#              both on 4-5, then DoReMi, bandit and Aioli
#   CUT        the share of documents of the -cut stores (default 0.15)
#   SLOTS      runs at a time on the GPU (default 8)
#   FIT_ARGS   extra arguments for every fit
# Finished runs of an earlier sitting, carried as .carry/runs.tgz (a runs/ folder, as runs.tgz
# comes back), are unpacked into the runs folder first, so the driver skips them.
# Archives: tar of a folder with <domain>/*.jsonl and tokenizer/ (build_corpus.py's layout);
# the store is /tmp/mixing/stores/<folder>.zarr.
set -uo pipefail
WORK=/tmp/mixing
INBOX=$WORK/inbox
STORES=$WORK/stores
CORPORA=$WORK/corpora
RUNS=$WORK/runs
CUT=${CUT:-0.15}
SLOTS=${SLOTS:-8}
SETTINGS_GIVEN=${SETTINGS:+1}
SETTINGS=${SETTINGS:-"a-0.5ep=mixing-corpus:0.5 a-3ep=mixing-corpus-cut:3 b-0.5ep=mixing-corpus-b:0.5 b-3ep=mixing-corpus-b:3"}
WAVES=${WAVES:-"natural uniform temperature unimax effective-data-r3:1,2,3;effective-data-r3 @best-fixed:4,5;doremi bandit aioli:1,2,3"}
mkdir -p "$INBOX" "$STORES" "$CORPORA" "$RUNS"
if [ ! -f "$WORK/wheels.installed" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install --no-deps -q .whl/*.whl 2>&1 | grep -v WARNING | tail -3
  touch "$WORK/wheels.installed"
fi
if [ -f .carry/runs.tgz ] && [ ! -f "$WORK/runs.taken" ]; then
  tar xzf .carry/runs.tgz -C "$WORK" && touch "$WORK/runs.taken"
  echo "[$(date +%T)] earlier runs: $(ls -d "$RUNS"/*/*/done.json 2>/dev/null | wc -l) finished"
fi
# the sitting runs a copy of the code: a later call re-sends the working tree, which must not
# change the code of runs still to start
rm -rf "$WORK/code" && mkdir -p "$WORK/code"
tar cf - --exclude=./.carry --exclude=./.whl --exclude=./.git . | tar xf - -C "$WORK/code"
cd "$WORK/code" || exit 1
export AQUILA="python3 -m lightning_aquila.cli" OMP_NUM_THREADS=2 PYTHONPATH=$PWD

prepare_inbox() {  # every archive not yet prepared: unpack, prepare its store (and its cut)
  for archive in "$INBOX"/*.tar.xz; do
    [ -f "$archive" ] || continue
    [ -f "$archive.taken" ] && continue
    touch "$archive.taken"
    local t=$SECONDS top
    top=$(tar tJf "$archive" | head -1 | cut -d/ -f1)
    tar xJf "$archive" -C "$CORPORA"
    bash benchmarks/mixing/prepare_store.sh "$CORPORA/$top" "$STORES/$top.zarr" \
      > "$WORK/prepare-$top.log" 2>&1 || { tail -5 "$WORK/prepare-$top.log"; continue; }
    echo "[$(date +%T)] store $top prepared in $((SECONDS - t)) s"
    if [[ " $SETTINGS " == *"=$top-cut:"* ]]; then
      python3 benchmarks/mixing/cut_corpus.py "$CORPORA/$top" "$CORPORA/$top-cut" \
        --fraction "$CUT" > "$WORK/cut-$top.log" 2>&1 \
      && bash benchmarks/mixing/prepare_store.sh "$CORPORA/$top-cut" "$STORES/$top-cut.zarr" \
        > "$WORK/prepare-$top-cut.log" 2>&1 \
      && echo "[$(date +%T)] store $top-cut prepared ($CUT of the documents)"
    fi
  done
}

# A setting whose corpus is neither prepared nor in the inbox waits silently in the driver:
# say so, here where SETTINGS has its default (device_detached.sh shows the end of this log at
# every call; the usual cause: .carry/ not carried; where git ignores it, the run tool's carry
# list must name it, e.g. [".whl", ".carry"]).
has_corpus() {  # NAME=FOLDER:EPOCHS: its store is prepared or its archive is in the inbox
  local folder=${1#*=} archive top
  folder=${folder%:*}  # an archive's top folder, or that folder + -cut
  [ -f "$STORES/$folder.zarr.ready" ] && return 0
  for archive in "$INBOX"/*.tar.xz; do
    [ -f "$archive" ] || continue
    top=$(tar tJf "$archive" 2>/dev/null | head -1 | cut -d/ -f1)
    { [ "$top" = "$folder" ] || [ "$top-cut" = "$folder" ]; } && return 0
  done
  return 1
}

no_corpus() {  # a line per setting without a corpus
  local s folder
  for s in $SETTINGS; do
    has_corpus "$s" && continue
    folder=${s#*=}; folder=${folder%:*}
    echo "no corpus for setting ${s%%=*}: no .carry/corpus*.tar.xz has the" \
      "top folder ${folder%-cut}/ (carry .carry/ with this call)"
  done
}

# The default settings are those whose corpus came with the first call, so that a sitting
# on one corpus (a user's own as mixing-corpus/, say) ends instead of waiting for the other.
if [ -z "$SETTINGS_GIVEN" ]; then
  kept=
  for s in $SETTINGS; do
    if has_corpus "$s"; then kept+="$s "; else echo "left out: setting ${s%%=*} (no corpus)"; fi
  done
  SETTINGS=$kept
  [ -n "$SETTINGS" ] || { echo "no corpus archive in .carry/ for any default setting"; exit 1; }
fi
missing=$(no_corpus)  # before preparing, which takes minutes
[ -n "$missing" ] && echo "$missing"
prepare_inbox
settings=()
for s in $SETTINGS; do  # NAME=FOLDER:EPOCHS -> NAME=STORE:EPOCHS
  name=${s%%=*}; rest=${s#*=}; settings+=("$name=$STORES/${rest%:*}.zarr:${rest##*:}")
done
waves=()
IFS=';' read -ra parts <<< "$WAVES"
for w in "${parts[@]}"; do waves+=(--wave "$w"); done
gpus=()
for _ in $(seq 1 "$SLOTS"); do gpus+=(0); done
# shellcheck disable=SC2086
python3 benchmarks/mixing.py run --wait-for-stores --out "$RUNS" --gpus "${gpus[@]}" \
  --settings "${settings[@]}" "${waves[@]}" --json "$RUNS/summary.json" \
  --fit-args ${FIT_ARGS:-} > "$WORK/driver.log" 2>&1 &
driver=$!
while kill -0 "$driver" 2>/dev/null; do
  prepare_inbox
  now=$(no_corpus)  # said again when it changes (a corpus arrived with a later call)
  [ -n "$now" ] && [ "$now" != "$missing" ] && echo "$now"
  missing=$now
  sleep 10
done
wait "$driver"
echo "[$(date +%T)] sitting ended"
