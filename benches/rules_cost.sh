#!/bin/bash
# GetToken instructions per call (callgrind), the release broker with and
# without named-caller rules + the audit trail, a tonic client over the Unix
# socket (5,000 sequential calls on one connection after a 500-call warm-up).
# Needs valgrind. Run: cargo build --release && benches/rules_cost.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BROKER=target/release/flute-token-broker
BENCH=$(cargo bench --bench broker --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | head -1)
W=$(mktemp -d)
echo "perf-secret" > $W/secret; chmod 600 $W/secret
$BROKER emulator --listen 127.0.0.1:9479 --client-id perf --client-secret perf-secret >/dev/null 2>&1 &
EMU=$!
trap 'kill $EMU 2>/dev/null || true; rm -rf "$W"' EXIT
base() { cat <<T
[server]
listen = ["unix:$W/$1.sock"]
[admin]
listen = ""
[oauth]
allow_insecure_http = true
[credentials]
client_id = "perf"
client_secret_file = "$W/secret"
[environments.sandbox]
token_url = "http://127.0.0.1:9479/oauth2/token"
[environments.production]
enabled = false
T
}
base off > $W/off.toml
{ base on; cat <<T
[environments.sandbox.access]
token = ["me"]
proxy = { me = ["GET /v2/**"] }
refresh_per_minute = 6
[audit]
file = "$W/audit.jsonl"
[callers.me]
unix_users = ["root"]
[callers.other]
unix_users = ["nobody"]
T
} > $W/on.toml
count() {
  local name=$1
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file=$W/$name.out $BROKER serve --config $W/$name.toml >$W/$name.log 2>&1 &
  local pid=$!
  for _ in $(seq 120); do sleep 1; $BENCH --calls 500 unix:$W/$name.sock 2>/dev/null | grep -q "500 calls succeeded" && break; done
  callgrind_control -z $pid >/dev/null 2>&1
  $BENCH --calls 5000 unix:$W/$name.sock | grep -q "5000 calls succeeded"
  callgrind_control -d $pid >/dev/null 2>&1
  sleep 1
  kill $pid; wait $pid 2>/dev/null || true
  local total=$(for f in $W/$name.out*; do callgrind_annotate "$f" 2>/dev/null | grep -m1 "PROGRAM TOTALS" | tr -d ',' | awk '{print $1}'; done | sort -n | tail -1)
  echo "$name: $((total / 5000)) instructions per GetToken"
}
count off
count on
echo "audit records written at shutdown: $(grep -c tokens_served $W/audit.jsonl || true) tokens_served"
