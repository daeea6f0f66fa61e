#!/usr/bin/env bash
# A real nginx with auth_request in front of a tiny counting upstream, asking
# a real `creditgate serve` on a private redis-server before every request.
#
# Usage: bash tests/nginx/run.sh   (from anywhere; needs nginx with the
# auth_request module — Debian's nginx-light has it —, redis-server, curl,
# python3, and cargo unless CREDITGATE_BIN names the creditgate binary to
# test: scripts/test.sh passes the one `cargo test` built)
#
# Shows: allowed requests reach the upstream; a denied one gets 429 with
# Retry-After and the RateLimit headers and never reaches it; the upstream's
# count and the customer's balance move by exactly the allowed requests' cost;
# headers the client forges never reach the gate. Everything started here is
# stopped on exit. Ends with "N passed, M failed" (exit 1 when M > 0).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

nginx_bin=""
if command -v nginx >/dev/null 2>&1; then
  nginx_bin="$(command -v nginx)"
elif [ -x /usr/sbin/nginx ]; then
  nginx_bin=/usr/sbin/nginx
else
  echo "tests/nginx/run.sh: nginx not found (neither \`nginx\` on PATH nor /usr/sbin/nginx)." >&2
  echo "Install it first, e.g. as root on Debian: apt-get install -y nginx-light" >&2
  exit 1
fi
for tool in curl python3 redis-server redis-cli; do
  command -v "$tool" >/dev/null 2>&1 || { echo "tests/nginx/run.sh: $tool not found" >&2; exit 1; }
done

if [ -n "${CREDITGATE_BIN:-}" ]; then
  bin="$CREDITGATE_BIN"
  [ -x "$bin" ] || { echo "tests/nginx/run.sh: CREDITGATE_BIN=$bin is not an executable" >&2; exit 1; }
else
  command -v cargo >/dev/null 2>&1 || { echo "tests/nginx/run.sh: cargo not found (or set CREDITGATE_BIN)" >&2; exit 1; }
  (cd "$root" && cargo build --quiet --bin creditgate) || { echo "tests/nginx/run.sh: cargo build failed" >&2; exit 1; }
  bin="$root/target/debug/creditgate"
fi

tmp="$(mktemp -d)"
# nginx workers may run as another user when started as root.
chmod 755 "$tmp"
app_pid="" gate_pid="" nginx_pid="" redis_pid=""
stop() {
  local pid="$1"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
}
cleanup() {
  stop "$nginx_pid"
  stop "$gate_pid"
  stop "$app_pid"
  stop "$redis_pid"
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Bounded polling: up to ~10 s for a process to come up.
wait_for() {
  local what="$1" pid="$2" cond="$3" log="$4"
  for _ in $(seq 1 100); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "tests/nginx/run.sh: $what exited early:" >&2; cat "$log" >&2; exit 1
    fi
    if eval "$cond"; then return 0; fi
    sleep 0.1
  done
  echo "tests/nginx/run.sh: $what did not come up:" >&2; cat "$log" >&2; exit 1
}

# --- the upstream -----------------------------------------------------------
python3 "$here/upstream.py" "$tmp/app.port" > "$tmp/app.log" 2>&1 &
app_pid=$!
wait_for upstream "$app_pid" '[ -s "$tmp/app.port" ]' "$tmp/app.log"
app_port="$(cat "$tmp/app.port")"

# --- redis (creditgate's store) ----------------------------------------------
redis_port="$(free_port)"
mkdir -p "$tmp/redis"
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$tmp/redis" \
  > "$tmp/redis.log" 2>&1 &
redis_pid=$!
wait_for redis-server "$redis_pid" 'redis-cli -p "$redis_port" ping 2>/dev/null | grep -q PONG' "$tmp/redis.log"

# --- creditgate -------------------------------------------------------------
gate_port="$(free_port)"
gate_key="sk_gate_nginx"
admin_key="sk_admin_nginx"
{
  printf 'listen = "127.0.0.1:%s"\n' "$gate_port"
  printf 'api_keys = ["%s"]\nadmin_keys = ["%s"]\n' "$gate_key" "$admin_key"
  printf 'redis_url = "redis://127.0.0.1:%s"\n' "$redis_port"
  grep -vE '^(listen|api_keys|admin_keys|log_format) ' "$root/examples/creditgate.toml"
  cat <<'TOML'

[gate]
deny_status = 403
routes = [
  { prefix = "/chat/premium", feature = "premium_message" },
  { prefix = "/chat", feature = "basic_message" },
]
TOML
} > "$tmp/creditgate.toml"
RUST_LOG="${RUST_LOG:-warn}" "$bin" serve --config "$tmp/creditgate.toml" > "$tmp/creditgate.log" 2>&1 &
gate_pid=$!
gate_url="http://127.0.0.1:$gate_port"
wait_for creditgate "$gate_pid" 'curl -sf -o /dev/null "$gate_url/readyz"' "$tmp/creditgate.log"

# --- nginx ------------------------------------------------------------------
nginx_port="$(free_port)"
sed -e "s|@PREFIX@|$tmp|g" -e "s|@LISTEN_PORT@|$nginx_port|g" -e "s|@GATE_PORT@|$gate_port|g" \
    -e "s|@APP_PORT@|$app_port|g" -e "s|@GATE_KEY@|$gate_key|g" \
    "$here/nginx.conf.template" > "$tmp/nginx.conf"
nginx_args=(-p "$tmp" -c "$tmp/nginx.conf" -e "$tmp/error.log" -g "daemon off; pid $tmp/nginx.pid;")
if ! "$nginx_bin" -t "${nginx_args[@]}" > "$tmp/nginx-t.log" 2>&1; then
  echo "tests/nginx/run.sh: nginx rejected the configuration:" >&2; cat "$tmp/nginx-t.log" >&2; exit 1
fi
"$nginx_bin" "${nginx_args[@]}" > "$tmp/nginx.log" 2>&1 &
nginx_pid=$!
nginx_url="http://127.0.0.1:$nginx_port"
wait_for nginx "$nginx_pid" '[ "$(curl -s -o /dev/null -w "%{http_code}" "$nginx_url/")" = 401 ]' "$tmp/error.log"

# --- helpers ----------------------------------------------------------------
passed=0 failed=0
check() {
  local name="$1"; shift
  if "$@"; then
    passed=$((passed + 1)); echo "ok - $name"
  else
    failed=$((failed + 1)); echo "not ok - $name"
  fi
}
eq() {
  if [ "$1" = "$2" ]; then return 0; fi
  echo "    expected [$2], got [$1]"; return 1
}
matches() {
  if [[ "$1" =~ $2 ]]; then return 0; fi
  echo "    [$1] does not match /$2/"; return 1
}

# One request through nginx: sets $status; headers in $tmp/h, body in $tmp/b.
status=""
req() {
  local path="$1"; shift
  status="$(curl -s -o "$tmp/b" -D "$tmp/h" -w '%{http_code}' "$@" "$nginx_url$path")"
}
hval() {
  grep -i "^$1:" "$tmp/h" | head -n1 | cut -d' ' -f2- | tr -d '\r'
}
admin() {
  curl -s -H "Authorization: Bearer $admin_key" -H 'content-type: application/json' \
    -d "$2" "$gate_url/v1/$1"
}
# The customer's credits remaining, read through the sidecar's API.
balance() {
  admin customers.get "{\"customer_id\":\"$1\"}" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["balances"]["credits"]["remaining"])'
}
upstream_count() {
  curl -s "http://127.0.0.1:$app_port/__count" | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])'
}
# Seconds from now to the customer's next credits reset.
secs_to_reset() {
  admin customers.get "{\"customer_id\":\"$1\"}" |
    python3 -c 'import json,sys,time,math; n=json.load(sys.stdin)["balances"]["credits"]["next_reset_at"]; print(math.ceil((n-time.time()*1000)/1000))'
}

for c in alice bob; do
  admin customers.get_or_create "{\"customer_id\":\"$c\"}" > /dev/null
  admin billing.attach "{\"customer_id\":\"$c\",\"plan_id\":\"pro\"}" > /dev/null
done
check "alice starts with 200 credits" eq "$(balance alice)" 200

allowed=0 spent=0
allow() { allowed=$((allowed + 1)); spent=$((spent + $1)); }

# --- unauthenticated: refused by nginx, never reaches the gate or upstream --
req /chat/premium
check "no api key: 401 from nginx" eq "$status" 401
check "no api key: upstream untouched" eq "$(upstream_count)" 0

# --- allowed ----------------------------------------------------------------
req /chat/premium -H 'X-Api-Key: key-alice'
allow 10
check "premium allowed: 200" eq "$status" 200
check "premium allowed: answered by the upstream" matches "$(cat "$tmp/b")" '"upstream": true'
check "allowed: RateLimit-Policy" eq "$(hval RateLimit-Policy)" '"credits";q=200;w=2592000'
check "allowed: RateLimit" matches "$(hval RateLimit)" '^"credits";r=190;t=[0-9]+$'
check "allowed: X-RateLimit-Limit" eq "$(hval X-RateLimit-Limit)" 200
check "allowed: X-RateLimit-Remaining" eq "$(hval X-RateLimit-Remaining)" 190
check "allowed: X-RateLimit-Reset" matches "$(hval X-RateLimit-Reset)" '^[0-9]+$'
check "allowed: no Retry-After" eq "$(hval Retry-After)" ""
allowed_headers="$(grep -iE '^(ratelimit|x-ratelimit|retry-after)' "$tmp/h" | tr -d '\r')"
check "upstream count 1" eq "$(upstream_count)" 1
check "alice 190" eq "$(balance alice)" 190

# --- forged headers never reach the gate ------------------------------------
for _ in 1 2; do
  req /chat/premium -H 'X-Api-Key: key-alice' -H 'X-Customer-Id: bob' \
    -H 'X-Feature-Id: basic_message' -H 'X-Cost: 0.0001' -H 'Idempotency-Key: replay-me'
  allow 10
  check "forged headers: allowed at alice's price" eq "$status" 200
done
check "forged headers: alice charged 2 x 10" eq "$(balance alice)" 170
check "forged headers: bob untouched" eq "$(balance bob)" 200

# --- spend down: 16 premium (one a POST with a body), 5 basic ----------------
for i in $(seq 1 16); do
  if [ "$i" = 8 ]; then
    req /chat/premium/complete -H 'X-Api-Key: key-alice' -H 'content-type: application/json' -d '{"prompt":"hi"}'
  else
    req /chat/premium -H 'X-Api-Key: key-alice'
  fi
  [ "$status" = 200 ] && allow 10
done
check "16 premium allowed" eq "$allowed" 19
for _ in 1 2 3 4 5; do
  req /chat/basic -H 'X-Api-Key: key-alice'
  [ "$status" = 200 ] && allow 1
done
check "5 basic allowed" eq "$allowed" 24
check "alice 5 left" eq "$(balance alice)" 5
count_before="$(upstream_count)"
check "upstream saw every allowed request" eq "$count_before" "$allowed"

# --- denied: 10 credits needed, 5 left ----------------------------------------
expect_retry="$(secs_to_reset alice)"
req /chat/premium -H 'X-Api-Key: key-alice'
check "premium denied: 429" eq "$status" 429
check "denied: body" eq "$(cat "$tmp/b")" '{"message":"insufficient balance","code":"insufficient_balance"}'
retry="$(hval Retry-After)"
check "denied: Retry-After present" matches "$retry" '^[0-9]+$'
check "denied: Retry-After is the time to the monthly reset (±2 s)" \
  python3 -c "import sys; sys.exit(0 if abs(int('${retry:-0}') - $expect_retry) <= 2 else 1)"
check "denied: RateLimit" eq "$(hval RateLimit)" "\"credits\";r=5;t=$retry"
check "denied: RateLimit-Policy" eq "$(hval RateLimit-Policy)" '"credits";q=200;w=2592000'
check "denied: X-RateLimit-Remaining" eq "$(hval X-RateLimit-Remaining)" 5
check "denied: X-RateLimit-Reset" eq "$(hval X-RateLimit-Reset)" "$retry"
denied_headers="$(grep -iE '^(ratelimit|x-ratelimit|retry-after)' "$tmp/h" | tr -d '\r')"
check "denied: never reached the upstream" eq "$(upstream_count)" "$count_before"
check "denied: nothing charged" eq "$(balance alice)" 5

# --- the last 5 credits, then denied again -----------------------------------
for _ in 1 2 3 4 5; do
  req /chat/basic -H 'X-Api-Key: key-alice'
  [ "$status" = 200 ] && allow 1
done
check "last 5 basic allowed" eq "$allowed" 29
req /chat/basic -H 'X-Api-Key: key-alice'
check "basic denied at 0: 429" eq "$status" 429
check "basic denied at 0: RateLimit r=0" matches "$(hval RateLimit)" '^"credits";r=0;t=[0-9]+$'

# --- a gateway misconfiguration: gate 400 surfaces as a 500 -------------------
req /unpriced -H 'X-Api-Key: key-alice'
check "unpriced path: gate answers 400, nginx 500" eq "$status" 500

# --- totals -------------------------------------------------------------------
check "upstream count == allowed requests" eq "$(upstream_count)" "$allowed"
check "alice's balance moved by exactly the allowed cost" eq "$((200 - $(balance alice)))" "$spent"
check "allowed cost is 200 credits" eq "$spent" 200
check "bob still 200" eq "$(balance bob)" 200
metrics="$(curl -s "$gate_url/metrics")"
check "metrics: gate allowed" matches "$metrics" "creditgate_decisions_total\\{route=\"/v1/gate\",outcome=\"allowed\"\\} $allowed"
check "metrics: gate denied" matches "$metrics" 'creditgate_decisions_total\{route="/v1/gate",outcome="denied"\} 2'

# --- a per-minute limit beside credits (issue 13) ---------------------------
# On the same Redis-backed sidecar: bob (200 credits, untouched so far) may
# send at most 3 basic messages a minute, whatever his balance.
limited="$(admin customers.update '{"customer_id":"bob","billing_controls":{"rate_limits":[{"feature_id":"basic_message","limit":3,"interval":"minute"}]}}')"
check "limit: set by customers.update" matches "$limited" '"id":"basic_message:minute"'
count_before="$(upstream_count)"
ok=0
for _ in 1 2 3; do
  req /chat/basic -H 'X-Api-Key: key-bob'
  [ "$status" = 200 ] && ok=$((ok + 1))
done
check "limit: 3 basic allowed" eq "$ok" 3
check "limit: policies for credits and the limit" eq "$(hval RateLimit-Policy)" '"credits";q=200;w=2592000, "basic_message:minute";q=3;w=60'
check "limit: RateLimit is the tightest (the limit)" matches "$(hval RateLimit)" '^"basic_message:minute";r=0;t=[0-9]+$'
req /chat/basic -H 'X-Api-Key: key-bob'
check "limit: the 4th in the minute is 429" eq "$status" 429
retry="$(hval Retry-After)"
check "limit: Retry-After within the minute" matches "$retry" '^([1-9]|[1-5][0-9]|60)$'
check "limit: RateLimit names the limit" matches "$(hval RateLimit)" '^"basic_message:minute";r=0;t=[0-9]+$'
check "limit: credits remain (197)" eq "$(balance bob)" 197
check "limit: the upstream counted exactly the 3 allowed" eq "$(upstream_count)" "$((count_before + 3))"
check "limit: kept in Redis" eq "$(redis-cli -p "$redis_port" EXISTS 'cg2:{bob}')" 1

echo "--- one allowed answer (through nginx) ---"
echo "$allowed_headers"
echo "--- one denied answer (through nginx, 429) ---"
echo "$denied_headers"
if [ "$failed" -ne 0 ]; then
  echo "--- nginx error.log ---"; tail -n 40 "$tmp/error.log"
  echo "--- creditgate log ---"; tail -n 40 "$tmp/creditgate.log"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
