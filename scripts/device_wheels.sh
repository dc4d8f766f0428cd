#!/usr/bin/env bash
# Downloads into .whl/ the wheels that the GPU machine's image lacks, or has in versions the
# project cannot use, pinned to the versions in .venv; scripts/device_bench.sh installs them
# there with --no-deps, so each one's own dependencies must be on the image or in this list.
# The image (Python 3.12) has torch, transformers, accelerate, peft, safetensors, numpy, pillow,
# psutil, rich, tqdm, huggingface-hub, pyyaml, requests, regex, filelock and packaging.
# Usage: scripts/device_wheels.sh    (then carry ".whl" to the device and run device_bench.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

WHEELS=(
  diffusers==0.42.1
  # The generated code needs grpcio >= 1.85.1 and protobuf >= 7.35.1 (its gencode version);
  # the image's versions are not known.
  grpcio==1.85.3
  protobuf==7.36.2
  grpcio-status==1.85.3
  grpcio-health-checking==1.85.1
  grpcio-reflection==1.85.1
  googleapis-common-protos==1.76.0
  eventsourcing==9.5.6
  SQLAlchemy==2.1.9
  # grpcio wants typing-extensions~=4.12; eventsourcing and SQLAlchemy import it too.
  typing_extensions==4.16.0
  # On the image in an unknown version: carry the one the LoRA code was tested with.
  peft==0.21.2
  # quantize = "fp8"/"int8" (bench/gpu_transformer_families.py stage Q) and GGUF files.
  torchao==0.18.0
  gguf==0.19.0
)

rm -rf .whl
mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
ls -1 .whl
du -ch .whl/*.whl | tail -n 1
