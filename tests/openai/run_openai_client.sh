#!/bin/bash
# Runs openai_client.mjs (the official `openai` npm package) against m1-serve on a tiny random
# model; structured outputs are checked with `ajv` (JSON Schema 2020-12) and `ajv-formats`. The
# packages are installed into WORK_DIR once. Exits 77 (skipped) only when npm cannot reach its
# registry.
# Usage: run_openai_client.sh BIN_DIR WORK_DIR
set -euo pipefail

bin_dir=$1
work=$2
client_dir=$work/client
mkdir -p "$client_dir"

# openai 7 needs Node 22; 6 is the newest major that runs on Debian's Node 20.
if [ ! -d "$client_dir/node_modules/openai" ] || [ ! -d "$client_dir/node_modules/ajv-formats" ]; then
  if ! npm install --prefix "$client_dir" --no-audit --no-fund --loglevel=error openai@6 ajv@8 ajv-formats@3 \
      >"$work/npm.log" 2>&1; then
    cat "$work/npm.log"
    if grep -qE 'ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|EHOSTUNREACH' "$work/npm.log"; then
      echo "SKIPPED: npm cannot reach its registry to install the openai, ajv and ajv-formats packages"
      exit 77
    fi
    exit 1
  fi
fi
# Node resolves `import 'openai'` from the script's own folder.
cp "$(dirname "$0")/openai_client.mjs" "$client_dir/"

rm -rf "$work/model"
"$bin_dir/m1-mkmodel" --preset tiny --out "$work/model" >/dev/null 2>&1
"$bin_dir/m1-serve" --model "$work/model" --served-model-name tiny --port 0 --api-key node-key \
  --max-context 1024 --threads 1 2>"$work/serve.log" &
server=$!
# Only ever our own child: a guarded pid, never empty or <= 0 (kill -1 would reach every process).
stop_server() { if [[ "${server:-}" =~ ^[0-9]+$ ]] && (( server > 1 )); then kill "$@" "$server" 2>/dev/null || true; fi; }
trap 'stop_server' EXIT

# Up to 30 s: on a loaded 2-core machine (ctest -j2 beside the load test) startup can take seconds.
port=
for _ in $(seq 1500); do
  if ! kill -0 "$server" 2>/dev/null; then break; fi
  if grep -q "ready" "$work/serve.log"; then
    port=$(sed -n 's|.*listening on http://127.0.0.1:\([0-9]*\).*|\1|p' "$work/serve.log")
    break
  fi
  sleep 0.02
done
if [ -z "$port" ]; then
  echo "m1-serve did not start:"
  cat "$work/serve.log"
  exit 1
fi

node "$client_dir/openai_client.mjs" "http://127.0.0.1:$port/v1" node-key
stop_server -TERM
status=0
wait "$server" || status=$?
server=  # reaped: nothing left for the trap to signal
exit $status
