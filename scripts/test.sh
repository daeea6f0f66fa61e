#!/usr/bin/env bash
# Runs every test creditgate has: formatting and lints, the Rust tests (unit,
# scenarios on every engine, properties, the differential test, real Redis and
# Redis Cluster), then the real-client tests (the Autumn SDKs, nginx).
#
# It installs what is missing when it can (as root on Debian: redis-server,
# nginx, python3-venv); otherwise it says exactly what to install. Every
# server a test needs is started by that test on loopback and stopped after.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v redis-server >/dev/null || need_pkgs+=(redis-server)
command -v redis-cli >/dev/null || need_pkgs+=(redis-tools)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_pkgs+=(nginx-light)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_pkgs+=(python3-venv)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "==> installing ${need_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
    # The packages start their own services; tests never use them.
    if command -v nginx >/dev/null; then nginx -s stop 2>/dev/null || true; fi
  else
    echo "missing: ${need_pkgs[*]}. Install them (Debian: sudo apt-get install ${need_pkgs[*]}) and run again." >&2
    exit 1
  fi
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
echo "==> cargo test"
cargo test --quiet 2>&1 | tee target/cargo-test.log
if grep -q "test result: FAILED" target/cargo-test.log; then exit 1; fi

for client_test in tests/sdk/run.sh tests/nginx/run.sh; do
  if [ -x "$client_test" ]; then
    echo "==> $client_test"
    "$client_test"
  fi
done
echo "==> all tests passed"
