#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels benchmarks/gpu_check.sh installs on the GPU machine: Python 3.12,
# x86-64 Linux, no network there. That machine has torch, transformers, accelerate, peft, pyarrow, pandas and
# xxhash, but no datasets (nor its dill / multiprocess) and no trl. Versions pinned to what the CPU benchmarks used.
#
#   bash benchmarks/fetch_wheels.sh              # about 2 MB
#   bash benchmarks/fetch_wheels.sh --pyarrow    # also pyarrow (about 45 MB), if the machine's is older than 24
#                                                # (datasets 5.2 needs >= 24; gpu_check prints the versions it finds)
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
if [[ "${1:-}" == "--pyarrow" ]]; then
  packages+=(pyarrow==26.0.1)
fi
mkdir -p .whl
"${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${packages[@]}"
ls -la .whl
du -sh .whl
