#!/bin/bash
# Server instructions per GetToken, counted by valgrind's callgrind (exact
# and repeatable, unlike CPU time on a shared machine): the release broker
# (`serve --dev`) and the no-op tonic server of `benches/broker.rs`, each
# under callgrind, 5,000 sequential calls from h2load on one connection
# (counters zeroed after a 500-call warm-up), over TCP and the Unix socket;
# and the broker's HTTP/JSON GET over HTTP/2 on TCP. Needs valgrind and
# h2load (nghttp2-client). Run from the repository root:
#
#     cargo build --release && benches/instructions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BROKER=target/release/flute-token-broker
NOOP=$(cargo bench --bench broker --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | head -1)
WORK=$(mktemp -d)
trap 'pkill -f "callgrind-out-file=$WORK" || true; rm -rf "$WORK"' EXIT
CALLS=5000
printf '\x00\x00\x00\x00\x02\x08\x01' > "$WORK/get_token.bin"   # GetTokenRequest{environment: SANDBOX}

# count NAME SERVER-ARGS... -- H2LOAD-ARGS...: instructions per call.
count() {
  local name=$1; shift
  local server=() load=()
  while [ "$1" != -- ]; do server+=("$1"); shift; done; shift
  load=("$@")
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$WORK/$name.%p" "${server[@]}" >"$WORK/$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 120); do
    sleep 1
    h2load -n 500 -c 1 -m 1 "${load[@]}" 2>/dev/null | grep -q "500 succeeded" && break
  done
  callgrind_control -z "$pid" >/dev/null 2>&1
  h2load -n "$CALLS" -c 1 -m 1 "${load[@]}" | grep -q "$CALLS succeeded"
  callgrind_control -d "$pid" >/dev/null 2>&1
  kill "$pid"; wait "$pid" 2>/dev/null || true
  local total
  total=$(callgrind_annotate "$WORK/$name.$pid.1" | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  echo $((total / CALLS))
}

GRPC=(-d "$WORK/get_token.bin" -H content-type:application/grpc -H te:trailers)
GT=/flute.tokenbroker.v1.TokenBroker/GetToken
b_tcp=$(count broker_tcp "$BROKER" serve --dev --admin-listen "" --listen 127.0.0.1:7391 -- "${GRPC[@]}" "http://127.0.0.1:7391$GT")
n_tcp=$(count noop_tcp "$NOOP" --noop-server 7392 "$WORK/noop0.sock" -- "${GRPC[@]}" "http://127.0.0.1:7392$GT")
b_unix=$(count broker_unix "$BROKER" serve --dev --admin-listen "" --listen "unix:$WORK/b.sock" -- --base-uri="unix:$WORK/b.sock" "${GRPC[@]}" "http://localhost$GT")
n_unix=$(count noop_unix "$NOOP" --noop-server 7393 "$WORK/n.sock" -- --base-uri="unix:$WORK/n.sock" "${GRPC[@]}" "http://localhost$GT")
h_tcp=$(count http_tcp "$BROKER" serve --dev --admin-listen "" --listen 127.0.0.1:7394 -- -H flute-broker:true "http://127.0.0.1:7394/v1/environments/sandbox/token")
ratio() { python3 -c "print(f'{$1/$2:.3f}')"; }
echo "instructions per call (callgrind, $CALLS calls, 1 connection):"
echo "  gRPC GetToken, TCP:         broker $b_tcp, no-op tonic server $n_tcp, ratio $(ratio "$b_tcp" "$n_tcp")"
echo "  gRPC GetToken, Unix socket: broker $b_unix, no-op tonic server $n_unix, ratio $(ratio "$b_unix" "$n_unix")"
echo "  HTTP/JSON GET over HTTP/2, TCP: broker $h_tcp ($(ratio "$h_tcp" "$b_tcp") of the broker's gRPC GetToken)"
