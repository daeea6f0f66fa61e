#!/usr/bin/env bash
# What each cg2 function costs inside Redis, against the minimal two-bucket
# script, on a private redis-server (never the one on 6379).
#
#   benches/fcall_cost.sh           time table (µs inside Redis, × minimal)
#   benches/fcall_cost.sh memory    bytes per customer and per idempotency record
#   benches/fcall_cost.sh ledger    the ledger's share of a consuming check (paired rounds)
#
# Time: each operation's exact FCALL is replayed N times (env N, default
# 20000) by redis-benchmark on one connection (-c 1); Redis's own
# `INFO commandstats` usec_per_call is read after the series, with
# `CONFIG RESETSTAT` before it. The minimal script
# (../shared/baselines/two_bucket_hash.lua, env BASELINE) runs by EVALSHA
# before and after every series; "× minimal" divides by the mean of the two.
# Rows whose call changes what the next call sees (a due reset happens once
# per customer) run one FCALL per seeded customer instead, all on one
# connection (redis-cli --pipe). The cg1 scripts (tests/fixtures/cg1:
# lib.lua + operation, by EVALSHA) run on the same server for the "before"
# rows.
#
# Memory: used_memory difference (fresh server, jemalloc) for C customers
# (env C, default 100000; ids cus_00000000000000, 18 characters) holding one
# monthly and one one-off bucket (api_call 1000 monthly, credits 500 one-off,
# generated balance ids), per customer, for cg1 and cg2; then idempotency
# records with 36-character keys (tracks of 1 api_call with overflow: one entry each), per record, for
# several records-per-customer spreads.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-time}"
N="${N:-20000}"
C="${C:-100000}"
BASELINE="${BASELINE:-$(cd .. && pwd)/shared/baselines/two_bucket_hash.lua}"
LIB=lua/creditgate.lua

# The version is in line 1 (library name) and line 2 (function prefix);
# src/engine/redis/library.rs holds the two equal in a unit test too.
lib_name="$(head -1 "$LIB" | sed -n 's/^#!lua name=\(.*\)$/\1/p')"
prefix="$(sed -n "2s/^local FN = '\([^']*\)'.*/\1/p" "$LIB")"
if [ "creditgate_${prefix%_}" != "$lib_name" ]; then
  echo "$LIB: library name '$lib_name' and function prefix '$prefix' disagree" >&2
  exit 1
fi

dir="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')"
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" >"$dir/log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
cli() { redis-cli -p "$port" "$@"; }
for _ in $(seq 1 100); do cli ping >/dev/null 2>&1 && break; sleep 0.05; done
cli -x FUNCTION LOAD REPLACE <"$LIB" >/dev/null

# RESP for redis-cli --pipe: one command per line of tab-separated words
# on stdin ('' words written as an empty field).
resp() {
  python3 -c '
import sys
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    w = line.rstrip(b"\n").split(b"\t")
    out.write(b"*%d\r\n" % len(w))
    for x in w:
        out.write(b"$%d\r\n%s\r\n" % (len(x), x))
'
}
pipe() { resp | cli --pipe >/dev/null; }

# The keys of a customer (ids here need no escaping; the due tag of the
# customer's slot is the first base-36 string of that slot).
keys_of() {
  python3 - "$@" <<'EOF'
import sys
def crc16(d):
    c = 0
    for b in d:
        c ^= b << 8
        for _ in range(8):
            c = ((c << 1) ^ 0x1021) & 0xFFFF if c & 0x8000 else (c << 1) & 0xFFFF
    return c
want = {crc16(a.encode()) % 16384 for a in sys.argv[2:]}
tags, n = {}, 0
D = "0123456789abcdefghijklmnopqrstuvwxyz"
while want - tags.keys():
    s, m = "", n
    while True:
        s = D[m % 36] + s; m //= 36
        if m == 0: break
    tags.setdefault(crc16(s.encode()) % 16384, s); n += 1
L = sys.argv[1]
for a in sys.argv[2:]:
    print("%s:{%s}\t%s:{%s}:l\t%s:due:{%s}" % (L, a, L, a, L, tags[crc16(a.encode()) % 16384]))
EOF
}

# action1 at 0.2 credits per unit, credit system `credits` (the issue's
# words; examples/creditgate.toml calls it ai_credits): cg1 takes a count
# first, cg2 the pairs alone.
CREDITS_POOLS=(2 action1 1000000 credits 200000)
PAIRS=(action1 1000000 credits 200000)
RET=(86400000 86400000)

if [ "$mode" = memory ]; then
  used() { cli INFO memory | sed -n 's/^used_memory:\([0-9]*\).*/\1/p'; }
  ids() { python3 -c "import sys; [print('cus_%014d' % i) for i in range(int(sys.argv[1]))]" "$1"; }
  # customers: layout, create/grant commands
  seed_customers() {
    local layout="$1"
    ids "$C" | python3 -c '
import sys
L = sys.argv[1]
lib = open("tests/fixtures/cg1/lib.lua").read()
def crc16(d):
    c = 0
    for b in d:
        c ^= b << 8
        for _ in range(8):
            c = ((c << 1) ^ 0x1021) & 0xFFFF if c & 0x8000 else (c << 1) & 0xFFFF
    return c
D = "0123456789abcdefghijklmnopqrstuvwxyz"
tags, n = {}, 0
while len(tags) < 16384:
    s, m = "", n
    while True:
        s = D[m % 36] + s; m //= 36
        if m == 0: break
    tags.setdefault(crc16(s.encode()) % 16384, s); n += 1
import hashlib
sha = {}
if L == "cg1":
    for op in ("create_customer", "grant"):
        body = (lib + open("tests/fixtures/cg1/%s.lua" % op).read()).rstrip("\n")
        sha[op] = hashlib.sha1(body.encode()).hexdigest()
for cid in sys.stdin.read().split():
    k = "%s:{%s}" % (L, cid)
    ks = [k, k + ":l", "%s:due:{%s}" % (L, tags[crc16(cid.encode()) % 16384])]
    h = ["", "86400000", "86400000", cid]
    g1 = h + ["api_call", "", "", "10000000", "5", "1"]
    g2 = h + ["credits", "", "", "5000000", "0"]
    h2 = ["", ""]
    k2 = [ks[0], ks[2]]
    if L == "cg1":
        print("\t".join(["EVALSHA", sha["create_customer"], "1", k, ""]))
        print("\t".join(["EVALSHA", sha["grant"], "3"] + ks + g1))
        print("\t".join(["EVALSHA", sha["grant"], "3"] + ks + g2))
    else:
        print("\t".join(["FCALL", "cg2_v7_create_customer", "1", k, ""]))
        print("\t".join(["FCALL", "cg2_v7_grant", "2"] + k2 + h2 + g1[4:]))
        print("\t".join(["FCALL", "cg2_v7_grant", "2"] + k2 + h2 + g2[4:]))
' "$layout" | pipe
  }
  for layout in cg1 cg2; do
    cli FLUSHALL >/dev/null
    if [ "$layout" = cg1 ]; then
      for op in create_customer grant; do cli SCRIPT LOAD "$(cat tests/fixtures/cg1/lib.lua "tests/fixtures/cg1/$op.lua")" >/dev/null; done
    fi
    before=$(used)
    seed_customers "$layout"
    after=$(used)
    n=$(cli DBSIZE)
    k="$layout:{cus_00000000000000}"
    printf '%s: %d customers, %d keys: %.1f bytes per customer (sample %s: %s, %s)\n' "$layout" "$C" "$n" \
      "$(echo "($after - $before) / $C" | bc -l)" "$k" "$(cli OBJECT ENCODING "$k")" \
      "$(cli MEMORY USAGE "$k") B by MEMORY USAGE"
  done
  # Idempotency records: R records spread over P customers (cg2; cg1 for comparison).
  for spread in "1000 100" "100 1000" "10000 10" "1 100000" "100000 1"; do
    set -- $spread
    P=$1; R=$2
    for layout in cg2 cg1; do
      cli FLUSHALL >/dev/null
      for op in create_customer grant apply; do cli SCRIPT LOAD "$(cat tests/fixtures/cg1/lib.lua "tests/fixtures/cg1/$op.lua")" >/dev/null; done
      C=$P seed_customers "$layout"
      before=$(used)
      python3 - "$layout" "$P" "$R" <<'EOF' | pipe
import sys, hashlib
L, P, R = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lib = open("tests/fixtures/cg1/lib.lua").read()
sha = hashlib.sha1((lib + open("tests/fixtures/cg1/apply.lua").read()).rstrip("\n").encode()).hexdigest()
def crc16(d):
    c = 0
    for b in d:
        c ^= b << 8
        for _ in range(8):
            c = ((c << 1) ^ 0x1021) & 0xFFFF if c & 0x8000 else (c << 1) & 0xFFFF
    return c
D = "0123456789abcdefghijklmnopqrstuvwxyz"
tags, n = {}, 0
while len(tags) < 16384:
    s, m = "", n
    while True:
        s = D[m % 36] + s; m //= 36
        if m == 0: break
    tags.setdefault(crc16(s.encode()) % 16384, s); n += 1
import uuid, random
rnd = random.Random(7)
for j in range(R):
    for i in range(P):
        cid = "cus_%014d" % i
        k = "%s:{%s}" % (L, cid)
        ks = [k, k + ":l", "%s:due:{%s}" % (L, tags[crc16(cid.encode()) % 16384])]
        key = str(uuid.UUID(int=rnd.getrandbits(128)))  # 36 characters
        a = ["", "86400000", "86400000", cid, "track", key, "api_call", "10000", "overflow", "", "", "1", "api_call", "1000000"]
        if L == "cg1":
            print("\t".join(["EVALSHA", sha, "3"] + ks + a))
        else:
            print("\t".join(["FCALL", "cg2_v7_track", "2", ks[0], ks[2], "", "", key, "api_call", "10000", "overflow", "api_call", "1000000"]))
EOF
      after=$(used)
      printf '%s: %6d customers x %6d records (36-char keys): %.1f bytes per record\n' "$layout" "$P" "$R" \
        "$(echo "($after - $before) / ($P * $R)" | bc -l)"
    done
  done
  exit 0
fi

# ---------------------------------------------------------------- time
[ -f "$BASELINE" ] || { echo "no baseline script at $BASELINE (set BASELINE)" >&2; exit 1; }
min_sha="$(cli SCRIPT LOAD "$(cat "$BASELINE")")"
cli HSET '{cus_min}:credits' monthly 100000000000000 oneoff 100000000000000 >/dev/null
declare -A CG1
for op in create_customer grant check apply reset_due; do
  CG1[$op]="$(cli SCRIPT LOAD "$(cat tests/fixtures/cg1/lib.lua "tests/fixtures/cg1/$op.lua")")"
done

# seed <layout> <customer> <now> <n extra buckets>: one monthly and one one-off
# bucket of credits (large enough for every series), plus n one-off buckets
# of features f01.. (one each).
seed() {
  local L="$1" id="$2" now="$3" extra="$4" k1 k2 k3
  IFS=$'\t' read -r k1 k2 k3 < <(keys_of "$L" "$id")
  local h=("$now" "${RET[@]}" "$id")
  if [ "$L" = cg2 ]; then
    cli FCALL cg2_v7_create_customer 1 "$k1" "$now" >/dev/null
    cli FCALL cg2_v7_grant 2 "$k1" "$k3" "$now" '' credits '' '' 100000000000 5 1 >/dev/null
    cli FCALL cg2_v7_grant 2 "$k1" "$k3" "$now" '' credits '' '' 50000000000 0 >/dev/null
    for i in $(seq 1 "$extra"); do
      cli FCALL cg2_v7_grant 2 "$k1" "$k3" "$now" '' "$(printf 'f%02d' "$i")" '' '' 5000000 0 >/dev/null
    done
  else
    cli EVALSHA "${CG1[create_customer]}" 1 "$k1" "$now" >/dev/null
    cli EVALSHA "${CG1[grant]}" 3 "$k1" "$k2" "$k3" "${h[@]}" credits '' '' 100000000000 5 1 >/dev/null
    cli EVALSHA "${CG1[grant]}" 3 "$k1" "$k2" "$k3" "${h[@]}" credits '' '' 50000000000 0 >/dev/null
    for i in $(seq 1 "$extra"); do
      cli EVALSHA "${CG1[grant]}" 3 "$k1" "$k2" "$k3" "${h[@]}" "$(printf 'f%02d' "$i")" '' '' 5000000 0 >/dev/null
    done
  fi
}

stat_of() { cli INFO commandstats | sed -n "s/^cmdstat_$1:.*usec_per_call=\([0-9.]*\).*/\1/p"; }

# Best of R series (env R, default 3): a shared machine only ever adds time.
R="${R:-3}"
best() { tr ' ' '\n' | grep . | sort -n | head -1; }

minimal() {
  local all=""
  for _ in $(seq 1 "$R"); do
    cli CONFIG RESETSTAT >/dev/null
    redis-benchmark -p "$port" -n "$N" -c 1 -q EVALSHA "$min_sha" 1 '{cus_min}:credits' 1 >/dev/null 2>&1
    all="$all $(stat_of evalsha)"
  done
  echo "$all" | best
}

# row <label> <command words...>: the command replayed N times.
declare -a ROWS LEDGER_MEM
row() {
  local label="$1" cmd="$2"; shift 2
  local m1 m2 t
  m1="$(minimal)"
  local all=""
  for _ in $(seq 1 "$R"); do
    cli CONFIG RESETSTAT >/dev/null
    redis-benchmark -p "$port" -n "$N" -c 1 -q -r 100000000000 "$cmd" "$@" >/dev/null 2>&1
    all="$all $(stat_of "$(echo "$cmd" | tr 'A-Z' 'a-z')")"
  done
  t="$(echo "$all" | best)"
  m2="$(minimal)"
  ROWS+=("$(printf '%-58s %8.2f %8.2f %7.1f' "$label" "$t" "$(echo "($m1 + $m2) / 2" | bc -l)" "$(echo "$t * 2 / ($m1 + $m2)" | bc -l)")")
}

# piped <label> <cmd> <file of commands, one per customer>: one call per line.
piped() {
  local label="$1" cmd="$2" file="$3"
  local m1 m2 t
  m1="$(minimal)"
  cli CONFIG RESETSTAT >/dev/null
  resp <"$file" | cli --pipe >/dev/null
  t="$(stat_of "$(echo "$cmd" | tr 'A-Z' 'a-z')")"
  m2="$(minimal)"
  ROWS+=("$(printf '%-58s %8.2f %8.2f %7.1f' "$label" "$t" "$(echo "($m1 + $m2) / 2" | bc -l)" "$(echo "$t * 2 / ($m1 + $m2)" | bc -l)")")
}

for L in cg1 cg2; do
  seed "$L" cus_warm '' 0
  seed "$L" cus_2b '' 0
  seed "$L" cus_32b '' 30
  seed "$L" cus_dry '' 0
  seed "$L" cus_trk '' 0
done
# The same customer as cus_2b with one window limit armed (issue 13): at most
# 10^8 units of action1 a minute (never reached here), so every call takes
# the limit's room and writes its counter.
seed cg2 cus_lim '' 0
IFS=$'\t' read -r l1 l2 l3 < <(keys_of cg2 cus_lim)
cli FCALL cg2_v7_set_limits 2 "$l1" "$l3" '' '' '' "$(printf 'action1:minute\037action1\037f\037\037r\0371\037\037cre66i9s')" >/dev/null
# The same customers with the ledger on (issue 14): the retention argument's
# third part is the stream cap (10^9 here: never reached), so every call
# also checks the slot stream's length and appends its entry.
seed cg2 cus_led '' 0
seed cg2 cus_ledlim '' 0
IFS=$'\t' read -r e1 e2 e3 < <(keys_of cg2 cus_led)
IFS=$'\t' read -r f1 f2 f3 < <(keys_of cg2 cus_ledlim)
cli FCALL cg2_v7_set_limits 2 "$f1" "$f3" '' '' '' "$(printf 'action1:minute\037action1\037f\037\037r\0371\037\037cre66i9s')" >/dev/null
LEDGER_RET=86400000,86400000,1000000000
IFS=$'\t' read -r a1 a2 a3 < <(keys_of cg2 cus_2b)
IFS=$'\t' read -r b1 b2 b3 < <(keys_of cg2 cus_32b)
IFS=$'\t' read -r c1 c2 c3 < <(keys_of cg2 cus_dry)
IFS=$'\t' read -r d1 d2 d3 < <(keys_of cg2 cus_trk)
IFS=$'\t' read -r x1 x2 x3 < <(keys_of cg1 cus_2b)
IFS=$'\t' read -r y1 y2 y3 < <(keys_of cg1 cus_32b)
IFS=$'\t' read -r z1 z2 z3 < <(keys_of cg1 cus_dry)
H=('' "${RET[@]}")
# Warm-up (not reported): the first series after seeding runs slower.
IFS=$'\t' read -r w1 w2 w3 < <(keys_of cg2 cus_warm)
minimal >/dev/null
redis-benchmark -p "$port" -n "$N" -c 1 -q FCALL cg2_v7_consume 2 "$w1" "$w3" '' '' '' action1 10000 "${PAIRS[@]}" >/dev/null 2>&1

if [ "$mode" = ledger ]; then
  # The ledger's share, paired: R rounds, each one series of the minimal
  # script and of every row below, interleaved, so the rows share the
  # machine's moment; best of the R per row (a shared machine only adds).
  once() { # once <cmd words...>: one series of N, Redis µs per call
    local cmd="$1"
    cli CONFIG RESETSTAT >/dev/null
    redis-benchmark -p "$port" -n "$N" -c 1 -q "$@" >/dev/null 2>&1
    stat_of "$(echo "$cmd" | tr 'A-Z' 'a-z')"
  }
  declare -A BEST
  names=(minimal off on limit_off limit_on)
  for _ in $(seq 1 "$R"); do
    for name in "${names[@]}"; do
      case $name in
        minimal) t=$(once EVALSHA "$min_sha" 1 '{cus_min}:credits' 1) ;;
        off) t=$(once FCALL cg2_v7_consume 2 "$a1" "$a3" '' '' '' action1 10000 "${PAIRS[@]}") ;;
        on) t=$(once FCALL cg2_v7_consume 2 "$e1" "$e3" '' "$LEDGER_RET" '' action1 10000 "${PAIRS[@]}") ;;
        limit_off) t=$(once FCALL cg2_v7_consume 2 "$l1" "$l3" '' '' '' action1 10000 "${PAIRS[@]}") ;;
        limit_on) t=$(once FCALL cg2_v7_consume 2 "$f1" "$f3" '' "$LEDGER_RET" '' action1 10000 "${PAIRS[@]}") ;;
      esac
      BEST[$name]="$(printf '%s\n%s\n' "${BEST[$name]:-$t}" "$t" | sort -n | head -1)"
    done
  done
  echo "redis $(cli INFO server | sed -n 's/^redis_version:\([0-9.]*\).*/\1/p'), $lib_name, N=$N calls per series, best of R=$R interleaved rounds"
  printf '%-52s %8s %7s %9s\n' "consuming check, 2 buckets" "µs" "×min" "ledger +"
  printf '%-52s %8.2f %7s\n' "minimal script (EVALSHA)" "${BEST[minimal]}" ""
  for pair in "off on" "limit_off limit_on"; do
    set -- $pair
    for name in "$1" "$2"; do
      extra=""
      [ "$name" = "$2" ] && extra="$(printf '%+.2f µs (%+.0f%%)' "$(echo "${BEST[$2]} - ${BEST[$1]}" | bc -l)" "$(echo "(${BEST[$2]} / ${BEST[$1]} - 1) * 100" | bc -l)")"
      printf '%-52s %8.2f %7.2f %s\n' "$name" "${BEST[$name]}" "$(echo "${BEST[$name]} / ${BEST[minimal]}" | bc -l)" "$extra"
    done
  done
  exit 0
fi

row "cg2 consuming check, 2 buckets" FCALL cg2_v7_consume 2 "$a1" "$a3" '' '' '' action1 10000 "${PAIRS[@]}"
row "cg2 consuming check with one window limit, 2 buckets" FCALL cg2_v7_consume 2 "$l1" "$l3" '' '' '' action1 10000 "${PAIRS[@]}"
row "cg2 consuming check, ledger on, 2 buckets" FCALL cg2_v7_consume 2 "$e1" "$e3" '' "$LEDGER_RET" '' action1 10000 "${PAIRS[@]}"
row "cg2 consuming check, ledger on, one window limit, 2 buckets" FCALL cg2_v7_consume 2 "$f1" "$f3" '' "$LEDGER_RET" '' action1 10000 "${PAIRS[@]}"
row "cg2 consuming check, 2 + 30 untouched buckets" FCALL cg2_v7_consume 2 "$b1" "$b3" '' '' '' action1 10000 "${PAIRS[@]}"
row "cg2 check (dry run), 2 buckets" FCALL cg2_v7_check 2 "$c1" "$c3" '' '' action1 10000 "${PAIRS[@]}"
row "cg2 track, fresh 36-char idempotency key, 2 buckets" FCALL cg2_v7_track 2 "$d1" "$d3" '' '' "k-__rand_int__-0123456789abcdefghijklm" action1 10000 cap "${PAIRS[@]}"
row "cg2 balances, 2 buckets" FCALL cg2_v7_balances 2 "$a1" "$a3" '' ''
row "cg2 balances, 32 buckets" FCALL cg2_v7_balances 2 "$b1" "$b3" '' ''
row "cg1 consuming check, 2 buckets (before)" EVALSHA "${CG1[apply]}" 3 "$x1" "$x2" "$x3" "${H[@]}" cus_2b consume '' action1 10000 '' '' '' "${CREDITS_POOLS[@]}"
row "cg1 consuming check, 2 + 30 untouched buckets (before)" EVALSHA "${CG1[apply]}" 3 "$y1" "$y2" "$y3" "${H[@]}" cus_32b consume '' action1 10000 '' '' '' "${CREDITS_POOLS[@]}"
row "cg1 check (dry run), 2 buckets (before)" EVALSHA "${CG1[check]}" 3 "$z1" "$z2" "$z3" "${H[@]}" cus_dry action1 10000 "${CREDITS_POOLS[@]}"

# Due resets: D customers per row (env D, default 5000), each seeded at T0
# with its monthly bucket and checked once, 1 or 1000 months later.
D="${D:-5000}"
T0=1798761600000 # 2027-01-01
for missed in 1 1000; do
  for L in cg2 cg1; do
    python3 - "$L" "$D" "$T0" "$missed" "${CG1[create_customer]}" "${CG1[grant]}" "${CG1[check]}" \
      >"$dir/seed" 3>"$dir/calls" <<'EOF'
import sys, os
L, D, T0, missed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
sha_c, sha_g, sha_k = sys.argv[5:8]
def crc16(d):
    c = 0
    for b in d:
        c ^= b << 8
        for _ in range(8):
            c = ((c << 1) ^ 0x1021) & 0xFFFF if c & 0x8000 else (c << 1) & 0xFFFF
    return c
D36 = "0123456789abcdefghijklmnopqrstuvwxyz"
tags, n = {}, 0
while len(tags) < 16384:
    s, m = "", n
    while True:
        s = D36[m % 36] + s; m //= 36
        if m == 0: break
    tags.setdefault(crc16(s.encode()) % 16384, s); n += 1
def add_months(t, months):  # src/calendar.rs, for a first-of-month midnight anchor
    DAY = 86400000
    days = t // DAY
    z = days + 719468; era = z // 146097; doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100); mp = (5 * doy + 2) // 153
    m = mp + 3 if mp < 10 else mp - 9; y = yoe + era * 400 + (1 if m <= 2 else 0)
    tot = y * 12 + (m - 1) + months; ny, nm = tot // 12, tot % 12 + 1
    y2 = ny - 1 if nm <= 2 else ny; era = y2 // 400; yoe = y2 - era * 400
    mp = (nm + 9) % 12; doy = (153 * mp + 2) // 5
    return (era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468) * DAY
now = add_months(T0, missed) + 1000
calls = os.fdopen(3, "w")
for i in range(D):
    cid = "due%d_%06d" % (missed, i)
    k = "%s:{%s}" % (L, cid)
    ks = [k, k + ":l", "%s:due:{%s}" % (L, tags[crc16(cid.encode()) % 16384])]
    h = [str(T0), "86400000", "86400000", cid]
    g1 = h + ["credits", "", "", "100000000000", "5", "1"]
    g2 = h + ["credits", "", "", "50000000000", "0"]
    chk = [str(now), "86400000", "86400000", cid, "action1", "10000", "2", "action1", "1000000", "credits", "200000"]
    if L == "cg2":
        print("\t".join(["FCALL", "cg2_v7_create_customer", "1", k, str(T0)]))
        h2 = [ks[0], ks[2], str(T0), ""]
        print("\t".join(["FCALL", "cg2_v7_grant", "2"] + h2 + g1[4:]))
        print("\t".join(["FCALL", "cg2_v7_grant", "2"] + h2 + g2[4:]))
        calls.write("\t".join(["FCALL", "cg2_v7_check", "2", ks[0], ks[2], str(now), "", "action1", "10000", "action1", "1000000", "credits", "200000"]) + "\n")
    else:
        print("\t".join(["EVALSHA", sha_c, "1", k, str(T0)]))
        print("\t".join(["EVALSHA", sha_g, "3"] + ks + g1))
        print("\t".join(["EVALSHA", sha_g, "3"] + ks + g2))
        calls.write("\t".join(["EVALSHA", sha_k, "3"] + ks + chk) + "\n")
EOF
    resp <"$dir/seed" | cli --pipe >/dev/null
    if [ "$L" = cg2 ]; then
      piped "cg2 check, monthly bucket due ($missed missed period(s))" FCALL "$dir/calls"
    else
      piped "cg1 check, monthly bucket due ($missed missed period(s)) (before)" EVALSHA "$dir/calls"
    fi
  done
done

# Redis memory per entry buffered in a ledger stream (the entries the
# ledger rows above appended, not drained): MEMORY USAGE / XLEN.
for who in "$e3" "$f3"; do
  st="$who:ledger"
  n="$(cli XLEN "$st")"
  b="$(cli MEMORY USAGE "$st" SAMPLES 0)"
  LEDGER_MEM+=("$(printf '%s: %d entries, %d bytes: %.1f bytes per buffered entry (entry string %d bytes)' "$st" "$n" "$b" \
    "$(echo "$b / $n" | bc -l)" "$(cli --raw XRANGE "$st" - + COUNT 1 | tail -n 1 | wc -c)")")
done
# An idle drain round over every slot's stream: 16,384 XLEN (in pipelines
# of 1,024, as src/ledger/drain.rs sends them), Redis time per round.
python3 - <<'EOF' >"$dir/xlen"
# keys_of's rule, for every slot: the first base-36 string of each.
def crc16(d):
    c = 0
    for b in d:
        c ^= b << 8
        for _ in range(8):
            c = ((c << 1) ^ 0x1021) & 0xFFFF if c & 0x8000 else (c << 1) & 0xFFFF
    return c
D, tags, n = "0123456789abcdefghijklmnopqrstuvwxyz", {}, 0
while len(tags) < 16384:
    s, m = "", n
    while True:
        s = D[m % 36] + s; m //= 36
        if m == 0: break
    tags.setdefault(crc16(s.encode()) % 16384, s); n += 1
print("\n".join("XLEN\tcg2:due:{%s}:ledger" % tags[i] for i in range(16384)))
EOF
cli CONFIG RESETSTAT >/dev/null
resp <"$dir/xlen" | cli --pipe >/dev/null
xlen_us="$(stat_of xlen)"
xlen_calls="$(cli INFO commandstats | sed -n 's/^cmdstat_xlen:calls=\([0-9]*\),.*/\1/p')"

echo "redis $(cli INFO server | sed -n 's/^redis_version:\([0-9.]*\).*/\1/p'), $lib_name, N=$N calls per series, best of R=$R series, D=$D customers per due row (one series)"
printf '%-58s %8s %8s %7s\n' "operation" "µs" "minimal" "×min"
for r in "${ROWS[@]}"; do echo "$r"; done
echo
for r in "${LEDGER_MEM[@]}"; do echo "$r"; done
printf 'idle drain round over every slot (%d XLEN): %.2f µs per XLEN, %.1f ms of Redis per round\n' "$xlen_calls" "$xlen_us" \
  "$(echo "$xlen_us * $xlen_calls / 1000" | bc -l)"
