#!/usr/bin/env bash
# Drives a real `creditgate serve` with the official Python SDK (autumn-sdk).
# Usage: bash tests/sdk/run.sh   (from anywhere; needs python3, redis-server,
# and PyPI on the first run: the venv .venv with tests/sdk/requirements.txt)
# Also runs the JavaScript SDK test (autumn-js 1.3.13, node's test runner) when
# node and npm are installed (npm on its first run); otherwise, or with
# CREDITGATE_SDK_JS=0, it says that suite is skipped and why.
# Env: CREDITGATE_BIN — the creditgate binary to test (scripts/test.sh passes
# the one `cargo test` built); unset, this script builds one with cargo.
# The suites run twice: on a private redis-server this script starts (its own
# port and temp dir, stopped at the end), then on the in-process engine.
# Env: CREDITGATE_SDK_ENGINES — which to run (default "redis memory").
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt

autumn_js=1.3.13
run_js=""
if [ "${CREDITGATE_SDK_JS:-1}" = "0" ]; then
  echo "==> skipped: autumn-js suite (CREDITGATE_SDK_JS=0)"
elif ! command -v node >/dev/null; then
  echo "==> skipped: autumn-js suite (node not installed; install nodejs and npm)"
elif ! command -v npm >/dev/null; then
  echo "==> skipped: autumn-js suite (npm not installed; install npm)"
else
  run_js=1
  installed="$(node -p 'require("./.venv/js/node_modules/autumn-js/package.json").version' 2>/dev/null || true)"
  if [ "$installed" != "$autumn_js" ]; then
    npm install --silent --no-audit --no-fund --prefix .venv/js "autumn-js@$autumn_js" >/dev/null
  fi
fi

if [ -n "${CREDITGATE_BIN:-}" ]; then
  bin="$CREDITGATE_BIN"
  [ -x "$bin" ] || { echo "tests/sdk/run.sh: CREDITGATE_BIN=$bin is not an executable" >&2; exit 1; }
else
  cargo build --quiet --bin creditgate
  bin="$root/target/debug/creditgate"
fi

tmp="$(mktemp -d)"
server_pid=""
redis_pid=""
stop_server() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  server_pid=""
}
cleanup() {
  stop_server
  if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

free_port() {
  .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Starts creditgate with `$1` as extra top-level TOML; sets $port.
start_server() {
  port="$(free_port)"
  {
    printf 'listen = "127.0.0.1:%s"\n' "$port"
    printf 'api_keys = ["sk_test_app"]\nadmin_keys = ["sk_test_admin"]\n'
    printf '%s\n' "$1"
    grep -vE '^(listen|api_keys|admin_keys|log_format) ' examples/creditgate.toml
  } > "$tmp/creditgate.toml"
  RUST_LOG="${RUST_LOG:-warn}" "$bin" serve --config "$tmp/creditgate.toml" > "$tmp/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 100); do
    if ! kill -0 "$server_pid" 2>/dev/null; then
      echo "creditgate exited early:"; cat "$tmp/server.log"; exit 1
    fi
    if .venv/bin/python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/readyz', timeout=1)" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "creditgate did not become ready:"; cat "$tmp/server.log"; exit 1
}

status=0
for engine in ${CREDITGATE_SDK_ENGINES:-redis memory}; do
  extra=""
  if [ "$engine" = redis ]; then
    rport="$(free_port)"
    mkdir -p "$tmp/redis"
    redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$tmp/redis" >/dev/null 2>&1 &
    redis_pid=$!
    for _ in $(seq 1 100); do
      redis-cli -p "$rport" ping >/dev/null 2>&1 && break
      sleep 0.05
    done
    extra="redis_url = \"redis://127.0.0.1:$rport\""
  fi
  echo "--- SDK suites on the $engine engine"
  start_server "$extra"
  export CREDITGATE_URL="http://127.0.0.1:$port" CREDITGATE_ADMIN_KEY="sk_test_admin" CREDITGATE_APP_KEY="sk_test_app"
  export CREDITGATE_TEST_REDIS_URL="$([ "$engine" = redis ] && echo "redis://127.0.0.1:$rport")"
  # The usage ledger (events.*, deletes) is kept by the in-process engine
  # only, until the Redis ledger lands: the SDK test skips those calls on
  # Redis, saying why.
  export CREDITGATE_TEST_LEDGER="$([ "$engine" = memory ] && echo 1 || echo 0)"
  before=$status
  .venv/bin/python -m pytest -q "$root/tests/sdk" -p no:cacheprovider || status=$?
  if [ -n "$run_js" ]; then
    NODE_PATH="$root/.venv/js/node_modules" node --test "$root/tests/sdk/js/" || status=$?
  fi
  if [ "$status" -ne "$before" ]; then
    echo "--- server log ($engine) ---"; cat "$tmp/server.log"
  fi
  stop_server
done
exit "$status"
