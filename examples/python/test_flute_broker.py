"""The Python client against a real `flute-token-broker serve --dev` process.

Run with FLUTE_BROKER_BIN pointing at the built binary (.ci/run does this).
"""

import json
import os
import subprocess
import tempfile
import time

import grpc
import pytest

from flute_broker import BrokerClient

BIN = os.environ.get("FLUTE_BROKER_BIN", os.path.join(os.path.dirname(__file__), "..", "..", "target", "debug", "flute-token-broker"))


@pytest.fixture(scope="module")
def broker():
    tmp = tempfile.mkdtemp()
    sock = os.path.join(tmp, "broker.sock")
    proc = subprocess.Popen(
        [BIN, "serve", "--dev", "--dev-token-lifetime", "3s", "--admin-listen", "", "--listen", f"unix:{sock}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    emulator = None
    deadline = time.monotonic() + 30
    for line in proc.stdout:
        if line.strip().startswith("emulator:"):
            emulator = line.split()[1]
        if line.startswith("Stop with") or time.monotonic() > deadline:
            break
    assert emulator, "serve --dev printed no emulator address"
    client = BrokerClient(f"unix:{sock}")
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
