#!/usr/bin/env bash
# Regenerates the Python modules of proto/smartspec/v1 into smartspec/v1 (or into $1).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
python -m grpc_tools.protoc -Iproto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  proto/smartspec/v1/*.proto
