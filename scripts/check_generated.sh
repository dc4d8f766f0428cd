#!/usr/bin/env bash
# Fails when generated/ differs from what protos/ produce (CI's drift check).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
scripts/gen_protos.sh "$tmp/generated"
if ! diff -r -x __pycache__ "$tmp/generated" generated; then
  echo "generated/ is out of date with protos/: run 'make proto' and commit the result" >&2
  exit 1
fi
echo "generated/ matches protos/"
# The sync client is generated from the async one.
"${PYTHON:-.venv/bin/python}" scripts/unasync.py --check
