#!/usr/bin/env bash
# The two limit rows of benches/fcall_cost.sh alone, interleaved R times on a
# private redis-server: the consuming check without and with one window limit
# armed, best of R series each, and their ratio (issue 13's 1.3x bar).
#   bash benches/limit_cost.sh [LIB=lua/creditgate.lua] [R=7] [N=20000]
set -euo pipefail
cd "$(dirname "$0")/.."
LIB="${1:-lua/creditgate.lua}"; R="${2:-7}"; N="${3:-20000}"
prefix="$(sed -n "2s/^local FN = '\([^']*\)'.*/\1/p" "$LIB")"
dir="$(mktemp -d)"; port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" >"$dir/log" 2>&1 &
pid=$!; trap 'kill $pid; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
cli() { redis-cli -p "$port" "$@"; }
for _ in $(seq 1 100); do cli ping >/dev/null 2>&1 && break; sleep 0.05; done
cli -x FUNCTION LOAD REPLACE <"$LIB" >/dev/null
# keys: cg2:{cus_x} and due key with tag of the slot: reuse bench's python
keys() { python3 - "$1" <<'P'
import sys
def crc16(d):
    c = 0
    for b in d:
        c ^= b << 8
        for _ in range(8):
            c = ((c << 1) ^ 0x1021) & 0xFFFF if c & 0x8000 else (c << 1) & 0xFFFF
    return c
D="0123456789abcdefghijklmnopqrstuvwxyz"
a=sys.argv[1]; want=crc16(a.encode())%16384; n=0
while True:
    s,m="",n
    while True:
        s=D[m%36]+s; m//=36
        if m==0: break
    if crc16(s.encode())%16384==want: break
    n+=1
print("cg2:{%s} cg2:due:{%s}"%(a,s))
P
}
seed() { local k d; read -r k d < <(keys "$1")
  cli FCALL ${prefix}create_customer 1 "$k" '' >/dev/null
  cli FCALL ${prefix}grant 2 "$k" "$d" '' '' credits '' '' 100000000000 5 1 >/dev/null
  cli FCALL ${prefix}grant 2 "$k" "$d" '' '' credits '' '' 50000000000 0 >/dev/null
  echo "$k $d"; }
read -r a1 a3 < <(seed cus_2b)
read -r l1 l3 < <(seed cus_lim)
cli FCALL ${prefix}set_limits 2 "$l1" "$l3" '' '' '' "$(printf 'action1:minute\037action1\037f\037\037r\0371\037\037cre66i9s')" >/dev/null
PAIRS=(action1 1000000 credits 200000)
st() { cli INFO commandstats | sed -n "s/^cmdstat_fcall:.*usec_per_call=\([0-9.]*\).*/\1/p"; }
one() { cli CONFIG RESETSTAT >/dev/null; redis-benchmark -p "$port" -n "$N" -c 1 -q FCALL ${prefix}consume 2 "$1" "$2" '' '' '' action1 10000 "${PAIRS[@]}" >/dev/null 2>&1; st; }
one "$a1" "$a3" >/dev/null
P=""; L=""
for _ in $(seq 1 "$R"); do P="$P $(one "$a1" "$a3")"; L="$L $(one "$l1" "$l3")"; done
bp=$(echo $P | tr ' ' '\n' | sort -n | head -1); bl=$(echo $L | tr ' ' '\n' | sort -n | head -1)
echo "plain: $P"; echo "limit: $L"
echo "best plain $bp limit $bl ratio $(echo "$bl / $bp" | bc -l | cut -c1-5)"
