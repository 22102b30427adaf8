"""A copyable Python client for flute-token-broker.

Requires `grpcio`, `grpcio-tools` and `grpcio-status`
(pip install grpcio grpcio-tools grpcio-status).
Stubs are generated from the broker's proto at import time, so nothing
generated needs to be committed; copy this file and point PROTO_ROOT (or the
`proto_root` argument) at a copy of the broker's `proto/` directory.

    from flute_broker import BrokerClient
    broker = BrokerClient("unix:/run/flute-token-broker/broker.sock")
    token = broker.get_token("sandbox")
    headers = {"Authorization": f"Bearer {token.access_token}"}

Every failure is a `BrokerError` whose `reason` is the stable
`google.rpc.ErrorInfo` reason the broker attaches (listed in the proto);
branch on it, never on the message text. `get_token_waiting` shows how: it
waits out NO_VALID_TOKEN as the attached `google.rpc.RetryInfo` says.
"""

import importlib
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

PROTO_ROOT = os.environ.get(
    "FLUTE_BROKER_PROTO_ROOT",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto"),
)
PROTO_FILE = "flute/tokenbroker/v1/token_broker.proto"

_stubs = None

ERROR_DOMAIN = "tokenbroker.flute.com"

# Reasons after which the same call can succeed later.
RETRYABLE_REASONS = {"NO_VALID_TOKEN", "TOKEN_WAIT_EXCEEDED", "SHUTTING_DOWN"}


class BrokerError(Exception):
    """A failed broker call: the gRPC code, the broker's stable reason (None
    for transport errors, which carry no ErrorInfo), the reason's metadata
    (such as "environment") and the suggested retry delay in seconds."""

    def __init__(self, code, message, reason=None, metadata=None, retry_after=None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata or {}
        self.retry_after = retry_after

    @classmethod
    def from_rpc_error(cls, error):
        reason, metadata, retry_after = None, {}, None
        status = rpc_status.from_call(error)
        for detail in status.details if status is not None else []:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                if info.domain == ERROR_DOMAIN:
                    reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after = retry.retry_delay.ToTimedelta().total_seconds()
        return cls(error.code(), error.details(), reason, metadata, retry_after)

    @property
    def retryable(self):
        return self.reason in RETRYABLE_REASONS


def _call(method, request, **kwargs):
    # wait_for_ready: a broker started by hand or restarted without systemd's
    # socket (or between a DaemonSet's pods) is briefly not listening; the
    # call then waits for it within its timeout instead of failing at once.
    # Under socket activation or the DaemonSet handover the default
    # (fail-fast) never sees a gap; this costs nothing there.
    try:
        return method(request, wait_for_ready=True, **kwargs)
    except grpc.RpcError as error:
        raise BrokerError.from_rpc_error(error) from None


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
        self.channel = grpc.insecure_channel(target)
        self.stub = pb2_grpc.TokenBrokerStub(self.channel)

    def environment(self, name):
        return self.pb2.Environment.Value(f"ENVIRONMENT_{name.upper()}")

    def get_token(self, environment, min_remaining_seconds=None, timeout=10.0):
        """The current token (a `Token` message). Raises BrokerError, e.g.
        reason NO_VALID_TOKEN (retry after `retry_after` seconds) or
        ENVIRONMENT_NOT_ENABLED / CALLER_NOT_ALLOWED (retrying cannot help)."""
        request = self.pb2.GetTokenRequest(environment=self.environment(environment))
        if min_remaining_seconds is not None:
            request.min_remaining.FromSeconds(int(min_remaining_seconds))
        return _call(self.stub.GetToken, request, timeout=timeout).token

    def get_token_waiting(self, environment, deadline_seconds=60.0, default_retry_seconds=1.0):
        """As get_token, but waits out retryable failures (an endpoint outage
        longer than a token's life, a restarting broker) for up to
        `deadline_seconds`, sleeping as the broker's RetryInfo suggests.
        Anything else, and the last failure at the deadline, is raised."""
        deadline = time.monotonic() + deadline_seconds
        while True:
            left = deadline - time.monotonic()
            try:
                return self.get_token(environment, timeout=max(left, 0.1))
            except BrokerError as error:
                left = deadline - time.monotonic()
                if not error.retryable or left <= 0:
                    raise
                wait = error.retry_after if error.retry_after is not None else default_retry_seconds
                time.sleep(min(max(wait, 0.05), left))

    def watch_tokens(self, environment):
        """Yields ("token", Token) or ("outage", Outage), the current state first."""
        request = self.pb2.WatchTokenRequest(environment=self.environment(environment))
        try:
            for update in self.stub.WatchToken(request, wait_for_ready=True):
                kind = update.WhichOneof("update")
                yield kind, getattr(update, kind)
        except grpc.RpcError as error:
            raise BrokerError.from_rpc_error(error) from None

    def follow_tokens(self, environment, max_backoff_seconds=30.0):
        """Like watch_tokens, for ever: when the broker ends the stream
        because it stops or restarts (reason SHUTTING_DOWN) it reconnects at
        once, to the successor or another replica, and the current token
        comes first again; when the broker cannot be reached it retries after
        1 s, 2 s, 4 s ... up to `max_backoff_seconds`. Any other error is
        raised."""
        backoff = 0.0
        while True:
            try:
                for update in self.watch_tokens(environment):
                    backoff = 0.0
                    yield update
                error = None
            except BrokerError as e:
                error = e
            if error is not None and error.reason == "SHUTTING_DOWN":
                continue
            if error is not None and not (error.reason is None and error.code == grpc.StatusCode.UNAVAILABLE):
                raise error
            backoff = min(max(backoff * 2, 1.0), max_backoff_seconds)
            time.sleep(backoff)

    def refresh_token(self, environment, rejected_token_id, timeout=10.0):
        """Report a token the API answered 401 to; returns a newer one."""
        request = self.pb2.RefreshTokenRequest(
            environment=self.environment(environment), rejected_token_id=rejected_token_id
        )
        return _call(self.stub.RefreshToken, request, timeout=timeout).token

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
