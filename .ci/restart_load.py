"""Callers of a broker that is restarted or replaced, measured.

Used by the systemd stage (`systemctl restart` under socket activation)
and the pod probe (a DaemonSet rolling update: two brokers on one hostPath
directory). While `action` runs, three callers use the broker's Unix
socket as stock clients do:

- a persistent Python grpcio channel with default options (fail-fast, no
  wait-for-ready, no retry policy), GetToken every 10 ms;
- `flute-token-broker get`, a new process and connection per call, every
  10 ms;
- `flute-token-broker watch`, whose token lines are timestamped;
- optionally, HTTP/1.1 POSTs through the API proxy's socket, a connection
  per call (http.client).

Needs grpcio and grpcio-tools (the examples' requirements).
"""

import pathlib
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples" / "python"))

INTERVAL = 0.010


class Caller:
    """Outcomes of one caller: counts, the first errors, the longest time
    between two answered calls."""

    def __init__(self, name):
        self.name = name
        self.ok = 0
        self.failed = 0
        self.errors = []
        self.last_ok = None
        self.longest_gap = 0.0
        self.gap_end = None
        # Every gap over 5 intervals, as (start, end) in time.monotonic()
        # (CLOCK_MONOTONIC, the clock of systemd's *TimestampMonotonic).
        self.gaps = []

    def record(self, error=None):
        now = time.monotonic()
        if error is None:
            self.ok += 1
            if self.last_ok is not None and now - self.last_ok > self.longest_gap:
                self.longest_gap, self.gap_end = now - self.last_ok, now
            if self.last_ok is not None and now - self.last_ok > 5 * INTERVAL:
                self.gaps.append((self.last_ok, now))
            self.last_ok = now
        else:
            self.failed += 1
            if len(self.errors) < 5:
                self.errors.append(error)

    def longest_gap_within(self, start, end):
        """The longest gap that overlaps [start, end], in seconds (0 if none)."""
        return max((e - s for s, e in self.gaps if s <= end and e >= start), default=0.0)

    def longest_gap_outside(self, start, end):
        """The longest gap entirely before `start` or after `end`."""
        return max((e - s for s, e in self.gaps if e < start or s > end), default=0.0)

    def summary(self):
        errors = f" ({'; '.join(self.errors)})" if self.errors else ""
        return f"{self.name}: {self.ok + self.failed} calls, {self.failed} failed{errors}, longest gap {self.longest_gap * 1000:.0f} ms"


def _pace(started):
    time.sleep(max(0.0, INTERVAL - (time.monotonic() - started)))


def grpc_caller(socket_path, stop, caller):
    import grpc
    from flute_broker import load_stubs

    pb2, pb2_grpc = load_stubs(str(REPO / "proto"))
    channel = grpc.insecure_channel(f"unix:{socket_path}")  # default options
    stub = pb2_grpc.TokenBrokerStub(channel)
    request = pb2.GetTokenRequest(environment=pb2.ENVIRONMENT_SANDBOX)
    while not stop.is_set():
        started = time.monotonic()
        try:
            stub.GetToken(request, timeout=5.0)
            caller.record()
        except grpc.RpcError as error:
            caller.record(f"{error.code().name}: {error.details()}")
        _pace(started)
    channel.close()


def process_caller(binary, socket_path, stop, caller):
    while not stop.is_set():
        started = time.monotonic()
        result = subprocess.run(
            [binary, "get", "--env", "sandbox", "--addr", f"unix:{socket_path}", "--timeout", "5s"],
            capture_output=True,
            text=True,
        )
        caller.record(None if result.returncode == 0 else f"exit {result.returncode}: {result.stderr.strip()}")
        _pace(started)


def proxy_caller(socket_path, stop, caller):
    """The API proxy as a stock HTTP/1.1 client uses it: a connection per
    call (http.client over the Unix socket), a JSON POST every 10 ms that
    must be answered 200 by the API behind it."""
    import http.client
    import socket

    class UnixConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(self.timeout)
            self.sock.connect(socket_path)

    n = 0
    while not stop.is_set():
        started = time.monotonic()
        n += 1
        connection = UnixConnection("localhost", timeout=5.0)
        try:
            connection.request("POST", "/v2/payments", body=f'{{"n": {n}}}', headers={"Content-Type": "application/json"})
            answer = connection.getresponse()
            body = answer.read()
            caller.record(None if answer.status == 200 else f"HTTP {answer.status}: {body[:200]!r}")
        except OSError as error:
            caller.record(f"{type(error).__name__}: {error}")
        finally:
            connection.close()
        _pace(started)


class Watcher:
    """`flute-token-broker watch`, each token line with the time it arrived."""

    def __init__(self, binary, socket_path):
        self.lines = []
        self.process = subprocess.Popen(
            [binary, "watch", "--env", "sandbox", "--addr", f"unix:{socket_path}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.strip()))

    def token_ids(self):
        return [(at, line.split()[2]) for at, line in self.lines if line.startswith("sandbox token ")]

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=10)


def run(socket_path, binary, action, duration=12.0, action_at=4.0, proxy=None):
    """Runs the callers for `duration` seconds and `action()` at
    `action_at`; returns (grpc caller, process caller, watcher, what the
    action returned, when it started). With `proxy` = (the API proxy's
    socket, a Caller), that caller POSTs through the proxy meanwhile."""
    stop = threading.Event()
    callers = [Caller("grpcio, one channel, default options"), Caller("flute-token-broker get, a connection per call")]
    threads = [
        threading.Thread(target=grpc_caller, args=(socket_path, stop, callers[0])),
        threading.Thread(target=process_caller, args=(binary, socket_path, stop, callers[1])),
    ]
    if proxy is not None:
        threads.append(threading.Thread(target=proxy_caller, args=(proxy[0], stop, proxy[1])))
    watcher = Watcher(binary, socket_path)
    begin = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        time.sleep(action_at)
        action_started = time.monotonic()
        outcome = action()
        time.sleep(max(0.0, duration - (time.monotonic() - begin)))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        watcher.stop()
    return callers[0], callers[1], watcher, outcome, action_started
