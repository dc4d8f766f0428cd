#!/usr/bin/env bash
# What the GPU machine runs, from the repository root with .whl/ carried there (see
# scripts/device_wheels.sh): installs the wheels into /tmp/site, then runs the GPU benchmark.
# The JSON result, the benchmark's log and the server's log land in $OUT.
# Usage: [BENCH=gpu_transformer_families] scripts/device_bench.sh [--quick]
#        (other arguments go to bench/$BENCH.py; default BENCH=gpu_generation)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:$PWD/generated
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv || true
BENCH=${BENCH:-gpu_generation}
python3 "bench/$BENCH.py" --out "$OUT/$BENCH.json" "$@" 2>&1 | tee "$OUT/$BENCH.log"
