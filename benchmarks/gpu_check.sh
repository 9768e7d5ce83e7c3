#!/usr/bin/env bash
# The GPU check of docs/performance.md (benchmarks/gpu_check.py says what it measures).
#
#   bash benchmarks/fetch_wheels.sh          # once, where PyPI is reachable: fills the git-ignored .whl/
#   bash benchmarks/gpu_check.sh [--json F]  # on one GPU (bf16): installs .whl/ into a temporary folder, then runs
#   bash benchmarks/gpu_check.sh --cpu-smoke # tiny shapes on the CPU in seconds, with the Python already set up
#
# The GPU machine has torch, transformers, accelerate, peft and pyarrow but neither datasets nor trl, and no network:
# the carried wheels supply them. $PYTHON (default python3) runs the check.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
if [[ " $* " != *" --cpu-smoke "* ]]; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    site="${TMPDIR:-/tmp}/sepo-gpu-check-site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: no wheels in .whl/ (benchmarks/fetch_wheels.sh): the TRL rows run only if trl is installed" >&2
  fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec "$python" benchmarks/gpu_check.py "$@"
