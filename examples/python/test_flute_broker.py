"""The Python client against a real `flute-token-broker serve --dev` process.

Run with FLUTE_BROKER_BIN pointing at the built binary (.ci/run does this).
"""

import json
import os
import subprocess
import tempfile
import time
import urllib.request

import grpc
import pytest

from flute_broker import BrokerClient, BrokerError

BIN = os.environ.get("FLUTE_BROKER_BIN", os.path.join(os.path.dirname(__file__), "..", "..", "target", "debug", "flute-token-broker"))


@pytest.fixture(scope="module", params=["unix", "tcp"])
def broker(request):
    """A `serve --dev` broker listening on a Unix socket and a TCP port; the
    client uses one of them with grpcio's default channel options."""
    tmp = tempfile.mkdtemp()
    sock = os.path.join(tmp, "broker.sock")
    proc = subprocess.Popen(
        [BIN, "serve", "--dev", "--dev-token-lifetime", "3s", "--admin-listen", "",
         "--listen", f"unix:{sock}", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    emulator, tcp = None, None
    deadline = time.monotonic() + 30
    for line in proc.stdout:
        fields = line.split()
        if line.strip().startswith("emulator:"):
            emulator = fields[1]
        if line.strip().startswith("gRPC:"):
            tcp = fields[-1]
        if line.startswith("Stop with") or time.monotonic() > deadline:
            break
    assert emulator and tcp, "serve --dev printed no emulator or gRPC address"
    client = BrokerClient(f"unix:{sock}" if request.param == "unix" else tcp)
    yield client, emulator
    client.close()
    proc.terminate()
    assert proc.wait(timeout=15) == 0


def test_get_token_and_call_the_api(broker):
    client, emulator = broker
    token = client.get_token("sandbox")
    assert token.token_type == "Bearer"
    assert len(token.token_id) == 12
    assert token.expires_at.ToDatetime() > token.issued_at.ToDatetime()
    status, body = client.authorized_get(f"{emulator}/v2/transactions", "sandbox")
    assert status == 200
    assert json.loads(body)["transactions"]


def test_min_remaining(broker):
    client, _ = broker
    token = client.get_token("production", min_remaining_seconds=1)
    assert token.environment == client.pb2.ENVIRONMENT_PRODUCTION


def test_watch_token_streams_rotations(broker):
    client, _ = broker
    seen = []
    for kind, value in client.watch_tokens("sandbox"):
        assert kind == "token"
        seen.append(value.token_id)
        if len(seen) == 3:
            break
    assert len(set(seen)) == 3, seen


def test_refresh_token_replaces_a_rejected_token(broker):
    client, _ = broker
    token = client.get_token("sandbox")
    newer = client.refresh_token("sandbox", token.token_id)
    assert newer.token_id != token.token_id


def test_errors_carry_grpc_codes(broker):
    client, _ = broker
    with pytest.raises(grpc.RpcError) as error:
        client.stub.GetToken(client.pb2.GetTokenRequest(environment=client.pb2.ENVIRONMENT_UNSPECIFIED), timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_errors_carry_a_stable_reason(broker):
    client, _ = broker
    with pytest.raises(BrokerError) as error:
        client.get_token("sandbox", min_remaining_seconds=3600)
    assert error.value.code == grpc.StatusCode.OUT_OF_RANGE
    assert error.value.reason == "MIN_REMAINING_TOO_LONG"
    assert error.value.metadata["environment"] == "sandbox"
    assert not error.value.retryable


def set_faults(emulator, **faults):
    request = urllib.request.Request(
        f"{emulator}/__emulator/faults",
        data=json.dumps(faults).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


def test_an_outage_is_waited_out_as_retry_info_says(broker):
    client, emulator = broker
    set_faults(emulator, refuse_all=True, status=503, retry_after=1)
    try:
        # The last token expires (3 s tokens); the broker then answers
        # NO_VALID_TOKEN with the time of its next attempt as RetryInfo.
        deadline = time.monotonic() + 30
        while True:
            try:
                client.get_token("sandbox")
            except BrokerError as error:
                outage = error
                break
            assert time.monotonic() < deadline, "the token never expired"
            time.sleep(0.1)
        assert outage.code == grpc.StatusCode.UNAVAILABLE
        assert outage.reason == "NO_VALID_TOKEN"
        assert outage.retryable
        assert outage.retry_after is not None and outage.retry_after >= 0
    finally:
        set_faults(emulator, clear=True)
    token = client.get_token_waiting("sandbox", deadline_seconds=30)
    assert token.token_type == "Bearer"


def test_reflection_lists_the_service(broker):
    # grpcio-reflection speaks only grpc.reflection.v1alpha.
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    client, _ = broker
    services = ProtoReflectionDescriptorDatabase(client.channel).get_services()
    assert "flute.tokenbroker.v1.TokenBroker" in services
    assert "grpc.health.v1.Health" in services


def test_health(broker):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    client, _ = broker
    health = health_pb2_grpc.HealthStub(client.channel)
    request = health_pb2.HealthCheckRequest(service="flute.tokenbroker.v1.TokenBroker")
    reply = health.Check(request, timeout=5)
    assert reply.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
    # SERVING once every environment holds a token (an earlier test may have
    # left one recovering from an outage): follow the Watch stream until then.
    for update in health.Watch(request, timeout=30):
        if update.status == health_pb2.HealthCheckResponse.SERVING:
            break
    else:
        raise AssertionError("the health stream ended before SERVING")


def start_dev(sock):
    """`serve --dev` on `sock`; returns the process once its banner is out."""
    proc = subprocess.Popen(
        [BIN, "serve", "--dev", "--admin-listen", "", "--listen", f"unix:{sock}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("Stop with"):
            return proc
    raise AssertionError("serve --dev exited before its banner")


def wait_until(what, condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_follower_and_get_token_survive_a_handover():
    """Two brokers on one socket, as a DaemonSet rolling update runs them:
    the follower's stream on the old broker ends with SHUTTING_DOWN, it
    reconnects at once and holds the new broker's current token; GetToken
    with the library's defaults (plus wait_for_ready) keeps answering."""
    import threading

    tmp = tempfile.mkdtemp()
    sock = os.path.join(tmp, "broker.sock")
    old = start_dev(sock)
    client = BrokerClient(f"unix:{sock}")
    first = client.get_token("sandbox")
    seen = []
    follower = BrokerClient(f"unix:{sock}")

    def follow():
        for kind, value in follower.follow_tokens("sandbox"):
            if kind == "token":
                seen.append(value.token_id)

    threading.Thread(target=follow, daemon=True).start()
    wait_until("the follower has the first token", lambda: first.token_id in seen)
    inode = os.stat(sock).st_ino
    new = start_dev(sock)
    wait_until("the new broker takes over the socket", lambda: os.stat(sock).st_ino != inode)
    old.terminate()
    assert old.wait(timeout=15) == 0
    current = BrokerClient(f"unix:{sock}").get_token("sandbox")
    assert current.token_id != first.token_id, "a new caller reaches the new broker"
    wait_until("the follower holds the new broker's token", lambda: seen and seen[-1] == current.token_id)
    assert client.get_token("sandbox").token_id == current.token_id, "the old channel reconnected"
    new.terminate()
    assert new.wait(timeout=15) == 0
