#!/usr/bin/env bash
# .whl/: the wheels the fit-path rows (benchmarks/fit_throughput.py, device_perf.sh) need that
# the GPU image lacks, downloaded here since the GPU machine reaches no registry. The image
# brings torch (CUDA) and triton; these are pure Python:
#   litgpt 0.5.13           the `litgpt` row (--no-deps: its imports are in the image)
#   liger-kernel 0.8.5      the fit-liger* rows (--no-deps: it needs only torch and triton)
#   zarr stack, jsonargparse the DomainDataModule and the CLI
# For the Python of the GPU image (GPU_PYTHON, default 3.12: /work/.library/device/KINDS.md).
#   bash benchmarks/perf_wheels.sh     # then carry [".whl"] (and ".carry/ao" for float8 rows)
set -euo pipefail
GPU_PYTHON=${GPU_PYTHON:-3.12}
PLATFORMS=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux_2_28_x86_64)
mkdir -p .whl
wheels=$(mktemp -d)
python3 -m pip download -q --only-binary=:all: --python-version "$GPU_PYTHON" "${PLATFORMS[@]}" \
  -d "$wheels" "zarr>=3.1,<4" "jsonargparse[signatures]>=4.32" "google-crc32c>=1.5"
# The image has these already; installed --no-deps over it, ours would replace its numpy.
find "$wheels" -name '*.whl' ! -name 'numpy-*' ! -name 'packaging-*' ! -iname 'pyyaml-*' \
  ! -name 'typing_extensions-*' -exec cp {} .whl/ \;
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" \
  "${PLATFORMS[@]}" -d .whl "litgpt==0.5.13" "liger-kernel==0.8.5"
rm -rf "$wheels"
echo ".whl: $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1)"
