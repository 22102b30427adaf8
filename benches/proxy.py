"""The API proxy against nginx, same run, with stock load generators from
Debian (wrk for HTTP/1.1 keep-alive, h2load for HTTP/2 prior knowledge).

Three ways to reach the emulator's API (`flute-token-broker emulator`, a
process of its own, route GET /v2/transactions) over loopback:

  (a) direct, with a fixed `Authorization: Bearer` header;
  (b) through the broker's API proxy (`serve --config`, sandbox proxy on
      TCP loopback), which adds the current token;
  (c) through nginx from Debian as a reverse proxy adding the same fixed
      header, with an upstream keep-alive pool (its configuration below).

Run:  cargo build --release && python3 benches/proxy.py
Needs wrk, h2load (nghttp2-client) and nginx.

Each row: requests/s, latency p50/p99, non-2xx answers; for (b) and (c)
the proxy's CPU time per request (user + system, nginx's workers
included), and for (b) the broker's resident memory after the run (VmRSS,
and the peak VmHWM).
"""

import os
import pathlib
import re
import subprocess
import sys
import tempfile

from benchlib import cpu_seconds, free_port, wait_port

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(os.environ.get("FLUTE_BROKER_BIN", ROOT / "target" / "release" / "flute-token-broker"))
DURATION = os.environ.get("PROXY_BENCH_DURATION", "10s")
REQUESTS = int(os.environ.get("PROXY_BENCH_REQUESTS", "100000"))
PATH = "/v2/transactions"

NGINX_CONF = """
worker_processes 2;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    # No connection closed after 1,000 requests (the default): neither the
    # callers' (h2load does not reconnect) nor the upstream pool's.
    keepalive_requests 10000000;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    upstream flute_api {{
        server 127.0.0.1:{api};
        keepalive 64;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{http1};
        listen 127.0.0.1:{http2} http2;
        location / {{
            proxy_pass http://flute_api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {token}";
        }}
    }}
}}
"""


def to_ms(value):
    number = float(re.match(r"[\d.]+", value).group())
    return number * {"us": 0.001, "ms": 1, "s": 1000}[re.search(r"[a-z]+$", value).group()]


def wrk(url, headers=()):
    args = ["wrk", "-t2", "-c64", f"-d{DURATION}", "--latency", url]
    for h in headers:
        args += ["-H", h]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rate, to_ms(lat["50"]), to_ms(lat["99"]), int(bad.group(1)) if bad else 0


def h2load(work, name, url, headers=()):
    log = work / f"{name}.log"
    args = ["h2load", "-n", str(REQUESTS), "-c", "16", "-m", "8", "--log-file", str(log), url]
    for h in headers:
        args += ["-H", h]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    ok = int(re.search(r"status codes: (\d+) 2xx", out).group(1))
    times = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines() if line.strip())
    pick = lambda p: times[min(len(times) - 1, round((len(times) - 1) * p))] / 1000.0
    return rate, pick(0.5), pick(0.99), REQUESTS - ok


def family(pid):
    """A process and its children (nginx's workers)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid, *map(int, children)]


def memory(pid):
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    field = lambda name: int(re.search(rf"^{name}:\s+(\d+)", status, re.M).group(1)) // 1024
    return f"RSS {field('VmRSS')} MiB (peak {field('VmHWM')} MiB)"


def main():
    for tool in ("wrk", "h2load", "nginx"):
        if not any((pathlib.Path(d) / tool).exists() for d in os.environ["PATH"].split(":") + ["/usr/sbin"]):
            sys.exit(f"{tool} is needed (apt-get install wrk nghttp2-client nginx)")
    work = pathlib.Path(tempfile.mkdtemp())
    processes = []
    try:
        secret = work / "secret"
        secret.write_text("bench-secret\n")
        api = free_port()
        processes.append(subprocess.Popen(
            [BIN, "emulator", "--listen", f"127.0.0.1:{api}", "--client-id", "bench", "--client-secret-file", secret,
             "--token-lifetime", "3600s", "--no-refresh-tokens"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(api, "the emulator")
        proxy = free_port()
        config = work / "broker.toml"
        config.write_text(f"""[credentials]
client_id = "bench"
client_secret_file = "{secret}"
[oauth]
allow_insecure_http = true
[server]
listen = ["unix:{work}/broker.sock"]
[admin]
listen = ""
[log]
level = "warn"
[environments.production]
enabled = false
[environments.sandbox]
token_url = "http://127.0.0.1:{api}/oauth2/token"
[environments.sandbox.proxy]
listen = ["127.0.0.1:{proxy}"]
api_url = "http://127.0.0.1:{api}"
""")
        broker = subprocess.Popen([BIN, "serve", "--config", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(broker)
        wait_port(proxy, "the broker's proxy")
        token = subprocess.run([BIN, "get", "--env", "sandbox", "--addr", f"unix:{work}/broker.sock"],
                               capture_output=True, text=True, check=True).stdout.strip()
        bearer = f"Authorization: Bearer {token}"
        http1, http2 = free_port(), free_port()
        (work / "nginx.conf").write_text(NGINX_CONF.format(work=work, api=api, http1=http1, http2=http2, token=token))
        nginx = shutil_which("nginx")
        processes.append(subprocess.Popen([nginx, "-c", work / "nginx.conf", "-p", work],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(http1, "nginx")

        rows = []
        measured = {"broker": broker.pid, "nginx": processes[-1].pid}
        for name, run in [
            ("HTTP/1.1 (wrk -t2 -c64)  direct", lambda: wrk(f"http://127.0.0.1:{api}{PATH}", [bearer])),
            ("HTTP/1.1 (wrk -t2 -c64)  broker proxy", lambda: wrk(f"http://127.0.0.1:{proxy}{PATH}")),
            ("HTTP/1.1 (wrk -t2 -c64)  nginx", lambda: wrk(f"http://127.0.0.1:{http1}{PATH}")),
            ("HTTP/2 (h2load -c16 -m8) direct", lambda: h2load(work, "direct", f"http://127.0.0.1:{api}{PATH}", [bearer])),
            ("HTTP/2 (h2load -c16 -m8) broker proxy", lambda: h2load(work, "broker", f"http://127.0.0.1:{proxy}{PATH}")),
            ("HTTP/2 (h2load -c16 -m8) nginx", lambda: h2load(work, "nginx", f"http://127.0.0.1:{http2}{PATH}")),
        ]:
            who = next((w for w in measured if w in name), None)
            pids = family(measured[who]) if who else []
            cpu_before = cpu_seconds(*pids)
            rate, p50, p99, bad = run()
            extra = ""
            if who:
                served = rate * (int(DURATION.rstrip("s")) if "wrk" in name else REQUESTS / rate)
                extra = f"  {who} CPU {(cpu_seconds(*pids) - cpu_before) / served * 1e6:.1f} us/request"
            if who == "broker":
                extra += f", {memory(broker.pid)}"
            rows.append(f"{name:40} {rate:>9.0f} req/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  non-2xx {bad}{extra}")
            print(rows[-1], flush=True)
    finally:
        for p in reversed(processes):
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def shutil_which(tool):
    import shutil
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin")


if __name__ == "__main__":
    main()
