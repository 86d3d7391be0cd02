#!/usr/bin/env bash
# The project's static checks: layer contracts (import-linter), then ruff's lint and format.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
lint-imports --no-cache
ruff check .
ruff format --check .
