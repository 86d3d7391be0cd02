#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one command (its lease is short and one run
# at a time):
#
#   bash scripts/gpu_session.sh OUT_DIR [gpu_check.py arguments]
#
# 1. benchmarks/gpu_check.py (step times, TPOT, the pair; results.json and its log in OUT_DIR),
#    given at most GPU_CHECK_S seconds (default 420);
# 2. the GPU-only tests (`needs_a_gpu`: graph captures and replays, warm-up, the paged
#    kernels under graphs, sampling on the device; modules that import only what the machine
#    has) in what is left of SESSION_S seconds (default 560), their log in
#    OUT_DIR. A machine without pytest installs it from .gpu_wheels/ (scripts/gpu_wheels.sh
#    fills it here; carry it along).
#
# Exit status: gpu_check's, or the tests' when gpu_check passed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_session.sh OUT_DIR [gpu_check.py arguments]}
shift
mkdir -p "$out"
start=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
PYTHONUNBUFFERED=1 timeout "${GPU_CHECK_S:-420}" python3 benchmarks/gpu_check.py --output-dir "$out" "$@" 2>&1 |
    tee "$out/gpu_check.log"
check=${PIPESTATUS[0]}
if ! python3 -c "import pytest" 2>/dev/null; then
    python3 -m pip install -q --no-index --find-links .gpu_wheels pytest 2>&1 | tail -3
fi
left=$((${SESSION_S:-560} - (SECONDS - start)))
if [ "$left" -gt 30 ]; then
    modules=(tests/runtime/test_graphs.py tests/runtime/test_sampler.py)
    timeout "$left" python3 -m pytest -q -p no:cacheprovider -k needs_a_gpu "${modules[@]}" 2>&1 |
        tee "$out/gpu_tests.log"
    tests=${PIPESTATUS[0]}
else
    echo "no time left for the GPU-only tests ($left s)" | tee "$out/gpu_tests.log"
    tests=1
fi
echo "gpu_check exit $check, GPU tests exit $tests, $((SECONDS - start)) s"
[ "$check" -ne 0 ] && exit "$check"
exit "$tests"
