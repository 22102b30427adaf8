#!/usr/bin/env bash
# Builds the Go client in GOPATH mode from Debian's packages (no module
# proxy): protoc generates the stubs into a scratch GOPATH next to a copy of
# flutebroker/, then `go test` runs it against FLUTE_BROKER_BIN.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
proto="$here/../../proto"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src"
cp -r "$here/flutebroker" "$work/src/"
mapping="Mflute/tokenbroker/v1/token_broker.proto=flutebroker/tokenbrokerv1"
protoc -I "$proto" \
  --go_out="$work/src" --go_opt="$mapping" \
  --go-grpc_out="$work/src" --go-grpc_opt="$mapping" \
  "$proto/flute/tokenbroker/v1/token_broker.proto"
cd "$work/src/flutebroker"
GO111MODULE=off GOPATH="$work:/usr/share/gocode" GOCACHE="$work/cache" GOFLAGS= \
  go test -count=1 -v . 2>&1
