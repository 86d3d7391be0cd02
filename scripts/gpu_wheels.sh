#!/usr/bin/env bash
# Downloads pytest and its dependencies as wheels into .gpu_wheels/ (ignored by git), for a GPU
# machine that has torch and transformers but no pytest and no package index:
# carry .gpu_wheels along with scripts/gpu_session.sh. PYTHON_VERSION is the machine's (3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
    --platform manylinux2014_x86_64 -d .gpu_wheels pytest
ls .gpu_wheels
