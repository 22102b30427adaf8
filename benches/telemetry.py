"""GetToken with traces off, on with a live collector, on with a dead one
and on with one that accepts connections but never answers (`[telemetry]`,
1 % sampling), same run, alternating, two rounds: what tracing costs a
caller. The live collector is an OTLP/gRPC receiver in this script (grpcio,
opentelemetry-proto) that counts the spans it gets; the dead one is a port
nobody listens on; the hung one a socket that accepts and holds. Load:
h2load, gRPC GetToken over TCP.

    cargo build --release && python3 benches/telemetry.py

Needs h2load (nghttp2-client) and the Python packages grpcio and
opentelemetry-proto. Each row: requests/s, latency p50/p99 (h2load's
per-request log), the broker's CPU time per call (user + system).
"""

import concurrent.futures
import os
import pathlib
import re
import socket
import subprocess
import tempfile

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from benchlib import cpu_seconds, free_port, wait_port

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(os.environ.get("FLUTE_BROKER_BIN", ROOT / "target" / "release" / "flute-token-broker"))
REQUESTS = int(os.environ.get("TELEMETRY_BENCH_REQUESTS", "100000"))
GET_TOKEN = "/flute.tokenbroker.v1.TokenBroker/GetToken"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    spans = 0

    def Export(self, request, context):
        Receiver.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def run(work, name, emulator, secret, collector):
    port = free_port()
    telemetry = "" if collector is None else (
        f'[telemetry]\nendpoint = "{collector}"\nservice_name = "bench-{name}"\nsampling_ratio = 0.01\nexport_interval = "1s"\n'
    )
    config = work / f"{name}.toml"
    config.write_text(
        f'[credentials]\nclient_id = "bench"\nclient_secret_file = "{secret}"\n[oauth]\nallow_insecure_http = true\n'
        f'[server]\nlisten = ["127.0.0.1:{port}"]\n[admin]\nlisten = ""\n[log]\nlevel = "warn"\n'
        f'[environments.production]\nenabled = false\n[environments.sandbox]\ntoken_url = "{emulator}/oauth2/token"\n{telemetry}'
    )
    broker = subprocess.Popen([BIN, "serve", "--config", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        body = work / "get_token.bin"
        body.write_bytes(bytes([0, 0, 0, 0, 2, 0x08, 0x01]))
        log = work / f"{name}.log"
        load = ["h2load", "-n", str(REQUESTS), "-c", "4", "-m", "4", "--log-file", str(log), "-d", str(body),
                "-H", "content-type: application/grpc", "-H", "te: trailers", f"http://127.0.0.1:{port}{GET_TOKEN}"]
        subprocess.run(load[:1] + ["-n", "2000"] + load[3:], capture_output=True, check=True)  # warm-up
        before = cpu_seconds(broker.pid)
        out = subprocess.run(load, capture_output=True, text=True, check=True).stdout
        used = cpu_seconds(broker.pid) - before
        rate = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
        ok = int(re.search(r"status codes: (\d+) 2xx", out).group(1))
        times = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines() if line.strip())
        pick = lambda p: times[min(len(times) - 1, round((len(times) - 1) * p))] / 1000.0
        return rate, pick(0.5), pick(0.99), used / REQUESTS * 1e6, REQUESTS - ok
    finally:
        broker.terminate()
        broker.wait(timeout=20)


def main():
    work = pathlib.Path(tempfile.mkdtemp())
    secret = work / "secret"
    secret.write_text("bench-secret\n")
    secret.chmod(0o600)
    api = free_port()
    emulator = subprocess.Popen([BIN, "emulator", "--listen", f"127.0.0.1:{api}", "--client-id", "bench",
                                 "--client-secret-file", secret, "--token-lifetime", "3600s", "--no-refresh-tokens"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    live = server.add_insecure_port("127.0.0.1:0")
    server.start()
    dead = free_port()
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)  # accepted by the kernel, never read or answered
    try:
        wait_port(api)
        modes = [("off", None), ("live", f"http://127.0.0.1:{live}"), ("dead", f"http://127.0.0.1:{dead}"),
                 ("hung", f"http://127.0.0.1:{hung.getsockname()[1]}")]
        for round_ in (1, 2):
            for name, collector in modes:
                rate, p50, p99, cpu, bad = run(work, f"{name}{round_}", f"http://127.0.0.1:{api}", secret, collector)
                print(f"round {round_}  traces {name:<4}  {rate:>8.0f} req/s  p50 {p50:5.2f} ms  p99 {p99:5.2f} ms  "
                      f"CPU {cpu:5.1f} us/call  non-2xx {bad}", flush=True)
        print(f"spans received by the live collector: {Receiver.spans}")
    finally:
        server.stop(0)
        emulator.terminate()


if __name__ == "__main__":
    main()
