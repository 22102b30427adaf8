#!/usr/bin/env bash
# The shell client against a real `flute-token-broker serve --dev` on a
# Unix socket (run by .ci/run; needs curl and jq). Exits non-zero on the
# first failed check.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${FLUTE_BROKER_BIN:?path of the flute-token-broker binary}"
work="$(mktemp -d)"
broker_pid=""
cleanup() {
  [[ -n "$broker_pid" ]] && kill "$broker_pid" 2>/dev/null && wait "$broker_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

export FLUTE_BROKER_SOCKET="$work/broker.sock"
export FLUTE_PROXY_SOCKET="$work/sandbox-api.sock"
"$bin" serve --dev --dev-token-lifetime 3s --admin-listen "" --listen "unix:$FLUTE_BROKER_SOCKET" \
  --proxy "sandbox=unix:$FLUTE_PROXY_SOCKET" --proxy sandbox=127.0.0.1:0 >"$work/banner" 2>"$work/log" &
broker_pid=$!
for _ in $(seq 300); do
  grep -q "emulator:" "$work/banner" 2>/dev/null && break
  sleep 0.1
done
emulator="$(awk '$1=="emulator:" {print $2}' "$work/banner")"
[[ -n "$emulator" ]] || { cat "$work/log"; echo "FAILED: serve --dev printed no emulator address"; exit 1; }

# shellcheck source=flute-token.sh
source "$here/flute-token.sh"
passed=0
check() {
  local what="$1"
  shift
  if "$@"; then
    passed=$((passed + 1))
    echo "ok: $what"
  else
    echo "FAILED: $what"
    exit 1
  fi
}

token="$(flute_token sandbox)"
check "a token, as the access token alone" test -n "$token"
check "the emulator's API accepts it" \
  test "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $token" "$emulator/v2/transactions")" = 200
quiet_call() { flute_call "$@" >/dev/null; }
check "flute_call calls the API with it" quiet_call sandbox "$emulator/v2/transactions"

json="$(flute_token_json sandbox)"
old_id="$(jq -r .tokenId <<<"$json")"
new_token="$(flute_refresh sandbox "$old_id")"
new_id="$(flute_token_json sandbox | jq -r .tokenId)"
check "refresh replaces the rejected token" test "$new_id" != "$old_id"
check "the replacement is accepted" \
  test "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $new_token" "$emulator/v2/transactions")" = 200

# 401 with a token the API refuses: flute_call reports it and retries.
flute_token_json() { echo '{"accessToken":"not-a-token","tokenId":"000000000000"}'; }
check "flute_call refreshes on 401 and retries" quiet_call sandbox "$emulator/v2/transactions"
unset -f flute_token_json
source "$here/flute-token.sh"

# Rotations by long-poll: three distinct tokens (3 s tokens rotate every 1.5 s).
mapfile -t rotations < <(timeout 20 bash -c "source '$here/flute-token.sh'; flute_follow sandbox" | head -n 3)
check "follow prints each rotation once" test "$(printf '%s\n' "${rotations[@]}" | awk '{print $1}' | sort -u | wc -l)" = 3

# Errors carry the reason and, when waiting helps, the retry delay.
err="$(flute_token moon 2>&1 >/dev/null || true)"
check "an unknown environment: ENVIRONMENT_UNSPECIFIED (400)" grep -q "ENVIRONMENT_UNSPECIFIED (400)" <<<"$err"
check "without the Flute-Broker header: 403" \
  test "$(curl -s -o /dev/null -w '%{http_code}' --unix-socket "$FLUTE_BROKER_SOCKET" http://localhost/v1/environments/sandbox/token)" = 403
check "HTTP/2 (prior knowledge) on the same socket: 200" \
  test "$(curl -s -o /dev/null -w '%{http_code} %{http_version}' --http2-prior-knowledge --unix-socket "$FLUTE_BROKER_SOCKET" -H 'Flute-Broker: true' http://localhost/v1/environments/sandbox/token)" = "200 2"
check "through a proxy (X-Forwarded-For): 403" \
  test "$(curl -s -o /dev/null -w '%{http_code}' --unix-socket "$FLUTE_BROKER_SOCKET" -H 'Flute-Broker: true' -H 'X-Forwarded-For: 10.1.2.3' http://localhost/v1/environments/sandbox/token)" = 403
# The proxy variant (flute-api.sh): no token in the script at all.
# shellcheck source=flute-api.sh
source "$here/flute-api.sh"
check "a GET through the proxy's socket" grep -q '"transactions"' <<<"$(flute_api GET /v2/transactions)"
echo_json="$(flute_api POST '/v2/payments?dry_run=1' '{"amount":1250,"currency":"USD"}')"
check "a POST through the proxy: the API saw a token and the JSON body" \
  test "$(jq -r '"\(.method) \(.query) \(.body_bytes) \(.token_id | length) \(.headers | has("authorization"))"' <<<"$echo_json")" = "POST dry_run=1 32 12 false"
proxy_url="$(awk '$1=="proxy:" && $3 ~ /^http:/ {print $3}' "$work/banner")"
check "the same through the proxy's TCP port" \
  grep -q '"transactions"' <<<"$(FLUTE_PROXY_URL="$proxy_url" flute_api GET /v2/transactions)"
# This emulator serves both environments: revoke the sandbox token by its id.
revoked_id="$(jq -r .token_id <<<"$echo_json")"
curl -s -X POST "$emulator/__emulator/faults" -H 'Content-Type: application/json' -d "{\"revoke_token_id\": \"$revoked_id\"}" >/dev/null
after_json="$(flute_api POST /v2/payments '{"n":2}' || true)"
check "a revoked token never reaches the script (the broker retries once)" \
  test "$(jq -r --arg revoked "$revoked_id" '"\(.method) \(.token_id != $revoked)"' <<<"$after_json")" = "POST true"
check "HTTP/2 (prior knowledge) through the proxy: 200" \
  test "$(curl -s -o /dev/null -w '%{http_code} %{http_version}' --http2-prior-knowledge --unix-socket "$FLUTE_PROXY_SOCKET" http://localhost/v2/transactions)" = "200 2"
check "a path leaving the API: 400" \
  test "$(curl -s -o /dev/null -w '%{http_code}' --path-as-is --unix-socket "$FLUTE_PROXY_SOCKET" http://localhost/v2/../admin)" = 400

curl -s -X POST "$emulator/__emulator/faults" -H 'Content-Type: application/json' \
  -d '{"refuse_all": true, "status": 503, "retry_after": 2}' >/dev/null
# Once the 3 s token's window ends (no refresh succeeds), the read fails.
err=""
for _ in $(seq 300); do
  if ! err="$(flute_token sandbox 2>&1 >/dev/null)"; then break; fi
  sleep 0.05
done
check "an outage: NO_VALID_TOKEN (503) with the retry delay" grep -qE "NO_VALID_TOKEN \(503\): .*; retry in [0-9]+ s" <<<"$err"
curl -s -X POST "$emulator/__emulator/faults" -H 'Content-Type: application/json' -d '{"clear": true}' >/dev/null
echo "shell client: $passed checks passed"
