"""The proxy variant (through_proxy.py) with Python `requests` against a
real `flute-token-broker serve --dev --proxy sandbox=127.0.0.1:0`.

Run with FLUTE_BROKER_BIN pointing at the built binary (.ci/run does this).
"""

import os
import subprocess
import tempfile
import time

import pytest
import requests

from through_proxy import FluteApi

BIN = os.environ.get("FLUTE_BROKER_BIN", os.path.join(os.path.dirname(__file__), "..", "..", "target", "debug", "flute-token-broker"))


@pytest.fixture(scope="module")
def proxied():
    """A dev broker with a sandbox proxy on a loopback port; the API client
    on it and the emulator's address (for its faults and stats)."""
    tmp = tempfile.mkdtemp()
    proc = subprocess.Popen(
        [BIN, "serve", "--dev", "--admin-listen", "", "--listen", f"unix:{tmp}/broker.sock",
         "--proxy", "sandbox=127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    emulator, proxy = None, None
    deadline = time.monotonic() + 30
    for line in proc.stdout:
        fields = line.split()
        if line.strip().startswith("emulator:"):
            emulator = fields[1]
        if line.strip().startswith("proxy:"):
            proxy = fields[2]
        if line.startswith("Stop with") or time.monotonic() > deadline:
            break
    assert emulator and proxy, "serve --dev printed no emulator or proxy address"
    api = FluteApi(proxy)
    yield api, emulator
    api.close()
    proc.terminate()
    assert proc.wait(timeout=15) == 0


def test_get_and_post_without_a_token(proxied):
    api, _ = proxied
    listed = api.get("/v2/transactions")
    assert listed.status_code == 200
    assert listed.json()["transactions"]
    echo = api.post("/v2/payments", json={"amount": 1250, "currency": "USD"}, params={"dry_run": "1"})
    assert echo.status_code == 200
    seen = echo.json()
    assert seen["method"] == "POST" and seen["path"] == "/v2/payments" and seen["query"] == "dry_run=1"
    assert seen["body_bytes"] == len(echo.request.body)
    assert len(seen["token_id"]) == 12, "the API saw a bearer token"
    assert "authorization" not in {k.lower() for k in echo.request.headers}, "the client sent none"


def test_a_revoked_token_never_reaches_the_caller(proxied):
    api, emulator = proxied
    before = api.post("/v2/payments", json={"n": 1}).json()["token_id"]
    # This emulator serves both environments: revoke the sandbox token by its id.
    requests.post(f"{emulator}/__emulator/faults", json={"revoke_token_id": before}, timeout=10).raise_for_status()
    after = api.post("/v2/payments", json={"n": 2})
    assert after.status_code == 200, after.text
    assert after.json()["token_id"] != before
    assert "flute-broker-not-retried" not in {k.lower() for k in after.headers}


def test_a_path_leaving_the_api_is_refused(proxied):
    api, _ = proxied
    # requests normalises "..", so send the encoded form it keeps.
    refused = api.get("/v2/%2e%2e/admin")
    assert refused.status_code == 400
    assert refused.json()["details"][0]["reason"] == "INVALID_TARGET"
