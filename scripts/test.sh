#!/usr/bin/env bash
# Installs what the tests need, runs the static checks, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/lint.sh
. .venv/bin/activate
python -m pytest -q "$@"
