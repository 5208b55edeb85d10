#!/usr/bin/env bash
# Tokenize a quality corpus (build_quality_corpus.py's output) into a shard store and score
# it: the pool `web` (a small held-out part, read for its own loss only) and `clean_test`
# (mostly held out: its test part is what the benchmark is judged on; its few training
# documents are never drawn, the runs give the domain weight 0). Each document's `kind`
# (0 clean, 1-5 junk) is stored as the score `quality`, the ground truth for reports; the
# fastText classifier, trained on scorer/positive.jsonl against scorer/negative.jsonl, is
# attached as `fasttext_hq` (log-odds of clean), the score the runs sample by. A corpus built
# with --per-domain has a pool web_D and a test domain clean_D per source domain D: every
# web* folder is prepared as a pool, every clean* folder as a test domain, one scorer for all.
#   benchmarks/quality/prepare_store.sh CORPUS_DIR STORE
set -euo pipefail
corpus=${1:?corpus directory}; store=${2:?store path}
aquila=${AQUILA:-lightning-aquila}
rm -rf "$store" "$store.ready"
for folder in "$corpus"/web*/ "$corpus"/clean*/; do
  domain=$(basename "$folder")
  case $domain in web*) held_out=${WEB_HELD_OUT:-0.03} ;; *) held_out=0.9 ;; esac
  $aquila prepare --input "$corpus/$domain" --format jsonl --domain "$domain" --language en \
    --output "$store" --tokenizer "$corpus/tokenizer/tokenizer.json" --quality-field kind \
    --held-out-fraction "$held_out" --quiet
done
$aquila score fasttext "$store" --positive "$corpus/scorer/positive.jsonl" \
  --negative "$corpus/scorer/negative.jsonl" --name fasttext_hq \
  --save-model "$corpus/fasttext_hq.bin" --quiet
$aquila inspect "$store"
touch "$store.ready"
