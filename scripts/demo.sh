#!/usr/bin/env bash
# Starts the local stack (a proposer process and a verifier on SmolLM2-135M-Instruct),
# runs a few prompts with speculation off and on side by side, and stops the stack.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
port="${PORT:-50051}"
log="$(mktemp)"
smartspec up --ngram --port "$port" --proposer-port "$((port + 10))" --metrics-port 0 --policy off >"$log" 2>&1 &
stack=$!
trap 'kill -TERM "$stack" 2>/dev/null || true; wait "$stack" 2>/dev/null || true; rm -f "$log"' EXIT
echo "starting the stack (proposer + verifier, loading the model)..."
until grep -q "stack up" "$log"; do
  if ! kill -0 "$stack" 2>/dev/null; then cat "$log"; exit 1; fi
  sleep 0.5
done
echo
smartspec generate "What is the capital of France?" --chat --max-new-tokens 32 --target "127.0.0.1:$port"
echo
echo "Each prompt with speculation off, then with 4 n-gram draft tokens per step (greedy, so the text must match):"
python -m smartspec.demo --target "127.0.0.1:$port" --k 4 --max-new-tokens 64
