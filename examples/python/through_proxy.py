"""Calling Flute through the broker's API proxy: no token handling at all.

The service's only change is its base URL: the broker's proxy listener
(`[environments.sandbox.proxy] listen`, or `serve --dev --proxy
sandbox=127.0.0.1:8481`) instead of https://sandbox.api.flute.com, and no
Authorization header. The broker adds the current token and absorbs the 401
of a rotated or revoked token; this code never sees either.

    python through_proxy.py http://127.0.0.1:8481
"""

import sys

import requests


class FluteApi:
    """A plain `requests` session on the proxy's base URL."""

    def __init__(self, base_url="http://127.0.0.1:8481", timeout=30.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()

    def get(self, path, **kwargs):
        return self.session.get(self.base_url + path, timeout=self.timeout, **kwargs)

    def post(self, path, json=None, **kwargs):
        return self.session.post(self.base_url + path, json=json, timeout=self.timeout, **kwargs)

    def close(self):
        self.session.close()


def main():
    api = FluteApi(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8481")
    answer = api.get("/v2/transactions")
    # A 401 here would be the broker's: its Flute-Broker-Not-Retried header
    # says why it could not retry (the refresh has happened already).
    answer.raise_for_status()
    print(answer.text)
    api.close()


if __name__ == "__main__":
    main()
