#!/usr/bin/env bash
# Regenerates the Python modules of proto/smartspec/v1 into protocol/v1 (or into $1/protocol/v1).
# protoc names modules after the .proto paths (smartspec.v1); they live in the protocol
# package, so the generated cross-imports are rewritten to protocol.v1.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python -m grpc_tools.protoc -Iproto --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  proto/smartspec/v1/*.proto
mkdir -p "$out/protocol/v1"
for f in "$tmp"/smartspec/v1/*; do
  sed -e 's/^from smartspec\.v1 import /from protocol.v1 import /' "$f" >"$out/protocol/v1/$(basename "$f")"
done
