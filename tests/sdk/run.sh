#!/usr/bin/env bash
# Drives a real `creditgate serve` with the official Python SDK (autumn-sdk).
# Usage: bash tests/sdk/run.sh   (from anywhere; needs python3, cargo, PyPI)
# Also runs the JavaScript SDK test (autumn-js, node's test runner) when node
# and npm are installed; CREDITGATE_SDK_JS=0 skips it.
# Env: CREDITGATE_SDK_CONFIG_EXTRA — extra top-level TOML (e.g. a redis_url)
#      prepended to the temporary config.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check autumn-sdk pytest

run_js=""
if [ "${CREDITGATE_SDK_JS:-1}" != "0" ] && command -v node >/dev/null && command -v npm >/dev/null; then
  run_js=1
  if [ ! -d .venv/js/node_modules/autumn-js ]; then
    npm install --silent --no-audit --no-fund --prefix .venv/js autumn-js@1.3.13 >/dev/null
  fi
fi

cargo build --quiet --bin creditgate
bin="$root/target/debug/creditgate"

tmp="$(mktemp -d)"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

port="$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')"
{
  printf 'listen = "127.0.0.1:%s"\n' "$port"
  printf 'api_keys = ["sk_test_app"]\nadmin_keys = ["sk_test_admin"]\n'
  printf '%s\n' "${CREDITGATE_SDK_CONFIG_EXTRA:-}"
  cat examples/creditgate.toml | grep -vE '^(listen|api_keys|admin_keys|log_format) '
} > "$tmp/creditgate.toml"

RUST_LOG="${RUST_LOG:-warn}" "$bin" serve --config "$tmp/creditgate.toml" > "$tmp/server.log" 2>&1 &
server_pid=$!

ready=""
for _ in $(seq 1 100); do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "creditgate exited early:"; cat "$tmp/server.log"; exit 1
  fi
  if .venv/bin/python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/readyz', timeout=1)" 2>/dev/null; then
    ready=1; break
  fi
  sleep 0.1
done
if [ -z "$ready" ]; then
  echo "creditgate did not become ready:"; cat "$tmp/server.log"; exit 1
fi

export CREDITGATE_URL="http://127.0.0.1:$port" CREDITGATE_ADMIN_KEY="sk_test_admin" CREDITGATE_APP_KEY="sk_test_app"
status=0
.venv/bin/python -m pytest -q "$root/tests/sdk" -p no:cacheprovider || status=$?
if [ -n "$run_js" ]; then
  NODE_PATH="$root/.venv/js/node_modules" node --test "$root/tests/sdk/js/" || status=$?
fi
if [ "$status" -ne 0 ]; then
  echo "--- server log ---"; cat "$tmp/server.log"
fi
exit "$status"
