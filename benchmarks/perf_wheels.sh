#!/usr/bin/env bash
# .whl/: the wheels the fit-path rows (benchmarks/fit_throughput.py, device_perf.sh) need that
# the GPU image lacks, downloaded here since the GPU machine reaches no registry. The image
# brings torch (CUDA); these are pure Python:
#   litgpt 0.5.13           the `litgpt` row (--no-deps: its imports are in the image)
#   torchao 0.17.0          --optimizer adamw8bit and the float8 rows (0.17.0 is the version
#                           that ran with the image's torch 2.11 on 2026-11-27)
#   zarr stack, jsonargparse the DomainDataModule and the CLI
# torchao goes to .carry/ao/ (the second call's carry: the first is full).
# FLASH=1 also puts the flash-attn-4 stack (the fit-*-flash rows) in .carry/flash1/ and
# .carry/flash2/, each small enough to travel with the tree (and, for flash1, with .whl) under
# one call's 64 MiB. Carry flash1 and flash2 with two calls to one warm machine;
# `device_perf.sh` joins and installs them once both have come.
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
  "${PLATFORMS[@]}" -d .whl "litgpt==0.5.13"
rm -rf "$wheels"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" \
  "${PLATFORMS[@]}" -d .carry/ao "torchao==0.17.0"  # with the second call (adamw8bit rows)
if [ "${FLASH:-0}" = 1 ]; then
  flash=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" \
    "${PLATFORMS[@]}" --platform manylinux_2_34_x86_64 -d "$flash" "flash-attn-4==4.0.0b36" \
    "nvidia-cutlass-dsl==4.8.1" "nvidia-cutlass-dsl-libs-base==4.8.1" \
    "nvidia-cutlass-dsl-libs-core==4.8.1" "nvidia-cutlass-dsl-libs-cu13==4.8.1" \
    "quack-kernels==0.6.5" "apache-tvm-ffi==0.1.15.post2" "torch-c-dlpack-ext==0.1.5"
  rm -rf .carry/flash1 .carry/flash2 .carry/flash3
  mkdir -p .carry/flash1 .carry/flash2
  # The CUDA 13 library wheel (92 MB of zip) is unpacked and packed again as tar.xz (66 MB):
  # a wheel installed --target is its unpacked tree, so device_perf.sh extracts it over the
  # other wheels' install. Its first 36 MB go with the small wheels and .whl, the rest with
  # the second call, each call under the device tool's 64 MiB with the tree.
  big=$(ls "$flash"/nvidia_cutlass_dsl_libs_cu13-*.whl)
  name=$(basename "$big" .whl)
  mkdir "$flash/tree" && unzip -q "$big" -d "$flash/tree"  # unzip keeps the .so modes
  tar cf - -C "$flash/tree" . | xz -T0 -6 > "$flash/$name.tar.xz"
  split -b 36000000 -d -a 1 "$flash/$name.tar.xz" "$flash/$name.tar.xz.part"
  mv "$flash/$name.tar.xz.part0" ".carry/flash1/$name.tar.xz.part-1-of-2"
  mv "$flash/$name.tar.xz.part1" ".carry/flash2/$name.tar.xz.part-2-of-2"
  rm -rf "$big" "$flash/tree" "$flash/$name.tar.xz"
  mv "$flash"/*.whl .carry/flash1/
  rm -rf "$flash"
  du -sh .carry/flash1 .carry/flash2
fi
echo ".whl: $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1)"
