#!/usr/bin/env bash
# Tokenize a mixing corpus (one folder of jsonl per domain, and tokenizer/) into one shard
# store, domain after domain (each `prepare` already uses every core; the store's manifest
# takes one writer at a time), then mark it ready (STORE.ready, what the driver's
# --wait-for-stores waits for).
#   benchmarks/mixing/prepare_store.sh CORPUS_DIR STORE
# Each domain holds out enough text for 32 dev and 32 test windows of 512 tokens: a share
# of its documents of at least 5%, more for small domains (about 64K tokens, by its bytes),
# at most 30%; HELD_OUT_TOKENS changes the target.
set -euo pipefail
corpus=${1:?corpus directory}; store=${2:?store path}
aquila=${AQUILA:-lightning-aquila}
target=${HELD_OUT_TOKENS:-64000}
rm -f "$store.ready"
for path in "$corpus"/*/; do
  domain=$(basename "$path")
  case "$domain" in tokenizer|*.zarr) continue ;; esac
  # ~3.5 bytes of jsonl per token on these corpora (text and JSON escaping together)
  fraction=$(du -sb "$path" | awk -v t="$target" '{f = t * 3.5 / $1; if (f < 0.05) f = 0.05;
    if (f > 0.3) f = 0.3; printf "%.3f", f}')
  $aquila prepare --input "$path" --format jsonl --domain "$domain" --output "$store" \
    --tokenizer "$corpus/tokenizer/tokenizer.json" --held-out-fraction "$fraction" --quiet
done
$aquila inspect "$store"
touch "$store.ready"
