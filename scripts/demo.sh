#!/usr/bin/env bash
# Starts a local verifier with the built-in SmolLM2-135M-Instruct, streams a few
# completions with their timing, runs a short load test, and stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
port="${PORT:-50051}"
log="$(mktemp)"
smartspec verifier --port "$port" --metrics-port 0 --kv-cache-tokens 16384 >"$log" 2>&1 &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -f "$log"' EXIT
echo "loading the model..."
until grep -q "ready on" "$log"; do
  if ! kill -0 "$server" 2>/dev/null; then cat "$log"; exit 1; fi
  sleep 0.5
done
for prompt in "What is the capital of France?" "Write a haiku about the sea." \
              "Explain what a KV cache is in one sentence."; do
  echo; echo ">>> $prompt"
  smartspec generate "$prompt" --chat --max-new-tokens 64 --target "127.0.0.1:$port"
done
echo; echo ">>> 16 requests at 4 requests/s, 64 new tokens each"
smartspec bench --target "127.0.0.1:$port" --rate 4 --num-requests 16 --max-new-tokens 64 --chat \
  --output results/demo/bench.json
