#!/bin/bash
# Server instructions per GetToken, counted by valgrind's callgrind (exact
# and repeatable, unlike CPU time on a shared machine): the release broker
# (`serve --dev`) and the no-op tonic server of `benches/broker.rs`, each
# under callgrind, 5,000 sequential calls on one connection (counters
# zeroed after a 500-call warm-up on another) over TCP and the Unix socket,
# from two callers: h2load, which writes a request's HEADERS and DATA
# frames apart (on the Unix socket the server then wakes twice per call),
# and a tonic client (`benches/broker.rs --calls`), which writes them
# together as gRPC clients do; and the broker's HTTP/JSON GET over HTTP/2
# on TCP. Needs valgrind and h2load (nghttp2-client). Run from the
# repository root (CALLS=20000 to spread per-connection costs thinner):
#
#     cargo build --release && benches/instructions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BROKER=target/release/flute-token-broker
NOOP=$(cargo bench --bench broker --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | head -1)
WORK=$(mktemp -d)
trap 'pkill -f "callgrind-out-file=$WORK" || true; rm -rf "$WORK"' EXIT
CALLS=${CALLS:-5000}
printf '\x00\x00\x00\x00\x02\x08\x01' > "$WORK/get_token.bin"   # GetTokenRequest{environment: SANDBOX}

# count NAME SERVER-ARGS... -- CLIENT...: instructions per call. CLIENT
# is a command that makes N sequential calls on one connection when given
# N as its last argument, and prints "N succeeded" or "N calls succeeded".
count() {
  local name=$1; shift
  local server=() client=()
  while [ "$1" != -- ]; do server+=("$1"); shift; done; shift
  client=("$@")
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$WORK/$name.%p" "${server[@]}" >"$WORK/$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 120); do
    sleep 1
    "${client[@]}" 500 2>/dev/null | grep -qE "(^| )500 (calls )?succeeded" && break
  done
  callgrind_control -z "$pid" >/dev/null 2>&1
  "${client[@]}" "$CALLS" | grep -qE "(^| )$CALLS (calls )?succeeded"
  callgrind_control -d "$pid" >/dev/null 2>&1
  kill "$pid"; wait "$pid" 2>/dev/null || true
  local total
  total=$(callgrind_annotate "$WORK/$name.$pid.1" | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  echo $((total / CALLS))
}

# The callers: h2load (nghttp2), one request at a time; a tonic client
# (this repository's, as a Rust service calls); both on one connection.
h2() { h2load -n "${!#}" -c 1 -m 1 "${@:1:$#-1}"; }
tonic_client() { "$NOOP" --calls "$2" "$1"; }

GRPC=(-d "$WORK/get_token.bin" -H content-type:application/grpc -H te:trailers)
GT=/flute.tokenbroker.v1.TokenBroker/GetToken
ratio() { python3 -c "print(f'{$1/$2:.3f}')"; }
b_tcp=$(count broker_tcp "$BROKER" serve --dev --admin-listen "" --listen 127.0.0.1:7391 -- h2 "${GRPC[@]}" "http://127.0.0.1:7391$GT")
n_tcp=$(count noop_tcp "$NOOP" --noop-server 7392 "$WORK/n0.sock" -- h2 "${GRPC[@]}" "http://127.0.0.1:7392$GT")
b_unix=$(count broker_unix "$BROKER" serve --dev --admin-listen "" --listen "unix:$WORK/b1.sock" -- h2 --base-uri="unix:$WORK/b1.sock" "${GRPC[@]}" "http://localhost$GT")
n_unix=$(count noop_unix "$NOOP" --noop-server 7393 "$WORK/n1.sock" -- h2 --base-uri="unix:$WORK/n1.sock" "${GRPC[@]}" "http://localhost$GT")
tb_tcp=$(count tonic_broker_tcp "$BROKER" serve --dev --admin-listen "" --listen 127.0.0.1:7394 -- tonic_client 127.0.0.1:7394)
tn_tcp=$(count tonic_noop_tcp "$NOOP" --noop-server 7395 "$WORK/n2.sock" -- tonic_client 127.0.0.1:7395)
tb_unix=$(count tonic_broker_unix "$BROKER" serve --dev --admin-listen "" --listen "unix:$WORK/b2.sock" -- tonic_client "unix:$WORK/b2.sock")
tn_unix=$(count tonic_noop_unix "$NOOP" --noop-server 7396 "$WORK/n3.sock" -- tonic_client "unix:$WORK/n3.sock")
h_tcp=$(count http_tcp "$BROKER" serve --dev --admin-listen "" --listen 127.0.0.1:7397 -- h2 -H flute-broker:true "http://127.0.0.1:7397/v1/environments/sandbox/token")
echo "instructions per call (callgrind, $CALLS calls, 1 connection), broker vs no-op tonic server:"
echo "  gRPC GetToken, TCP, h2load:         $b_tcp vs $n_tcp, ratio $(ratio "$b_tcp" "$n_tcp")"
echo "  gRPC GetToken, Unix socket, h2load: $b_unix vs $n_unix, ratio $(ratio "$b_unix" "$n_unix")"
echo "  gRPC GetToken, TCP, tonic:          $tb_tcp vs $tn_tcp, ratio $(ratio "$tb_tcp" "$tn_tcp")"
echo "  gRPC GetToken, Unix socket, tonic:  $tb_unix vs $tn_unix, ratio $(ratio "$tb_unix" "$tn_unix")"
echo "  HTTP/JSON GET over HTTP/2, TCP, h2load: broker $h_tcp ($(ratio "$h_tcp" "$b_tcp") of the broker's gRPC GetToken)"
