#!/usr/bin/env bash
# What the GPU machine runs, from the repository root with .whl/ carried there (see
# scripts/device_wheels.sh): installs the wheels into /tmp/site, then runs the GPU benchmark.
# The JSON result, the benchmark's log and the server's log land in $OUT.
# Usage: scripts/device_bench.sh [--quick]    (other arguments go to bench/gpu_generation.py)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:$PWD/generated
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv || true
python3 bench/gpu_generation.py --out "$OUT/gpu_generation.json" "$@" 2>&1 \
  | tee "$OUT/gpu_generation.log"
