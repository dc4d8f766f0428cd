#!/usr/bin/env bash
# Regenerates generated/ from protos/ with the pinned grpcio-tools and mypy-protobuf.
# Usage: scripts/gen_protos.sh [OUT_DIR]   (default: generated)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-generated}"
py="${PYTHON:-.venv/bin/python}"
rm -rf "$out/loracle"
mkdir -p "$out"
"$py" -m grpc_tools.protoc -I protos \
  --python_out="$out" --grpc_python_out="$out" \
  --plugin=protoc-gen-mypy="$(dirname "$py")/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$(dirname "$py")/protoc-gen-mypy_grpc" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  protos/loracle/v1/*.proto
# The descriptors with their comments (and imports), for server reflection: the runtime pool
# keeps no source info, so `grpcurl describe` would show no documentation.
"$py" -m grpc_tools.protoc -I protos --include_imports --include_source_info \
  --descriptor_set_out="$out/loracle/v1/descriptors.binpb" protos/loracle/v1/*.proto
# Namespace packages would do, but explicit markers keep mypy and editors unambiguous.
touch "$out/loracle/__init__.py" "$out/loracle/v1/__init__.py"
