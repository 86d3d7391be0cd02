#!/usr/bin/env bash
# Starts the local stack (an n-gram proposer, the controller and a verifier on
# SmolLM2-135M-Instruct), shows a few prompts with speculation off and on side by side,
# then a short sweep: mean latency per request rate for off, fixed:3 and smartspec.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
port="${PORT:-50051}"
log="$(mktemp)"
smartspec up --ngram --port "$port" --proposer-port "$((port + 10))" --controller-port "$((port + 20))" \
  --metrics-port 0 --policy smartspec >"$log" 2>&1 &
stack=$!
trap 'kill -TERM "$stack" 2>/dev/null || true; wait "$stack" 2>/dev/null || true; rm -f "$log"' EXIT
echo "starting the stack (proposer, controller, verifier; loading the model)..."
until grep -q "stack up" "$log"; do
  if ! kill -0 "$stack" 2>/dev/null; then cat "$log"; exit 1; fi
  sleep 0.5
done
echo
echo "Each prompt with speculation off, then with 4 n-gram draft tokens per step (greedy, so the text must match):"
python -m smartspec.demo --target "127.0.0.1:$port" --k 4 --max-new-tokens 48
echo
echo "A short sweep on passage rewrites (6 requests per point, one run each; benchmarks/goodput_sweep.py is the full one):"
smartspec bench --target "127.0.0.1:$port" --controller "127.0.0.1:$((port + 20))" --prompts grounded --chat \
  --rates 0.5,2 --policies off,fixed:3,smartspec --repeats 1 --num-requests 6 --max-new-tokens 32 \
  --output results/demo/sweep.json
