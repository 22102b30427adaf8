"""A copyable Python client for flute-token-broker.

Requires `grpcio` and `grpcio-tools` (pip install grpcio grpcio-tools).
Stubs are generated from the broker's proto at import time, so nothing
generated needs to be committed; copy this file and point PROTO_ROOT (or the
`proto_root` argument) at a copy of the broker's `proto/` directory.

    from flute_broker import BrokerClient
    broker = BrokerClient("unix:/run/flute-token-broker/broker.sock")
    token = broker.get_token("sandbox")
    headers = {"Authorization": f"Bearer {token.access_token}"}
"""

import importlib
import os
import sys
import tempfile
import urllib.error
import urllib.request

import grpc

PROTO_ROOT = os.environ.get(
    "FLUTE_BROKER_PROTO_ROOT",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto"),
)
PROTO_FILE = "flute/tokenbroker/v1/token_broker.proto"

_stubs = None


def load_stubs(proto_root=PROTO_ROOT):
    """Generates and imports the message and service modules (once)."""
    global _stubs
    if _stubs is None:
        import grpc_tools
        from grpc_tools import protoc

        out = tempfile.mkdtemp(prefix="flute_broker_stubs_")
        well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
        args = [
            "protoc",
            f"-I{proto_root}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            PROTO_FILE,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"cannot compile {PROTO_FILE} from {proto_root}")
        sys.path.insert(0, out)
        pb2 = importlib.import_module("flute.tokenbroker.v1.token_broker_pb2")
        pb2_grpc = importlib.import_module("flute.tokenbroker.v1.token_broker_pb2_grpc")
        _stubs = (pb2, pb2_grpc)
    return _stubs


class BrokerClient:
    """GetToken, WatchToken and RefreshToken over TCP ("127.0.0.1:50051") or a
    Unix socket ("unix:/path/broker.sock")."""

    def __init__(self, target="127.0.0.1:50051", proto_root=PROTO_ROOT):
        self.pb2, pb2_grpc = load_stubs(proto_root)
        options = []
        if target.startswith("unix:"):
            # grpc-core sends the socket path as :authority, which HTTP/2
            # servers such as the broker's reject; name a plain host instead.
            options.append(("grpc.default_authority", "localhost"))
        self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb2_grpc.TokenBrokerStub(self.channel)

    def environment(self, name):
        return self.pb2.Environment.Value(f"ENVIRONMENT_{name.upper()}")

    def get_token(self, environment, min_remaining_seconds=None, timeout=10.0):
        """The current token (a `Token` message). Raises grpc.RpcError:
        UNAVAILABLE when the broker has no valid token (retry later)."""
        request = self.pb2.GetTokenRequest(environment=self.environment(environment))
        if min_remaining_seconds is not None:
            request.min_remaining.FromSeconds(int(min_remaining_seconds))
        return self.stub.GetToken(request, timeout=timeout).token

    def watch_tokens(self, environment):
        """Yields ("token", Token) or ("outage", Outage), the current state first."""
        request = self.pb2.WatchTokenRequest(environment=self.environment(environment))
        for update in self.stub.WatchToken(request):
            kind = update.WhichOneof("update")
            yield kind, getattr(update, kind)

    def refresh_token(self, environment, rejected_token_id, timeout=10.0):
        """Report a token the API answered 401 to; returns a newer one."""
        request = self.pb2.RefreshTokenRequest(
            environment=self.environment(environment), rejected_token_id=rejected_token_id
        )
        return self.stub.RefreshToken(request, timeout=timeout).token

    def authorized_get(self, url, environment, timeout=10.0):
        """GET `url` with a bearer token; on 401, ask the broker for a newer
        token and retry once. Returns (status, body bytes)."""
        token = self.get_token(environment)
        for attempt in range(2):
            request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token.access_token}"})
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as error:
                if error.code != 401 or attempt == 1:
                    return error.code, error.read()
                token = self.refresh_token(environment, token.token_id)
        raise AssertionError("unreachable")

    def close(self):
        self.channel.close()
