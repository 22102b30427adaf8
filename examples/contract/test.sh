#!/usr/bin/env bash
# The contract compiles alone: copies token_broker.proto (and nothing else)
# into an empty directory, generates Python, C++ and Ruby stubs from it with
# stock tools, and calls GetToken on `serve --dev` with each. Python runs in
# a virtualenv holding only grpcio and grpcio-tools. Needs FLUTE_BROKER_BIN,
# python3, and Debian's protobuf-compiler-grpc, libgrpc++-dev, pkg-config,
# ruby-grpc and ruby-grpc-tools.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
broker_pid=""
cleanup() { [ -n "$broker_pid" ] && kill "$broker_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
cp "$here/../../proto/flute/tokenbroker/v1/token_broker.proto" "$work/"
cd "$work"

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
target="127.0.0.1:$port"
"$FLUTE_BROKER_BIN" serve --dev --listen "$target" --admin-listen "" >broker.log 2>&1 &
broker_pid=$!

echo "-- Python: grpcio and grpcio-tools only"
python3 -m venv venv
venv/bin/pip install --quiet --disable-pip-version-check \
  "grpcio==$(grep '^grpcio==' "$here/../python/requirements.txt" | cut -d= -f3)" \
  "grpcio-tools==$(grep '^grpcio-tools==' "$here/../python/requirements.txt" | cut -d= -f3)"
mkdir py
venv/bin/python -m grpc_tools.protoc -I. --python_out=py --grpc_python_out=py token_broker.proto
if venv/bin/python -c 'import google.api' 2>/dev/null; then
  echo "the Python environment has googleapis protos: not a contract-alone check" >&2
  exit 1
fi
venv/bin/python "$here/get_token.py" py "$target"

echo "-- C++: protoc and grpc_cpp_plugin"
mkdir cpp
protoc -I. --cpp_out=cpp --grpc_out=cpp --plugin=protoc-gen-grpc="$(command -v grpc_cpp_plugin)" token_broker.proto
g++ -std=c++17 -O0 -Icpp -o get_token "$here/get_token.cc" cpp/token_broker.pb.cc cpp/token_broker.grpc.pb.cc \
  $(pkg-config --cflags --libs grpc++ protobuf)
./get_token "$target"

echo "-- Ruby: grpc_tools_ruby_protoc"
mkdir rb
grpc_tools_ruby_protoc -I. --ruby_out=rb --grpc_out=rb token_broker.proto
ruby "$here/get_token.rb" rb "$target"
