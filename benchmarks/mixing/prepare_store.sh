#!/usr/bin/env bash
# Tokenize the benchmark corpus (build_corpus.py's output: one folder of jsonl per domain,
# and tokenizer/) into one shard store, domain after domain (each `prepare` already uses
# every core to tokenize; the store's manifest takes one writer at a time).
#   benchmarks/mixing/prepare_store.sh CORPUS_DIR STORE
set -euo pipefail
corpus=${1:?corpus directory}; store=${2:?store path}
aquila=${AQUILA:-lightning-aquila}
for path in "$corpus"/*/; do
  domain=$(basename "$path")
  case "$domain" in tokenizer|*.zarr) continue ;; esac
  $aquila prepare --input "$path" --format jsonl --domain "$domain" --output "$store" \
    --tokenizer "$corpus/tokenizer/tokenizer.json" --held-out-fraction 0.05 --quiet
done
$aquila inspect "$store"
