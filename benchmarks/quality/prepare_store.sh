#!/usr/bin/env bash
# Tokenize a quality corpus (build_quality_corpus.py's output) into a shard store and score
# it: the pool `web` (a small held-out part, read for its own loss only) and `clean_test`
# (mostly held out: its test part is what the benchmark is judged on; its few training
# documents are never drawn, the runs give the domain weight 0). Each document's `kind`
# (0 clean, 1-5 junk) is stored as the score `quality`, the ground truth for reports; the
# fastText classifier, trained on scorer/positive.jsonl against scorer/negative.jsonl, is
# attached as `fasttext_hq` (log-odds of clean), the score the runs sample by.
#   benchmarks/quality/prepare_store.sh CORPUS_DIR STORE
set -euo pipefail
corpus=${1:?corpus directory}; store=${2:?store path}
aquila=${AQUILA:-lightning-aquila}
rm -rf "$store" "$store.ready"
for spec in web:${WEB_HELD_OUT:-0.03} clean_test:0.9; do
  domain=${spec%%:*}
  $aquila prepare --input "$corpus/$domain" --format jsonl --domain "$domain" --language en \
    --output "$store" --tokenizer "$corpus/tokenizer/tokenizer.json" --quality-field kind \
    --held-out-fraction "${spec#*:}" --quiet
done
$aquila score fasttext "$store" --positive "$corpus/scorer/positive.jsonl" \
  --negative "$corpus/scorer/negative.jsonl" --name fasttext_hq \
  --save-model "$corpus/fasttext_hq.bin" --quiet
$aquila inspect "$store"
touch "$store.ready"
