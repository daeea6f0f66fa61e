#!/usr/bin/env bash
# The API fuzzed against its own OpenAPI document: schemathesis (pinned
# 4.32.5, in the test venv) with every check, a fixed seed and example
# count, on a real `creditgate serve` over a private redis-server, with the
# application (api) key and then the admin key. Every status the server
# answers must be documented, every request the schema allows accepted or
# refused with a documented error, every response match its schema, no 5xx.
#
# Then the books: a few customers are seeded before the run; the 2xx answers
# the fuzzer got (from its HAR report) are replayed, in order, on a fresh
# server seeded the same way, and both servers must show the same balances
# for every seeded customer: nothing changed that was not answered 2xx.
#
# Usage: bash tests/fuzz/run.sh   (needs python3, redis-server, PyPI once)
# Env: CREDITGATE_BIN — a built creditgate binary (default: cargo build).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check schemathesis==4.32.5

bin="${CREDITGATE_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --quiet --bin creditgate
  bin="$root/target/debug/creditgate"
fi

tmp="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

free_port() {
  .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Starts a private redis-server and a creditgate on it; prints the port.
start_pair() {
  local name="$1" rport port
  rport="$(free_port)"
  mkdir -p "$tmp/$name"
  redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$tmp/$name" >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.05; done
  port="$(free_port)"
  {
    printf 'listen = "127.0.0.1:%s"\nredis_url = "redis://127.0.0.1:%s"\n' "$port" "$rport"
    printf 'api_keys = ["sk_fuzz_app"]\nadmin_keys = ["sk_fuzz_admin"]\n'
    grep -vE '^(listen|api_keys|admin_keys|log_format) ' examples/creditgate.toml
  } > "$tmp/$name/creditgate.toml"
  RUST_LOG=warn "$bin" serve --config "$tmp/$name/creditgate.toml" > "$tmp/$name/server.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do
    if .venv/bin/python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/readyz', timeout=1)" 2>/dev/null; then
      echo "$port"; return 0
    fi
    sleep 0.1
  done
  echo "creditgate ($name) did not become ready:" >&2; cat "$tmp/$name/server.log" >&2; exit 1
}

fuzzed="$(start_pair fuzzed)"
replayed="$(start_pair replayed)"
books=(.venv/bin/python tests/fuzz/books.py)
"${books[@]}" seed "http://127.0.0.1:$fuzzed"
"${books[@]}" seed "http://127.0.0.1:$replayed"

status=0
for key in sk_fuzz_app sk_fuzz_admin; do
  echo "--- schemathesis with the ${key#sk_fuzz_} key"
  .venv/bin/st --config-file tests/fuzz/schemathesis.toml run "http://127.0.0.1:$fuzzed/openapi.json" \
    --checks all --seed 42 --max-examples 50 --no-color --output-sanitize false \
    -H "Authorization: Bearer $key" \
    --report har --report-dir "$tmp/report-$key" || status=$?
done
if [ "$status" -ne 0 ]; then
  echo "--- server log"; cat "$tmp/fuzzed/server.log"
  exit "$status"
fi
echo "--- the books: replaying the fuzzer's 2xx answers on a fresh server"
"${books[@]}" compare "http://127.0.0.1:$fuzzed" "http://127.0.0.1:$replayed" \
  "$tmp"/report-sk_fuzz_app/*.json "$tmp"/report-sk_fuzz_admin/*.json
