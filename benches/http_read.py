"""GetToken over gRPC and over the HTTP/JSON read, side by side, measured
with stock load generators from Debian (h2load from nghttp2-client, wrk)
against one release broker (`serve --dev`, 900 s tokens) on its Unix
socket and on TCP loopback. Run:

    cargo build --release && python3 benches/http_read.py

With FLUTE_BROKER_BASELINE=<an older release binary> it also runs gRPC
GetToken against both binaries, alternating, three rounds each: whether the
HTTP face changed the gRPC path.

Each row: requests/s and latency p50/p99 (from h2load's per-request log, or
wrk's --latency). gRPC GetToken is an HTTP/2 POST of the framed
GetTokenRequest, exactly what a gRPC client sends.
"""

import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(os.environ.get("FLUTE_BROKER_BIN", ROOT / "target" / "release" / "flute-token-broker"))
REQUESTS = int(os.environ.get("HTTP_READ_REQUESTS", "200000"))
GRPC_PATH = "/flute.tokenbroker.v1.TokenBroker/GetToken"
HTTP_PATH = "/v1/environments/sandbox/token"
# A gRPC message: not compressed, length 2, GetTokenRequest{environment: SANDBOX}.
GRPC_BODY = bytes([0, 0, 0, 0, 2, 0x08, 0x01])


def percentiles(log):
    times = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines() if line.strip())
    pick = lambda p: times[min(len(times) - 1, round((len(times) - 1) * p))] / 1000.0
    return pick(0.5), pick(0.99), len(times)


def h2load(work, name, base, path, extra, clients, streams):
    log = work / f"{name}.log"
    cmd = ["h2load", "-n", str(REQUESTS), "-c", str(clients), "-m", str(streams), "--log-file", str(log), *extra]
    if base.startswith("unix:"):
        cmd += ["-B", base, f"http://localhost{path}"]
    else:
        cmd += [f"{base}{path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    ok = int(re.search(r"status codes: (\d+) 2xx", out).group(1))
    p50, p99, n = percentiles(log)
    return rate, p50, p99, ok, n


def wrk(base, path):
    out = subprocess.run(["wrk", "-t2", "-c64", "-d10s", "--latency", "-H", "Flute-Broker: true", f"{base}{path}"],
                         capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))
    to_ms = lambda v: float(re.match(r"[\d.]+", v).group()) * {"us": 0.001, "ms": 1, "s": 1000}[re.search(r"[a-z]+$", v).group()]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rate, to_ms(lat["50"]), to_ms(lat["99"]), 0 if non_2xx is None else int(non_2xx.group(1))


def raw_get(sock_path, path):
    """One HTTP/1.1 GET on the Unix socket; (status, headers, body)."""
    import json
    import socket as sk
    with sk.socket(sk.AF_UNIX, sk.SOCK_STREAM) as s:
        s.connect(str(sock_path))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nFlute-Broker: true\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return json.loads(body)


def long_poll_delays(rotations=10):
    """A broker with 2 s tokens (a rotation every second); a gRPC watcher
    (`flute-token-broker watch`) and an HTTP long poll side by side: how
    much later than the watcher the long poll answers each rotation."""
    import threading
    work = pathlib.Path(tempfile.mkdtemp(prefix="long-poll-"))
    sock = work / "broker.sock"
    broker = subprocess.Popen([BIN, "serve", "--dev", "--dev-token-lifetime", "2s", "--admin-listen", "", "--listen", f"unix:{sock}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = {}
    try:
        while not sock.exists():
            time.sleep(0.05)
        watch = subprocess.Popen([BIN, "watch", "--env", "sandbox", "--addr", f"unix:{sock}"], stdout=subprocess.PIPE, text=True)

        def read_watch():
            for line in watch.stdout:
                parts = line.split()
                if len(parts) >= 3 and parts[1] == "token":
                    seen.setdefault(parts[2], time.monotonic())

        threading.Thread(target=read_watch, daemon=True).start()
        etag = raw_get(sock, HTTP_PATH)["token"]["tokenId"]
        delays = []
        while len(delays) < rotations:
            token = raw_get(sock, f"{HTTP_PATH}?wait_for_change=true&last_etag={etag}&timeout_sec=10")["token"]
            answered = time.monotonic()
            etag = token["tokenId"]
            for _ in range(100):
                if etag in seen:
                    break
                time.sleep(0.01)
            delays.append((answered - seen[etag]) * 1000.0)
        watch.terminate()
        return delays
    finally:
        broker.terminate()
        broker.wait()
        shutil.rmtree(work, ignore_errors=True)


def start(binary, work):
    """`serve --dev` of `binary` on a Unix socket in `work` and a TCP port."""
    sock = work / "broker.sock"
    broker = subprocess.Popen([binary, "serve", "--dev", "--admin-listen", "",
                               "--listen", f"unix:{sock}", "--listen", "127.0.0.1:0"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    tcp = None
    for line in broker.stdout:
        m = re.match(r"\s+gRPC:\s+.*?(127\.0\.0\.1:\d+)", line)
        if m:
            tcp = f"http://{m.group(1)}"
        if line.startswith("Stop with"):
            break
    time.sleep(0.5)
    return broker, sock, tcp


def grpc_headers(work):
    (work / "grpc.bin").write_bytes(GRPC_BODY)
    return ["-d", str(work / "grpc.bin"), "-H", "content-type: application/grpc", "-H", "te: trailers"]


def baseline_rounds(baseline, rounds=3):
    """gRPC GetToken, h2load, old and new binaries alternating."""
    results = {"baseline": [], "this build": []}
    for _ in range(rounds):
        for name, binary in (("baseline", baseline), ("this build", BIN)):
            work = pathlib.Path(tempfile.mkdtemp(prefix="ab-"))
            broker, sock, tcp = start(binary, work)
            try:
                unix = h2load(work, "u", f"unix:{sock}", GRPC_PATH, grpc_headers(work), 4, 16)[0]
                tcp_rate = h2load(work, "t", tcp, GRPC_PATH, grpc_headers(work), 4, 16)[0]
                results[name].append((unix, tcp_rate))
            finally:
                broker.terminate()
                broker.wait()
                shutil.rmtree(work, ignore_errors=True)
    print(f"\ngRPC GetToken (h2load, 4 x 16), {rounds} alternating rounds, mean requests/s:")
    for name, runs in results.items():
        print(f"  {name}: Unix socket {statistics.mean(u for u, _ in runs):,.0f}, TCP {statistics.mean(t for _, t in runs):,.0f}"
              f" (runs: {', '.join(f'{u:,.0f}/{t:,.0f}' for u, t in runs)})")


def main():
    for tool in ("h2load", "wrk"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: apt-get install nghttp2-client wrk")
    work = pathlib.Path(tempfile.mkdtemp(prefix="http-read-"))
    broker, sock, tcp = start(BIN, work)
    grpc = grpc_headers(work)
    http_headers = ["-H", "flute-broker: true"]
    rows = []
    try:
        for transport, base in (("Unix socket", f"unix:{sock}"), ("TCP loopback", tcp)):
            rows.append((f"gRPC GetToken, HTTP/2, 4 connections x 16 streams, {transport}",
                         *h2load(work, f"grpc-{transport}", base, GRPC_PATH, grpc, 4, 16)))
            rows.append((f"HTTP/JSON GET, HTTP/2, 4 connections x 16 streams, {transport}",
                         *h2load(work, f"h2-{transport}", base, HTTP_PATH, http_headers, 4, 16)))
            rows.append((f"HTTP/JSON GET, HTTP/1.1 keep-alive, 64 connections, {transport}",
                         *h2load(work, f"h1-{transport}", base, HTTP_PATH, ["--h1", *http_headers], 64, 1)))
        rate, p50, p99, bad = wrk(tcp, HTTP_PATH)
        rows.append(("HTTP/JSON GET, HTTP/1.1 keep-alive, wrk -t2 -c64 10 s, TCP loopback", rate, p50, p99, None, bad))
    finally:
        broker.terminate()
        broker.wait()
        shutil.rmtree(work, ignore_errors=True)
    print("| measurement | requests/s | p50 | p99 | answered 2xx |")
    print("|---|---|---|---|---|")
    for name, rate, p50, p99, ok, n in rows:
        answered = f"{ok:,} of {n:,}" if ok is not None else f"{n} non-2xx"
        print(f"| {name} | {rate:,.0f} | {p50:.3f} ms | {p99:.3f} ms | {answered} |")
    if os.environ.get("FLUTE_BROKER_BASELINE"):
        baseline_rounds(os.environ["FLUTE_BROKER_BASELINE"])
    delays = long_poll_delays()
    print(f"\nlong poll vs gRPC watcher, 10 rotations: the long poll answered {min(delays):+.1f} … {max(delays):+.1f} ms "
          f"from the watcher's line (median {statistics.median(delays):+.1f} ms; negative: the long poll was first)")


main()
