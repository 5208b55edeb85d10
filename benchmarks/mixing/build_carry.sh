#!/usr/bin/env bash
# What a mixing sitting on a lent GPU machine (device_detached.sh) needs that git does not
# hold, built here from the package registries, since the GPU machine reaches none:
#   .whl/                    the wheels its image lacks (zarr stack, jsonargparse), for its
#                            Python (GPU_PYTHON, default 3.12: /work/.library/device/KINDS.md)
#   .carry/corpus-a.tar.xz   corpus A (mixing-corpus/: <domain>/*.jsonl and tokenizer/), ~36 MB
#   .carry/corpus-b.tar.xz   corpus B (mixing-corpus-b/), ~12 MB
# Together about 51 MB: one call's 64 MiB carry. A corpus already built under WORK (its
# tokenizer/ present) is packed as it is. From nothing, about 20 minutes on two cores, most of
# it corpus A's packages and tokenizer.
#   bash benchmarks/mixing/build_carry.sh [WORK]     # WORK: where the corpora go (/work)
# then, on the GPU machine (device tool, carry [".whl", ".carry"]):
#   SETTINGS=... WAVES=... bash benchmarks/mixing/device_detached.sh 560
set -euo pipefail
WORK=${1:-/work}
GPU_PYTHON=${GPU_PYTHON:-3.12}
PYTHON=${PYTHON:-.venv/bin/python}   # one with lightning_aquila installed (make install)
HERE=benchmarks/mixing
mkdir -p .whl .carry

wheels=$(mktemp -d)
python3 -m pip download -q --only-binary=:all: --python-version "$GPU_PYTHON" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 -d "$wheels" \
  "zarr>=3.1,<4" "jsonargparse[signatures]>=4.32" "google-crc32c>=1.5"
# The image has these already; installed --no-deps over it, ours would replace its numpy.
find "$wheels" -name '*.whl' ! -name 'numpy-*' ! -name 'packaging-*' ! -iname 'pyyaml-*' \
  ! -name 'typing_extensions-*' -exec cp {} .whl/ \;
rm -rf "$wheels"
echo ".whl: $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1)"

# build_corpus.py fetches pinned .debs with apt-get download, which needs Debian's package
# lists, and corpus A's linux-libc-dev comes from bookworm-security.
need_apt=
[ -f "$WORK/mixing-corpus/tokenizer/tokenizer.json" ] || need_apt=1
[ -f "$WORK/mixing-corpus-b/tokenizer/tokenizer.json" ] || need_apt=1
[ -z "$need_apt" ] || apt-get update -qq

if [ ! -f "$WORK/mixing-corpus/tokenizer/tokenizer.json" ]; then
  python3 "$HERE/build_corpus.py" --out "$WORK/mixing-corpus" \
    --cache /tmp/lightning-aquila-mixing-src --sample /tmp/aq-tok-sample
  "$PYTHON" -m lightning_aquila.cli train-tokenizer --input '/tmp/aq-tok-sample/*.jsonl' \
    --output "$WORK/mixing-corpus/tokenizer" --vocab-size 32000
fi
if [ ! -f "$WORK/mixing-corpus-b/tokenizer/tokenizer.json" ]; then
  python3 "$HERE/corpus_b/build.py" --out "$WORK/mixing-corpus-b" \
    --cache /tmp/lightning-aquila-mixing-b-src --sample /tmp/aq-tok-sample-b
  "$PYTHON" -m lightning_aquila.cli train-tokenizer --input '/tmp/aq-tok-sample-b/*.jsonl' \
    --output "$WORK/mixing-corpus-b/tokenizer" --vocab-size 32000
fi
# A rebuild that differs from the committed manifests shows in git; a result on another
# corpus is not comparable with docs/benchmarks.md.
git diff --stat -- "$HERE/manifest.json" "$HERE/corpus_b/manifest.json"

for pair in a:mixing-corpus b:mixing-corpus-b; do
  name=${pair%%:*}; folder=${pair#*:}
  tar -C "$WORK" -cf - --sort=name --exclude="$folder/store.zarr" "$folder" \
    | xz -9 -T2 > ".carry/corpus-$name.tar.xz.partial"
  mv ".carry/corpus-$name.tar.xz.partial" ".carry/corpus-$name.tar.xz"
  echo ".carry/corpus-$name.tar.xz: $(du -h ".carry/corpus-$name.tar.xz" | cut -f1)"
done
# the hashes the corpora's READMEs give (1e20f22d... for A, 3fb47dab... for B)
for folder in mixing-corpus mixing-corpus-b; do
  echo "$folder tokenizer: $("$PYTHON" -c 'import sys
from lightning_aquila.tokenizer import tokenizer_hash
print(tokenizer_hash(sys.argv[1]))' "$WORK/$folder/tokenizer")"
done
