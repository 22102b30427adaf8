#!/usr/bin/env bash
# Flute tokens from flute-token-broker with nothing but curl and jq: the
# broker's HTTP/JSON read on its Unix socket (or TCP). Source this file, or
# run it:  flute-token.sh token sandbox
#          flute-token.sh call sandbox https://sandbox.api.flute.com/v2/transactions
#          flute-token.sh follow sandbox
#
# FLUTE_BROKER_SOCKET  the broker's socket (default /run/flute-token-broker/broker.sock)
# FLUTE_BROKER_URL     or a TCP address instead, e.g. http://127.0.0.1:50051
#
# Errors go to stderr as "REASON (HTTP status): message; retry in N s" and
# the functions return 1 (2 for a usage error), so scripts can branch.

FLUTE_BROKER_SOCKET="${FLUTE_BROKER_SOCKET:-/run/flute-token-broker/broker.sock}"

# _flute_request METHOD PATH [BODY]: sets _flute_body, _flute_status,
# _flute_etag and _flute_retry_after (in this shell: call it directly, not
# in $(...)); returns 1 with the error on stderr unless the answer is 200.
_flute_request() {
  local method="$1" path="$2" body="${3:-}" headers base
  local -a transport=()
  if [[ -n "${FLUTE_BROKER_URL:-}" ]]; then
    base="${FLUTE_BROKER_URL%/}"
  else
    base="http://localhost"
    transport=(--unix-socket "$FLUTE_BROKER_SOCKET")
  fi
  headers="$(mktemp)"
  local -a data=()
  [[ "$method" == POST ]] && data=(-H 'Content-Type: application/json' --data "${body:-{\}}")
  _flute_body="$(curl --silent --show-error --max-time "${FLUTE_BROKER_TIMEOUT:-70}" "${transport[@]}" \
    -X "$method" -H 'Flute-Broker: true' "${data[@]}" -D "$headers" "$base$path")" || {
    rm -f "$headers"
    echo "flute-token: cannot reach the broker (${FLUTE_BROKER_URL:-unix:$FLUTE_BROKER_SOCKET})" >&2
    return 1
  }
  _flute_status="$(awk 'NR==1 {print $2}' "$headers")"
  _flute_etag="$(awk 'tolower($1)=="etag:" {gsub(/[\r"]/, "", $2); print $2}' "$headers")"
  _flute_retry_after="$(awk 'tolower($1)=="retry-after:" {gsub(/\r/, "", $2); print $2}' "$headers")"
  rm -f "$headers"
  if [[ "$_flute_status" != 200 ]]; then
    local reason message
    reason="$(jq -r '[.details[]? | select(."@type" | endswith("ErrorInfo")) | .reason][0] // "UNKNOWN"' <<<"$_flute_body" 2>/dev/null)"
    message="$(jq -r '.message // empty' <<<"$_flute_body" 2>/dev/null)"
    echo "flute-token: ${reason:-UNKNOWN} ($_flute_status): ${message}${_flute_retry_after:+; retry in $_flute_retry_after s}" >&2
    return 1
  fi
}

# flute_token ENV [MIN_REMAINING]: prints the access token.
flute_token() {
  local env="${1:?environment (sandbox or production)}" query=""
  [[ -n "${2:-}" ]] && query="?min_remaining=$2"
  _flute_request GET "/v1/environments/$env/token$query" || return 1
  jq -r '.token.accessToken' <<<"$_flute_body"
}

# flute_token_json ENV: the whole token (accessToken, tokenId, expiresAt, serveFor...).
flute_token_json() {
  _flute_request GET "/v1/environments/${1:?environment}/token" || return 1
  jq -c '.token' <<<"$_flute_body"
}

# flute_refresh ENV REJECTED_TOKEN_ID: the API answered 401 to that token;
# prints the replacement's access token.
flute_refresh() {
  local env="${1:?environment}" rejected="${2:?token_id of the rejected token}"
  _flute_request POST "/v1/environments/$env/token:refresh" \
    "$(jq -cn --arg id "$rejected" '{rejectedTokenId: $id}')" || return 1
  jq -r '.token.accessToken' <<<"$_flute_body"
}

# flute_call ENV URL [curl options...]: GET URL with the token and print
# the answer; on 401, report the token to the broker and retry once with
# its replacement. Returns 0 for a 2xx answer.
flute_call() {
  local env="${1:?environment}" url="${2:?url}" json token status out
  shift 2
  json="$(flute_token_json "$env")" || return 1
  token="$(jq -r '.accessToken' <<<"$json")"
  out="$(mktemp)"
  status="$(curl --silent --output "$out" --write-out '%{http_code}' -H "Authorization: Bearer $token" "$@" "$url")"
  if [[ "$status" == 401 ]]; then
    token="$(flute_refresh "$env" "$(jq -r '.tokenId' <<<"$json")")" || { rm -f "$out"; return 1; }
    status="$(curl --silent --output "$out" --write-out '%{http_code}' -H "Authorization: Bearer $token" "$@" "$url")"
  fi
  cat "$out"
  rm -f "$out"
  [[ "$status" == 2* ]]
}

# flute_follow ENV: prints "TOKEN_ID EXPIRES_AT" at once and at every
# rotation, by long-poll (no stream library); waits out outages as the
# broker's Retry-After says.
flute_follow() {
  local env="${1:?environment}" etag=""
  while true; do
    if _flute_request GET "/v1/environments/$env/token?wait_for_change=true&last_etag=$etag&timeout_sec=60"; then
      if [[ "$_flute_etag" != "$etag" ]]; then
        etag="$_flute_etag"
        jq -r '"\(.token.tokenId) \(.token.expiresAt)"' <<<"$_flute_body"
      fi
    else
      sleep "${_flute_retry_after:-1}"
    fi
  done
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -o pipefail
  command="${1:-}"
  shift || true
  case "$command" in
    token) flute_token "$@" ;;
    json) flute_token_json "$@" ;;
    refresh) flute_refresh "$@" ;;
    call) flute_call "$@" ;;
    follow) flute_follow "$@" ;;
    *) echo "usage: $0 token|json|refresh|call|follow ENV [ARGS]" >&2; exit 2 ;;
  esac
fi
