#!/usr/bin/env bash
# Runs every test creditgate has: formatting and lints, the Rust tests (unit,
# scenarios on every engine, properties, the differential test, real Redis and
# Redis Cluster, TLS), then the real-client tests (the Autumn SDKs, nginx).
#
# It installs what is missing when it can (as root on Debian: redis-server,
# redis-tools, nginx-light, python3-venv, postgresql (the ledger tests start
# their own PostgreSQL as the `postgres` user), and nodejs + npm for the optional
# JavaScript SDK suite); otherwise it says exactly what to install. Every
# server a test needs is started by that test on loopback and stopped after.
#
# The creditgate binary is built once, by `cargo test` (the `test` profile),
# and that same binary is handed to the client tests as CREDITGATE_BIN: no
# second profile is compiled. Network: crates.io on the first build, PyPI
# for the Python SDK venv (.venv) and npm for autumn-js on their first run.
# Every step that is skipped says why.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v redis-server >/dev/null || need_pkgs+=(redis-server)
command -v redis-cli >/dev/null || need_pkgs+=(redis-tools)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_pkgs+=(nginx-light)
command -v curl >/dev/null || need_pkgs+=(curl)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_pkgs+=(python3-venv)
# tests/ledger_store.rs starts its own PostgreSQL from these binaries.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || [ -n "${PG_BIN:-}" ] || need_pkgs+=(postgresql)
# Optional: without them the JavaScript SDK suite is skipped (with a message).
opt_pkgs=()
if [ "${CREDITGATE_SDK_JS:-1}" != "0" ]; then
  command -v node >/dev/null || opt_pkgs+=(nodejs)
  command -v npm >/dev/null || opt_pkgs+=(npm)
fi
can_apt=""
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then can_apt=1; fi
if [ ${#need_pkgs[@]} -gt 0 ] || { [ ${#opt_pkgs[@]} -gt 0 ] && [ -n "$can_apt" ]; }; then
  if [ -n "$can_apt" ]; then
    apt-get update -qq
    if [ ${#need_pkgs[@]} -gt 0 ]; then
      echo "==> installing ${need_pkgs[*]}"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
    fi
    if [ ${#opt_pkgs[@]} -gt 0 ]; then
      echo "==> installing ${opt_pkgs[*]} (optional: the autumn-js suite)"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${opt_pkgs[@]}" >/dev/null ||
        echo "==> could not install ${opt_pkgs[*]}: the autumn-js suite will be skipped"
    fi
    # The packages start their own services; tests never use them.
    if command -v nginx >/dev/null; then nginx -s stop 2>/dev/null || true; fi
    if command -v pg_ctlcluster >/dev/null; then service postgresql stop >/dev/null 2>&1 || true; fi
  else
    echo "missing: ${need_pkgs[*]}. Install them (Debian: sudo apt-get install ${need_pkgs[*]}) and run again." >&2
    exit 1
  fi
fi
if [ ${#opt_pkgs[@]} -gt 0 ] && [ -z "$can_apt" ]; then
  echo "==> note: ${opt_pkgs[*]} not installed: the autumn-js suite will be skipped (Debian: sudo apt-get install nodejs npm)"
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings

echo "==> cargo test: build"
# The binary `cargo test` builds for the integration tests (CARGO_BIN_EXE_creditgate),
# found from cargo's own artifact messages.
bin="$(cargo test --no-run --message-format=json-render-diagnostics | python3 -c '
import json, sys
exe = ""
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and t.get("name") == "creditgate" \
            and "bin" in t.get("kind", []) and not m.get("profile", {}).get("test") and m.get("executable"):
        exe = m["executable"]
print(exe)
')"
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
  echo "cargo test --no-run built no creditgate binary" >&2
  exit 1
fi
echo "==> cargo test"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --quiet 2>&1 | tee "$log"
if grep -q "test result: FAILED" "$log"; then exit 1; fi

# The client tests reuse that binary instead of building their own.
export CREDITGATE_BIN="$bin"
for client_test in tests/sdk/run.sh tests/nginx/run.sh tests/fuzz/run.sh; do
  if [ ! -f "$client_test" ]; then
    echo "$client_test is missing" >&2
    exit 1
  fi
  echo "==> $client_test (creditgate: $bin)"
  if [ ! -x "$client_test" ]; then
    echo "==> note: $client_test has no exec bit; running it with bash"
  fi
  bash "$client_test"
done
echo "==> all tests passed"
