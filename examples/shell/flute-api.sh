#!/usr/bin/env bash
# Flute API calls through flute-token-broker's API proxy: no token in this
# script at all. The broker adds the environment's current token and
# absorbs the 401 of a rotated or revoked one.
#
#   flute-api.sh GET /v2/transactions
#   flute-api.sh POST /v2/payments '{"amount": 1250, "currency": "USD"}'
#
# FLUTE_PROXY_SOCKET  the proxy's socket, e.g. /run/flute-token-broker/sandbox-api.sock
# FLUTE_PROXY_URL     or its TCP address instead, e.g. http://127.0.0.1:8481
#
# Prints the API's answer; exits 1 on an HTTP error (the status and, for a
# 401 the broker could not absorb, its Flute-Broker-Not-Retried reason, on
# stderr), 2 for a usage error.

flute_api() {
  local method="${1:?method}" path="${2:?path, e.g. /v2/transactions}" body="${3:-}" base headers status
  local -a transport=() data=()
  if [[ -n "${FLUTE_PROXY_URL:-}" ]]; then
    base="${FLUTE_PROXY_URL%/}"
  elif [[ -n "${FLUTE_PROXY_SOCKET:-}" ]]; then
    base="http://localhost"
    transport=(--unix-socket "$FLUTE_PROXY_SOCKET")
  else
    echo "flute-api: set FLUTE_PROXY_SOCKET or FLUTE_PROXY_URL" >&2
    return 2
  fi
  [[ -n "$body" ]] && data=(-H 'Content-Type: application/json' --data "$body")
  headers="$(mktemp)"
  curl --silent --show-error --max-time "${FLUTE_API_TIMEOUT:-70}" "${transport[@]}" \
    -X "$method" "${data[@]}" -D "$headers" "$base$path" || { rm -f "$headers"; return 1; }
  status="$(awk 'NR==1 {print $2}' "$headers")"
  if [[ "$status" != 2* ]]; then
    echo >&2
    echo "flute-api: HTTP $status$(awk 'tolower($1)=="flute-broker-not-retried:" {gsub(/\r/, "", $2); print " (not retried: " $2 ")"}' "$headers")" >&2
    rm -f "$headers"
    return 1
  fi
  rm -f "$headers"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  [[ $# -ge 2 ]] || { echo "usage: $0 METHOD PATH [JSON BODY]" >&2; exit 2; }
  flute_api "$@"
fi
