#!/usr/bin/env bash
# Runs the worked examples of lua/README-cg2.md (section 11) on a fresh private
# redis-server and prints that section as markdown: commands and the exact
# replies. A test can run it and compare with the README.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')"
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" >/dev/null 2>&1 &
pid=$!
trap 'kill $pid; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
redis-cli -p "$port" -x FUNCTION LOAD <lua/creditgate.lua >/dev/null
CLI="redis-cli -p $port --no-raw"
sec=""
while IFS= read -r line; do
  if [[ "$line" == "## "* ]]; then
    true
    sec="${line#\#\# }"; echo "### $sec"; echo; continue
  fi
  echo '```sh'; echo "${line}" | sed 's/^\$CLI /$CLI /'; echo '```'; echo; echo '```text'
  eval "${line//\$CLI/$CLI}" 2>&1 | sed "s/127.0.0.1:$port> //"
  echo '```'; echo
done <<'EXAMPLES'
## create_customer
$CLI FCALL cg2_v1_create_customer 1 'cg2:{cus_1}' 1798761600000
## grant
$CLI FCALL cg2_v1_grant 3 'cg2:{cus_1}' 'cg2:{cus_1}:l' 'cg2:due:{3fj}' 1798761600000 86400000 86400000 cus_1 api_call '' pro 1000000 5 1
$CLI FCALL cg2_v1_grant 3 'cg2:{cus_1}' 'cg2:{cus_1}:l' 'cg2:due:{3fj}' 1798761600000 86400000 86400000 cus_1 credits topup '' 5000000 0
## check
$CLI FCALL cg2_v1_check 3 'cg2:{cus_1}' 'cg2:{cus_1}:l' 'cg2:due:{3fj}' 1798761600000 86400000 86400000 cus_1 action1 507500 2 action1 1000000 credits 200000
## apply-consume
$CLI FCALL cg2_v1_apply 3 'cg2:{cus_1}' 'cg2:{cus_1}:l' 'cg2:due:{3fj}' 1798761600000 86400000 86400000 cus_1 consume '' api_call 200000 '' '' '' 1 api_call 1000000
## apply-track
$CLI FCALL cg2_v1_apply 3 'cg2:{cus_1}' 'cg2:{cus_1}:l' 'cg2:due:{3fj}' 1798761600000 86400000 86400000 cus_1 track k1 api_call 1200000 cap '' '' 1 api_call 1000000
$CLI FCALL cg2_v1_apply 3 'cg2:{cus_1}' 'cg2:{cus_1}:l' 'cg2:due:{3fj}' 1798761600000 86400000 86400000 cus_1 track k1 api_call 1200000 cap '' '' 1 api_call 1000000
## apply-reused
$CLI FCALL cg2_v1_apply 3 'cg2:{cus_1}' 'cg2:{cus_1}:l' 'cg2:due:{3fj}' 1798761600000 86400000 86400000 cus_1 track k1 api_call 10000 cap '' '' 1 api_call 1000000
## apply-refund
$CLI FCALL cg2_v1_apply 3 'cg2:{cus_1}' 'cg2:{cus_1}:l' 'cg2:due:{3fj}' 1798761600000 86400000 86400000 cus_1 track '' api_call -300000 cap '' '' 1 api_call 1000000
## apply-reserve
$CLI FCALL cg2_v1_apply 3 'cg2:{cus_1}' 'cg2:{cus_1}:l' 'cg2:due:{3fj}' 1798761600000 86400000 86400000 cus_1 reserve '' action1 1000000 '' L1 1798765200000 2 action1 1000000 credits 200000
$CLI FCALL cg2_v1_apply 3 'cg2:{cus_1}' 'cg2:{cus_1}:l' 'cg2:due:{3fj}' 1798761600000 86400000 86400000 cus_1 finalize '' '' 500000 confirm L1 '' 0
## update_bucket
$CLI FCALL cg2_v1_update_bucket 3 'cg2:{cus_1}' 'cg2:{cus_1}:l' 'cg2:due:{3fj}' 1798761600000 86400000 86400000 cus_1 api_call b1 add 50000
## balances
$CLI FCALL cg2_v1_balances 3 'cg2:{cus_1}' 'cg2:{cus_1}:l' 'cg2:due:{3fj}' 1798761600000 86400000 86400000 cus_1
## reset_due
$CLI FCALL cg2_v1_reset_due 3 'cg2:{cus_1}' 'cg2:{cus_1}:l' 'cg2:due:{3fj}' 1801440000000 86400000 86400000 cus_1
$CLI ZSCORE 'cg2:due:{3fj}' cus_1
## layout
$CLI HGETALL 'cg2:{cus_1}'
## lease
$CLI FCALL cg2_v1_lease 1 'cg2:sweep:0' sweeper-a 30000
$CLI FCALL cg2_v1_lease 1 'cg2:sweep:0' sweeper-b 30000
$CLI FCALL cg2_v1_release 1 'cg2:sweep:0' sweeper-a
## claim
$CLI FCALL cg2_v1_claim 1 'cg2:lock:{L9}' cus_1 1798848000000 1798761600000
$CLI FCALL cg2_v1_claim 1 'cg2:lock:{L9}' cus_2 1798848000000 1798761600000
## migrate
$CLI EVAL "$(cat lua/lib.lua lua/create_customer.lua)" 1 'cg1:{cus_2}' 1798761600000
$CLI EVAL "$(cat lua/lib.lua lua/grant.lua)" 3 'cg1:{cus_2}' 'cg1:{cus_2}:l' 'cg1:due:{3fi}' 1798761600000 86400000 86400000 cus_2 api_call '' '' 1000000 5 1
$CLI EVAL "$(cat lua/lib.lua lua/apply.lua)" 3 'cg1:{cus_2}' 'cg1:{cus_2}:l' 'cg1:due:{3fi}' 1798761600000 86400000 86400000 cus_2 consume k7 api_call 30000 '' '' '' 1 api_call 1000000
$CLI FCALL cg2_v1_migrate 6 'cg1:{cus_2}' 'cg1:{cus_2}:l' 'cg1:due:{3fi}' 'cg2:{cus_2}' 'cg2:{cus_2}:l' 'cg2:due:{3fi}' 1798761600000 86400000 86400000 cus_2
$CLI FCALL cg2_v1_migrate_key 3 'cg1:{cus_2}:i:k7' 'cg2:{cus_2}' 'cg2:due:{3fi}' 1798761600000 86400000 k7 i cus_2 '' 1 api_call 1000000
$CLI FCALL cg2_v1_apply 3 'cg2:{cus_2}' 'cg2:{cus_2}:l' 'cg2:due:{3fi}' 1798761600000 86400000 86400000 cus_2 consume k7 api_call 30000 '' '' '' 1 api_call 1000000
## errors
$CLI FCALL cg2_v1_balances 3 'cg2:{nobody}' 'cg2:{nobody}:l' 'cg2:due:{4be}' 1798761600000 86400000 86400000 nobody
EXAMPLES
