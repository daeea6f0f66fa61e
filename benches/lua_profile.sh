#!/usr/bin/env bash
# Time the check script inside Redis, apart from the network and the client:
# a private redis-server, one customer with N buckets in the credit system
# `credits`, `redis-benchmark` calling EVALSHA, and Redis's own
# `INFO commandstats` usec_per_call. Also times an empty script and the bare
# library (lib.lua + `return 1`) as baselines measured in the same run.
#
# Usage: benches/lua_profile.sh [N buckets, default 2]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-2}"
dir="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')"
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" >/dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
cli() { redis-cli -p "$port" "$@"; }
for _ in $(seq 1 100); do cli ping >/dev/null 2>&1 && break; sleep 0.05; done

# The worked example of lua/README.md: customer cus_1, its keys, the clock.
keys=('cg1:{cus_1}' 'cg1:{cus_1}:l' 'cg1:due:{3fj}')
head=(1798761600000 86400000 86400000 cus_1)
cli EVAL "$(cat lua/lib.lua lua/create_customer.lua)" 1 'cg1:{cus_1}' 1798761600000 >/dev/null
cli EVAL "$(cat lua/lib.lua lua/grant.lua)" 3 "${keys[@]}" "${head[@]}" credits '' pro 2000000 5 1 >/dev/null
for i in $(seq 2 "$n"); do
  cli EVAL "$(cat lua/lib.lua lua/grant.lua)" 3 "${keys[@]}" "${head[@]}" credits "top$i" '' 5000000000 0 >/dev/null
done

time_script() {
  local label="$1" body="$2" sha
  sha="$(cli SCRIPT LOAD "$body")"
  cli CONFIG RESETSTAT >/dev/null
  redis-benchmark -p "$port" -n 20000 -c 4 -q EVALSHA "$sha" 3 "${keys[@]}" "${head[@]}" \
    premium_message 10000 3 premium_message 1000000 credits 10000000 >/dev/null 2>&1
  printf '%-28s %s\n' "$label" "$(cli INFO commandstats | grep '^cmdstat_evalsha' | grep -o 'usec_per_call=[0-9.]*')"
}
echo "check on a customer with $n buckets (µs inside Redis per call):"
time_script "empty script" "return 1"
time_script "lib.lua alone" "$(cat lua/lib.lua; echo 'return 1')"
time_script "check.lua" "$(cat lua/lib.lua lua/check.lua)"
