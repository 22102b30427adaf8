#!/usr/bin/env python3
"""The shipped systemd unit under a real systemd as PID 1.

Builds a minimal Debian 12 root once (debootstrap --variant=minbase: no
ca-certificates, no sudo), then boots a fresh copy of it twice with
systemd-nspawn -b (its own network namespace, the repository bound
read-only at /src) and, inside, replays deploy/operations.md's install
blocks exactly as written: "From the Debian package" with the .deb that
deploy/debian/build-deb made, and "By hand". The only changes to what a
user does: the client ID and secret placeholders get test values, `sudo`
is a no-op (we are root), the by-hand block's `cargo build` is skipped (the
release binary is already built), and a unit drop-in points the token URLs
at an emulator running inside the guest.

Then it asserts what a user of the unit relies on (see CASES below) and
prints what each case saw. Needs: root, debootstrap, systemd-container,
the release binary and target/debian/*.deb.
"""

import json
import os
import pathlib
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
WORK = pathlib.Path(os.environ.get("FLUTE_SYSTEMD_STAGE_DIR", "/var/tmp/flute-systemd-stage"))
SUITE = "bookworm"
UNIT = "flute-token-broker"
SOCKET = "/run/flute-token-broker/broker.sock"
EMULATOR_PORT = 9470
CLIENT_ID = "stage-client"
SECRET_1 = "stage-secret-" + secrets.token_hex(8)
SECRET_2 = "stage-rotated-" + secrets.token_hex(8)
# Every access token seen; none may be in the journal.
SEEN_TOKENS = set()


def say(text):
    print(text, flush=True)


class StageFailure(Exception):
    pass


def check(condition, what):
    if not condition:
        raise StageFailure(what)


# ---------------------------------------------------------------- the root


def debian_mirror():
    """The Debian mirror this machine's apt uses for SUITE main (never a name of ours)."""
    for path in [pathlib.Path("/etc/apt/sources.list"), *sorted(pathlib.Path("/etc/apt/sources.list.d").glob("*"))]:
        if not path.is_file():
            continue
        text = path.read_text()
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if SUITE in fields.get("Suites", "").split() and "main" in fields.get("Components", "").split():
                return fields["URIs"].split()[0]
        for line in text.splitlines():
            words = re.sub(r"\[[^\]]*\]", "", line).split()
            if len(words) >= 4 and words[0] == "deb" and words[2] == SUITE and "main" in words[3:]:
                return words[1]
    raise StageFailure(f"no Debian mirror for {SUITE} main in /etc/apt/sources.list*")


def build_root():
    """A minimal Debian 12 with systemd, built once per run."""
    root = WORK / "root"
    command = ["debootstrap", "--variant=minbase", "--include=systemd,systemd-sysv,dbus", SUITE, str(root)]
    marker = root / ".complete"
    if marker.exists() and marker.read_text() == " ".join(command):
        return root
    shutil.rmtree(root, ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    subprocess.run([*command, debian_mirror()], check=True, stdout=subprocess.DEVNULL)
    check(not (root / "etc/ssl/certs/ca-certificates.crt").exists(), "the minbase root has no CA bundle")
    marker.write_text(" ".join(command))
    say(f"  root: debootstrap {SUITE} minbase + systemd in {time.monotonic() - started:.0f} s")
    return root


# ---------------------------------------------------------------- a guest


class Guest:
    """A copy of the root booted with systemd as PID 1, entered with nsenter."""

    def __init__(self, name, root):
        self.name = name
        self.dir = WORK / name
        shutil.rmtree(self.dir, ignore_errors=True)
        subprocess.run(["cp", "-a", "--reflink=auto", str(root), str(self.dir)], check=True)
        self.console = open(WORK / f"{name}.console", "w")
        started = time.monotonic()
        self.nspawn = subprocess.Popen(
            [
                "systemd-nspawn", "-D", str(self.dir), "-b", "-M", name,
                # The host's PID 1 is not systemd: no machined, no scope.
                "--register=no", "--keep-unit",
                "--private-network", "--console=passive",
                f"--bind-ro={REPO}:/src",
            ],
            stdout=self.console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self.leader = self._find_leader()
            self.wait_for("systemd's control socket", lambda: self.sh("test -S /run/systemd/private", check=False).returncode == 0)
            state = self.sh("systemctl is-system-running --wait", check=False).stdout.strip()
            check(state in ("running", "degraded"), f"{name} booted: {state}")
        except BaseException:
            self.stop()
            raise
        say(f"  {name}: systemd {self.sh('systemctl --version | head -1').stdout.split()[1]} "
            f"as PID 1, {state} in {time.monotonic() - started:.1f} s")

    def _find_leader(self):
        """The guest's PID 1: the descendant of systemd-nspawn named systemd."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            check(self.nspawn.poll() is None, f"systemd-nspawn exited: {(WORK / f'{self.name}.console').read_text()[-2000:]}")
            children = {}
            for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = stat.read_text().rsplit(")", 1)[1].split()
                    comm = stat.read_text().split("(", 1)[1].rsplit(")", 1)[0]
                except (OSError, IndexError):
                    continue
                children.setdefault(int(fields[1]), []).append((int(stat.parent.name), comm))
            todo = [self.nspawn.pid]
            while todo:
                for pid, comm in children.get(todo.pop(), []):
                    if comm == "systemd":
                        return pid
                    todo.append(pid)
            time.sleep(0.1)
        raise StageFailure("the guest's systemd did not start")

    def sh(self, script, check=True, user=None, input=None, cwd="/"):
        """Runs a bash script in the guest, as root or as `user`."""
        command = ["nsenter", "-t", str(self.leader), "-a", "--"]
        if user:
            command += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--reset-env"]
        command += ["/bin/bash", "-c", f"cd {shlex.quote(cwd)} && {script}"]
        result = subprocess.run(command, input=input, capture_output=True, text=True, timeout=180)
        if check and result.returncode != 0:
            raise StageFailure(
                f"in {self.name}: {script!r} exited {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def prop(self, name, unit=UNIT):
        return self.sh(f"systemctl show -p {name} --value {unit}").stdout.strip()

    def wait_for(self, what, predicate, timeout=60):
        """Waits for `predicate()` (a state systemd reports), up to `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise StageFailure(f"in {self.name}: {what} within {timeout} s")

    def journal(self, *args):
        """Journal entries of the unit as dicts (journalctl -o json)."""
        out = self.sh(f"journalctl --no-pager -o json -u {UNIT} " + " ".join(args), check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def stop(self):
        if os.environ.get("FLUTE_SYSTEMD_STAGE_KEEP"):
            say(f"  keeping {self.name}: nsenter -t {getattr(self, 'leader', '?')} -a")
            return
        if self.nspawn.poll() is None and getattr(self, "leader", None):
            self.sh("systemctl poweroff", check=False)
            try:
                self.nspawn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        if self.nspawn.poll() is None:
            os.killpg(self.nspawn.pid, signal.SIGKILL)
            self.nspawn.wait()
        self.console.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- the documented steps


def documented_block(heading):
    """The first ```sh block after `heading` in deploy/operations.md."""
    text = (REPO / "deploy/operations.md").read_text()
    at = text.index(heading)
    match = re.compile(r"```sh\n(.*?)```", re.S).search(text, at)
    check(match is not None, f"operations.md has a sh block after {heading!r}")
    return match.group(1)


def replay(guest, block, cwd, after=None):
    """Runs each command line of a documented block as written, in order."""
    prelude = "sudo() { \"$@\"; }\nexport PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin\nset -e -o pipefail\n"
    for line in block.splitlines():
        command = re.sub(r"\s+#.*$", "", line).strip()
        if not command:
            continue
        if command.startswith("cargo build"):
            check((REPO / "target/release/flute-token-broker").exists(), "the release binary is built")
            continue
        command = command.replace("YOUR-CLIENT-ID", CLIENT_ID).replace("YOUR-CLIENT-SECRET", SECRET_1)
        guest.sh(prelude + command, cwd=cwd)
        if after:
            after(command)


def start_emulator(guest, secret):
    """The emulator as a transient unit in the guest, accepting `secret`."""
    guest.sh("systemctl stop 'flute-emulator-*' 2>/dev/null; true")
    guest.sh(f"install -m 0600 /dev/stdin /root/emulator-secret <<<{shlex.quote(secret)}")
    guest.sh(
        f"systemd-run --collect --unit flute-emulator-{secrets.token_hex(4)} /src/target/release/flute-token-broker emulator "
        f"--listen 127.0.0.1:{EMULATOR_PORT} --client-id {CLIENT_ID} "
        "--client-secret-file /root/emulator-secret --token-lifetime 900s"
    )
    guest.wait_for(
        "the emulator listening",
        lambda: guest.sh(f"exec 3<>/dev/tcp/127.0.0.1/{EMULATOR_PORT}", check=False).returncode == 0,
    )


def point_at_emulator(guest, extra=()):
    """A drop-in: token URLs to the guest's emulator (plain http, loopback)."""
    url = f"http://127.0.0.1:{EMULATOR_PORT}/oauth2/token"
    lines = [
        "[Service]",
        "Environment=FLUTE_BROKER__OAUTH__ALLOW_INSECURE_HTTP=true",
        f"Environment=FLUTE_BROKER__ENVIRONMENTS__SANDBOX__TOKEN_URL={url}",
        f"Environment=FLUTE_BROKER__ENVIRONMENTS__PRODUCTION__TOKEN_URL={url}",
        *extra,
    ]
    guest.sh(
        f"mkdir -p /etc/systemd/system/{UNIT}.service.d && "
        f"printf '%s\\n' {' '.join(shlex.quote(l) for l in lines)} > /etc/systemd/system/{UNIT}.service.d/emulator.conf"
    )


def drop_in(guest, name, lines):
    path = f"/etc/systemd/system/{UNIT}.service.d/{name}.conf"
    if lines:
        body = " ".join(shlex.quote(l) for l in ["[Service]", *lines])
        guest.sh(f"printf '%s\\n' {body} > {path}")
    else:
        guest.sh(f"rm -f {path}")
    guest.sh("systemctl daemon-reload")


def get_token(guest, env="sandbox", user=None):
    result = guest.sh(f"flute-token-broker get --env {env} --addr unix:{SOCKET}", check=False, user=user)
    if result.returncode == 0:
        SEEN_TOKENS.add(result.stdout.strip())
    return result


def ms_between(guest, start_prop, end_prop):
    return (int(guest.prop(end_prop)) - int(guest.prop(start_prop))) / 1000


# ---------------------------------------------------------------- the cases


def case_active_with_status(guest):
    check(guest.prop("ActiveState") == "active", "active")
    status = guest.prop("StatusText")
    check(
        re.fullmatch(r"sandbox: Ready, token [0-9a-f]{12} \(\d+s left\); production: Ready, token [0-9a-f]{12} \(\d+s left\)", status),
        f"STATUS= text: {status!r}",
    )
    ready_ms = ms_between(guest, "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    return f"active through READY=1 {ready_ms:.0f} ms after exec; STATUS={status!r}"


def case_socket_group_and_allow_list(guest):
    seen = []
    sandbox = get_token(guest, user="member")
    check(sandbox.returncode == 0 and sandbox.stdout.strip(), f"a member of flute-broker gets a token: {sandbox.stderr}")
    outsider = get_token(guest, user="outsider")
    check(
        outsider.returncode == 69 and "is this user in the socket's group?" in outsider.stderr,
        f"a non-member is refused with the group hint: {outsider.returncode} {outsider.stderr}",
    )
    seen.append(f"outsider: exit {outsider.returncode}, {outsider.stderr.strip()!r}")
    production = get_token(guest, "production", user="member")
    check(
        production.returncode == 77 and "may not get production tokens" in production.stderr,
        f"the allow-list refuses production to a member outside flute-production: {production.returncode} {production.stderr}",
    )
    seen.append(f"member: sandbox token, production exit {production.returncode}")
    allowed = get_token(guest, "production", user="payments")
    check(allowed.returncode == 0, f"a member of flute-production gets production: {allowed.stderr}")
    status = guest.sh(f"flute-token-broker status --addr unix:{SOCKET}", check=False, user="member")
    check(
        status.returncode == 0 and "RESTRICTED" in status.stdout,
        f"status as a restricted caller exits 0 and lists RESTRICTED: {status.returncode} {status.stdout} {status.stderr}",
    )
    seen.append("status as member: exit 0, production RESTRICTED")
    unit_client = guest.sh(
        "systemd-run --wait --pipe --quiet -p DynamicUser=yes -p SupplementaryGroups=flute-broker "
        f"/usr/bin/env flute-token-broker get --env sandbox --addr unix:{SOCKET}",
        check=False,
    )
    check(unit_client.returncode == 0 and unit_client.stdout.strip(), f"a SupplementaryGroups= client unit gets a token: {unit_client.stderr}")
    SEEN_TOKENS.add(unit_client.stdout.strip())
    seen.append("DynamicUser client unit with SupplementaryGroups=flute-broker: token")
    return "; ".join(seen)


def case_agent_example(guest):
    """deploy/systemd/agent.toml, pointed at this guest's broker as its hub:
    a broker with no key, run as a unit of its own, serves the hub's token."""
    text = (REPO / "deploy" / "systemd" / "agent.toml").read_text()
    text = re.sub(r"\[upstream\]\n(?:(?:#.*|\w+ = .*)\n)*", "", text)
    text = re.sub(r"^upstream = .*$", f'upstream = ["unix:{SOCKET}"]', text, flags=re.M)
    text = text.replace('listen = ["unix:/run/flute-token-broker/broker.sock"]', 'listen = ["unix:/run/flute-agent/agent.sock"]')
    guest.sh("mkdir -p /etc/flute-agent && cat > /etc/flute-agent/config.toml", input=text)
    checked = guest.sh("flute-token-broker check-config --config /etc/flute-agent/config.toml", check=False)
    check(checked.returncode == 0 and "no API key on this host" in checked.stderr, f"check-config on the agent: {checked.stderr}")
    # Its own unit: no credential, no key; the hub admits it by its groups.
    started = guest.sh(
        "systemd-run --unit flute-agent -p Type=notify -p DynamicUser=yes "
        "-p 'SupplementaryGroups=flute-broker flute-production' -p RuntimeDirectory=flute-agent "
        # The hub holds 9464 on this host; an agent host has it free.
        "-p Environment=FLUTE_BROKER__ADMIN__LISTEN=127.0.0.1:9465 "
        "/usr/bin/flute-token-broker serve --config /etc/flute-agent/config.toml",
        check=False,
    )
    try:
        log = guest.sh("journalctl -u flute-agent -o cat --no-pager | tail -n 20", check=False).stdout
        check(started.returncode == 0, f"the agent unit starts: {started.stderr} {log}")
        check(guest.prop("ActiveState", unit="flute-agent") == "active", "the agent unit is active (READY=1 once it follows the hub)")
        agent = guest.sh("flute-token-broker get --env sandbox --format json --addr unix:/run/flute-agent/agent.sock", check=False)
        check(agent.returncode == 0, f"a token from the agent: {agent.stderr}")
        at_agent = json.loads(agent.stdout)["token_id"]
        at_hub = token_id(guest)
        check(at_agent == at_hub, f"the agent serves the hub's token ({at_agent} vs {at_hub})")
        production = guest.sh("flute-token-broker get --env production --addr unix:/run/flute-agent/agent.sock", check=False)
        check(production.returncode == 0, f"production through the hub's allow-list (flute-production): {production.stderr}")
        SEEN_TOKENS.update([json.loads(agent.stdout)["access_token"], production.stdout.strip()])
        log = guest.sh("journalctl -u flute-agent -o cat --no-pager", check=False).stdout
        check(log.count("following upstream brokers") == 2, f"both environments follow the hub: {log}")
    finally:
        guest.sh("systemctl stop flute-agent", check=False)
    return f"deploy/systemd/agent.toml following this broker's socket, as a DynamicUser unit with no credential: sandbox token {at_agent} = the hub's; production through the hub's allow-list"


def case_reload(guest):
    config = "/etc/flute-token-broker/config.toml"
    guest.sh(f"cp {config} /root/config.good")
    pid = guest.prop("MainPID")
    guest.sh(f"printf '[refresh]\\nratio = 0.7\\n' >> {config}")
    ok = guest.sh(f"systemctl reload {UNIT}", check=False)
    check(ok.returncode == 0, f"a valid reload succeeds: {ok.stderr}")
    guest.wait_for("the restart warning", lambda: any("take effect after a restart" in e.get("MESSAGE", "") for e in guest.journal("-p", "warning")))
    warn = [e for e in guest.journal() if "take effect after a restart" in e.get("MESSAGE", "")]
    check(warn and warn[-1]["PRIORITY"] == "4", f"the WARN line is priority 4: {warn}")

    guest.sh(f"printf '[refresh]\\nratio = 3.0\\n' > {config} && cat /root/config.good >> {config}")
    rejected = guest.sh(f"systemctl reload {UNIT}", check=False)
    check(rejected.returncode != 0, "a rejected configuration fails systemctl reload")
    status = guest.sh(f"systemctl status --no-pager -n 20 {UNIT}", check=False).stdout
    check("refresh.ratio must be between" in status, f"the problem is in systemctl status: {status}")
    check(guest.prop("ActiveState") == "active" and guest.prop("MainPID") == pid, "the broker keeps running")
    reload_errors = [e for e in guest.journal("-p", "err") if "refresh.ratio" in e.get("MESSAGE", "")]
    check(reload_errors and all(e["PRIORITY"] == "3" for e in reload_errors), f"the reload command's problems are priority 3: {reload_errors}")

    # A SIGHUP that bypasses the check: the broker itself rejects the file, at ERROR.
    guest.sh(f"kill -HUP {pid}")
    guest.wait_for(
        "the broker's own rejection",
        lambda: any("reload rejected: the new configuration is invalid" in e.get("MESSAGE", "") for e in guest.journal("-p", "err")),
    )
    error = [e for e in guest.journal() if "reload rejected: the new configuration is invalid" in e.get("MESSAGE", "")][-1]
    check(error["PRIORITY"] == "3", f"the broker's ERROR is priority 3: {error}")
    guest.sh(f"cp /root/config.good {config}")
    check(get_token(guest, user="member").returncode == 0, "tokens are served after the rejected reloads")
    return (
        f"valid: systemctl reload exit 0, WARN at priority 4; invalid: systemctl reload exit {rejected.returncode}, "
        f"problem in systemctl status, ERROR lines at priority 3 (reload command and broker), same PID {pid}"
    )


def case_journal_fields(guest):
    production = [e for e in guest.journal("ENVIRONMENT=production") if "token request" in e.get("MESSAGE", "")]
    check(production, "journalctl ENVIRONMENT=production selects the production token requests")
    entry = production[-1]
    check(entry.get("TOKEN_ID") and entry.get("OUTCOME") == "ok", f"fields are journal fields: {entry}")
    info = entry["PRIORITY"]
    return f"ENVIRONMENT=production: {len(production)} token request(s), e.g. MESSAGE={entry['MESSAGE']!r}, PRIORITY={info}"


def case_watchdog(guest):
    drop_in(guest, "watchdog", ["WatchdogSec=4s"])
    guest.sh(f"systemctl restart {UNIT}")
    pid, restarts = guest.prop("MainPID"), int(guest.prop("NRestarts"))
    guest.sh(f"kill -STOP {pid}")
    stopped_at = time.monotonic()
    guest.wait_for(
        "a restart by the watchdog",
        lambda: guest.prop("MainPID") not in ("0", pid) and guest.prop("ActiveState") == "active",
        timeout=60,
    )
    took = time.monotonic() - stopped_at
    result = guest.prop("NRestarts")
    check(int(result) == restarts + 1, f"one restart: {restarts} → {result}")
    timeout = [e for e in guest.journal() if "Watchdog timeout" in e.get("MESSAGE", "")]
    check(timeout, "systemd logged the watchdog timeout")
    drop_in(guest, "watchdog", [])
    guest.sh(f"systemctl restart {UNIT}")
    return f"SIGSTOP under WatchdogSec=4s: restarted by systemd after {took:.1f} s (NRestarts {restarts} → {result})"


def case_key_rotation(guest):
    # systemd 252 copies LoadCredential= files at start only: a reload keeps the old copy.
    start_emulator(guest, SECRET_2)
    guest.sh(f"install -m 0600 /dev/stdin /etc/flute-token-broker/client-secret <<<{shlex.quote(SECRET_2)}")
    guest.sh(f"systemctl reload {UNIT}")
    copy = guest.sh(f"cat /run/credentials/{UNIT}.service/flute-client-secret").stdout.strip()
    check(copy == SECRET_1, "systemctl reload does not refresh the credential copy")
    guest.sh(f"systemctl restart {UNIT}")
    check(guest.prop("ActiveState") == "active", "active after the restart")
    check(get_token(guest, user="member").returncode == 0, "a token with the new key")
    calls = guest.sh(f"flute-token-broker status --json --addr unix:{SOCKET}", user="payments").stdout
    check(all(e["state"] == "READY" for e in json.loads(calls)), f"both environments ready with the new key: {calls}")
    return "reload kept the old credential copy (as documented); restart adopted the new secret, both environments READY"


PROXY_SOCKET = "/run/flute-token-broker/sandbox-api.sock"


def case_api_proxy(guest):
    """The sandbox API proxy on a socket of the socket unit (a drop-in adds
    its ListenStream=), so restarts hand it over like the gRPC socket; the
    emulator's API behind it."""
    import http.client
    import socket

    guest.sh(
        f"mkdir -p /etc/systemd/system/{UNIT}.socket.d && "
        f"printf '[Socket]\\nListenStream={PROXY_SOCKET}\\n' > /etc/systemd/system/{UNIT}.socket.d/proxy.conf"
    )
    guest.sh(
        "cat >> /etc/flute-token-broker/config.toml",
        input=f'\n[environments.sandbox.proxy]\nlisten = ["unix:{PROXY_SOCKET}"]\napi_url = "http://127.0.0.1:{EMULATOR_PORT}"\n',
    )
    guest.sh(f"systemctl daemon-reload && systemctl stop {UNIT}.service {UNIT}.socket && systemctl start {UNIT}.socket {UNIT}.service")
    check(guest.prop("ActiveState") == "active", "active with the proxy")

    class UnixConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(f"/proc/{guest.leader}/root{PROXY_SOCKET}")

    connection = UnixConnection("localhost", timeout=10)
    connection.request("POST", "/v2/payments", body='{"amount": 1}', headers={"Content-Type": "application/json"})
    answer = connection.getresponse()
    echo = json.loads(answer.read())
    check(answer.status == 200 and len(echo["token_id"]) == 12, f"the API answered through the proxy: {answer.status} {echo}")
    mode = guest.sh(f"stat -c '%a %G' {PROXY_SOCKET}").stdout.strip()
    passed = [e for e in guest.journal() if "using the socket passed by systemd" in e.get("MESSAGE", "") and "sandbox-api" in json.dumps(e)]
    return f"{PROXY_SOCKET} ({mode}) from the socket unit{' (passed by systemd)' if passed else ''}: POST answered 200 by the API, token_id {echo['token_id']}"


def case_restart_under_load(guest, command=f"systemctl restart {UNIT}", what="systemctl restart"):
    """A restart (or whatever `command` does) while callers keep calling
    (socket activation); through the API proxy too where it is set up."""
    import restart_load

    passed = [e for e in guest.journal() if "using the socket passed by systemd" in e.get("MESSAGE", "")]
    check(passed, "the broker serves the socket systemd passed (socket activation)")
    old_pid = guest.prop("MainPID")
    socket_path = f"/proc/{guest.leader}/root{SOCKET}"
    binary = str(REPO / "target/release/flute-token-broker")
    proxied = None
    if guest.sh(f"test -S {PROXY_SOCKET}", check=False).returncode == 0:
        proxied = restart_load.Caller("HTTP/1.1 POST through the API proxy, a connection per call")
    grpc_caller, process_caller, watcher, _, restart_at = restart_load.run(
        socket_path,
        binary,
        lambda: guest.sh(command),
        proxy=(f"/proc/{guest.leader}/root{PROXY_SOCKET}", proxied) if proxied else None,
    )
    new_pid = guest.prop("MainPID")
    check(new_pid not in ("0", old_pid), f"a new process: {old_pid} → {new_pid}")
    ready_at = int(guest.prop("ActiveEnterTimestampMonotonic")) / 1e6
    to_ready = ready_at - int(guest.prop("ExecMainStartTimestampMonotonic")) / 1e6
    # The window systemd had the unit down: from the old process leaving
    # `active` (SIGTERM) to the new one's READY=1. It holds the old
    # process's drain, systemd's own work and the new process's start.
    # The gap a caller sees across it must fit in it, plus the caller's own
    # time for one call: 100 ms for the grpcio channel, 250 ms for a new
    # process per call (fork, exec and loading on a 2-core guest where
    # dpkg is unpacking and syncing took up to 300 ms in CI). Gaps while a
    # broker was up and serving are the callers' own; they are reported,
    # not bounded.
    down_from = int(guest.prop("ActiveExitTimestampMonotonic")) / 1e6
    down = ready_at - down_from
    check(0 < down < 30, f"the unit left active before it was ready again ({down * 1000:.0f} ms)")
    callers = [(grpc_caller, 0.1), (process_caller, 0.25)] + ([(proxied, 0.1)] if proxied else [])
    for caller, own in callers:
        check(caller.failed == 0, f"no failed call: {caller.summary()}")
        across = caller.longest_gap_within(down_from, ready_at)
        check(
            across <= down + own,
            f"the gap across the restart ({across * 1000:.0f} ms) within the time systemd had the unit down + "
            f"{own * 1000:.0f} ms ({(down + own) * 1000:.0f} ms): {caller.summary()}",
        )
    after = [(at, token) for at, token in watcher.token_ids() if at > restart_at]
    check(after, f"the watcher holds the new broker's token: {watcher.lines}")
    followed = after[0][0] - ready_at
    check(followed <= 1.0, f"the watcher has the new token within 1 s of READY ({followed * 1000:.0f} ms)")
    gaps = "; ".join(
        f"{c.name.split(',')[0]}: across the restart {c.longest_gap_within(down_from, ready_at) * 1000:.0f} ms, "
        f"longest elsewhere {c.longest_gap_outside(down_from, ready_at) * 1000:.0f} ms"
        for c, _ in callers
    )
    return (
        f"{what} at +4 s of 12 s: {'; '.join(c.summary() for c, _ in callers)}; {gaps}; "
        f"new process ready {to_ready * 1000:.0f} ms after exec, unit down {down * 1000:.0f} ms (SIGTERM to READY), "
        f"{(ready_at - restart_at) * 1000:.0f} ms after the command began; "
        f"watcher had the new token {followed * 1000:+.0f} ms from READY"
    )


def emulator_faults(guest, body):
    """POSTs a fault request to the guest's emulator (bash's /dev/tcp: the
    minimal root has no HTTP client)."""
    request = (
        f"POST /__emulator/faults HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
    )
    answer = guest.sh(f"exec 3<>/dev/tcp/127.0.0.1/{EMULATOR_PORT}; printf %s {shlex.quote(request)} >&3; cat <&3")
    check(" 200 " in answer.stdout.splitlines()[0], f"the emulator took the faults: {answer.stdout}")


def token_id(guest, user="member"):
    result = guest.sh(f"flute-token-broker get --env sandbox --format json --addr unix:{SOCKET}", user=user, check=False)
    check(result.returncode == 0, f"a token: {result.stderr}")
    token = json.loads(result.stdout)
    SEEN_TOKENS.add(token["access_token"])
    return token["token_id"]


def case_restart_during_an_outage(guest):
    """The tokens cross `systemctl restart` in systemd's fd store."""
    before = token_id(guest)
    emulator_faults(guest, '{"refuse_all": true}')
    try:
        guest.sh(f"systemctl restart {UNIT}")
        after = token_id(guest)
        check(after == before, f"the restarted broker serves the kept token ({before} → {after})")
        kept = [e for e in guest.journal() if "serving the token kept across the restart" in e.get("MESSAGE", "")]
        check(kept, "the broker says it serves the kept token")
    finally:
        emulator_faults(guest, '{"clear": true}')
    guest.sh(f"systemctl stop {UNIT}.service && systemctl start {UNIT}.service")
    fresh = token_id(guest)
    check(fresh != before, "systemctl stop empties the store: a fresh token after start")
    return (
        f"token endpoint refusing every call: systemctl restart still served token {before} "
        f"(kept in systemd's fd store); after stop + start a fresh one ({fresh})"
    )


def case_clean_stop(guest):
    guest.sh(f"systemctl stop {UNIT}.service")
    check(guest.prop("ActiveState") == "inactive", "inactive after stop")
    check(guest.prop("ExecMainStatus") == "0", f"exit 0 (got {guest.prop('ExecMainStatus')})")
    stop_ms = ms_between(guest, "ActiveExitTimestampMonotonic", "InactiveEnterTimestampMonotonic")
    socket_unit = guest.prop("ActiveState", unit=f"{UNIT}.socket")
    check(socket_unit == "active" and guest.sh(f"test -S {SOCKET}", check=False).returncode == 0,
          "the socket unit keeps the socket while the service is stopped")
    guest.sh(f"systemctl stop {UNIT}.socket")
    left = guest.sh(f"test -e {SOCKET}", check=False).returncode == 0
    check(not left, "no socket left once the socket unit stops too")
    return f"service stopped in {stop_ms:.0f} ms, exit 0; socket kept by the socket unit, removed when it stops"


def case_without_ca_certificates(guest):
    check(guest.sh("test -e /etc/ssl/certs/ca-certificates.crt", check=False).returncode != 0, "the guest has no CA bundle")
    # http:// token URLs: the broker ran all along (every case above).
    https = [
        "Environment=FLUTE_BROKER__ENVIRONMENTS__SANDBOX__TOKEN_URL=https://127.0.0.1:9/oauth2/token",
        "Environment=FLUTE_BROKER__ENVIRONMENTS__PRODUCTION__ENABLED=false",
        "Environment=FLUTE_BROKER__SYSTEMD__READY_TIMEOUT=1s",
    ]
    drop_in(guest, "https", [*https, "Environment=FLUTE_BROKER__OAUTH__TLS_ROOTS=system"])
    start = guest.sh(f"systemctl start {UNIT}", check=False)
    check(start.returncode != 0, "start fails with tls_roots=system and no store")
    guest.wait_for("the failed state", lambda: guest.prop("ActiveState") == "failed")
    status, restarts = guest.prop("ExecMainStatus"), guest.prop("NRestarts")
    check(status == "78", f"exit 78 (got {status})")
    problem = [e for e in guest.journal("-p", "err") if "oauth.tls_roots: this host has no CA certificates" in e.get("MESSAGE", "")]
    check(problem, "the problem is named, at priority 3")
    checked = guest.sh(
        "mkdir -p /root/creds && cp /etc/flute-token-broker/client-secret /root/creds/flute-client-secret && "
        "CREDENTIALS_DIRECTORY=/root/creds FLUTE_BROKER__OAUTH__TLS_ROOTS=system "
        "FLUTE_BROKER__ENVIRONMENTS__SANDBOX__TOKEN_URL=https://127.0.0.1:9/t "
        "flute-token-broker check-config --config /etc/flute-token-broker/config.toml",
        check=False,
    )
    check(
        checked.returncode == 78 and "oauth.tls_roots: this host has no CA certificates" in checked.stderr
        and "credentials" not in checked.stderr,
        f"check-config reports it, and only it: {checked.stderr}",
    )
    guest.sh(f"systemctl reset-failed {UNIT}")
    drop_in(guest, "https", https)
    guest.sh(f"systemctl start {UNIT}")
    bundled = [e for e in guest.journal() if "TLS roots loaded" in e.get("MESSAGE", "")]
    check(bundled and "bundled" in bundled[-1]["MESSAGE"], f"auto falls back to the bundled roots: {bundled}")
    guest.sh(f"systemctl stop {UNIT}")
    drop_in(guest, "https", [])
    return (
        f"http:// URLs: served without a CA bundle; https:// with tls_roots=system: exit {status}, "
        f"NRestarts {restarts}, check-config 78; https:// with auto: started on the bundled roots"
    )


def case_no_secret_in_journal(guest):
    journal = guest.sh("journalctl --no-pager -o export", check=False).stdout
    for secret in [SECRET_1, SECRET_2, *SEEN_TOKENS]:
        check(secret not in journal, "no secret or access token in the journal")
    return f"{len(journal.splitlines())} journal lines, no client secret (2) and no access token ({len(SEEN_TOKENS)})"


def case_package_files(guest):
    files = [
        "/usr/bin/flute-token-broker",
        f"/usr/lib/systemd/system/{UNIT}.service",
        "/usr/lib/sysusers.d/flute-token-broker.conf",
        "/usr/share/man/man1/flute-token-broker.1.gz",
        "/usr/share/man/man1/flute-token-broker-get.1.gz",
        "/usr/share/bash-completion/completions/flute-token-broker",
        "/usr/share/doc/flute-token-broker/operations.md",
    ]
    missing = [f for f in files if guest.sh(f"test -s {f}", check=False).returncode != 0]
    check(not missing, f"package files: {missing}")
    conffiles = guest.sh("dpkg-query -W -f='${Conffiles}' flute-token-broker").stdout
    check("/etc/flute-token-broker/config.toml" in conffiles, "the configuration is a conffile")
    return f"{len(files)} files in their standard directories, config.toml a conffile"


def case_purge(guest):
    guest.sh(f"systemctl start {UNIT}")
    guest.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y -q flute-token-broker")
    check(guest.prop("LoadState") == "not-found", "the unit is gone after purge")
    check(guest.prop("ActiveState", unit=f"{UNIT}.socket") == "inactive", "the socket unit is stopped")
    check(guest.sh("pgrep -f 'flute-token-broker serve'", check=False).returncode != 0, "no broker runs after purge")
    left = [p for p in ["/usr/bin/flute-token-broker", "/etc/flute-token-broker/client-secret", "/etc/flute-token-broker/config.toml"]
            if guest.sh(f"test -e {p}", check=False).returncode == 0]
    check(not left, f"purge leaves nothing behind: {left}")
    return "purge stopped the broker and removed the binary, the configuration and the secret"


def prepare_users(guest):
    guest.sh(
        "groupadd --system flute-production && useradd -M outsider && "
        "useradd -M member && useradd -M payments"
    )


def after_install_member_groups(guest):
    # The flute-broker group exists once sysusers ran.
    guest.sh("usermod -aG flute-broker member && usermod -aG flute-broker,flute-production payments")


ALLOW_LIST = "Environment=FLUTE_BROKER__ENVIRONMENTS__PRODUCTION__ALLOWED_UNIX_GROUPS=flute-production"


def run(name, guest, case, report):
    started = time.monotonic()
    try:
        seen = case(guest)
    except Exception as e:
        report.append((name, False, str(e), time.monotonic() - started))
        raise StageFailure(f"{type(e).__name__}: {e}") from e
    report.append((name, True, seen, time.monotonic() - started))
    say(f"  ok   {name} ({time.monotonic() - started:.1f} s): {seen}")


def run_cases(prefix, guest, cases, report):
    for name, case in cases:
        run(f"{prefix}: {name}", guest, case, report)


# What each guest checks after its documented install, in order.
PACKAGE_CASES = [
    ("package files", case_package_files),
    ("active with STATUS=", case_active_with_status),
    ("socket group and allow-list", case_socket_group_and_allow_list),
    ("agent example following this broker", case_agent_example),
    ("reload and rejected reload", case_reload),
    ("journal fields", case_journal_fields),
    ("API proxy on the socket unit", case_api_proxy),
    ("restart under load", case_restart_under_load),
    ("restart during a token-endpoint outage", case_restart_during_an_outage),
    (
        "upgrade under load",
        lambda guest: case_restart_under_load(
            guest,
            "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --reinstall /root/pkg/flute-token-broker_*.deb",
            "a package upgrade (apt-get install --reinstall: prerm upgrade, postinst try-restart)",
        ),
    ),
    ("watchdog restart", case_watchdog),
    ("key rotation under LoadCredential=", case_key_rotation),
    ("clean stop", case_clean_stop),
    ("without ca-certificates", case_without_ca_certificates),
    ("no secret in the journal", case_no_secret_in_journal),
    ("purge", case_purge),
]
BY_HAND_CASES = [
    ("active with STATUS=", case_active_with_status),
    ("socket group and allow-list", case_socket_group_and_allow_list),
    ("reload and rejected reload", case_reload),
    ("restart under load", case_restart_under_load),
    ("clean stop", case_clean_stop),
    ("no secret in the journal", case_no_secret_in_journal),
]


def prepared_guest(name, root):
    """A booted guest with the test users, the emulator and the drop-in that
    points the token URLs at it: what both install paths start from."""
    guest = Guest(name, root)
    try:
        prepare_users(guest)
        start_emulator(guest, SECRET_1)
        point_at_emulator(guest, [ALLOW_LIST])
    except BaseException:
        guest.stop()
        raise
    return guest


def from_the_package(root, report):
    guest = prepared_guest("flute-deb", root)
    try:
        guest.sh("mkdir -p /root/pkg && cp /src/target/debian/flute-token-broker_*.deb /root/pkg/")
        seen = {}

        def after(command):
            if "apt-get install" in command:
                seen["after install"] = (guest.prop("UnitFileState"), guest.prop("ActiveState"))
                after_install_member_groups(guest)

        def install(g):
            replay(g, documented_block("### From the Debian package"), "/root/pkg", after)
            check(seen["after install"] == ("disabled", "inactive"), f"the package leaves the service stopped: {seen}")
            return f"documented steps replayed; after apt-get install the unit was {seen['after install']}"

        run_cases("deb", guest, [("install as documented", install), *PACKAGE_CASES], report)
    finally:
        guest.stop()


def by_hand(root, report):
    guest = prepared_guest("flute-manual", root)
    try:

        def after(command):
            if command.startswith("sudo systemd-sysusers"):
                after_install_member_groups(guest)

        def install(g):
            replay(g, documented_block("### By hand"), "/src", after)
            page = g.sh("test -s /usr/local/share/man/man1/flute-token-broker.1", check=False).returncode == 0
            check(page, "the man pages are where the steps put them")
            return "documented steps replayed (man pages in /usr/local/share/man/man1)"

        run_cases("manual", guest, [("install as documented", install), *BY_HAND_CASES], report)
    finally:
        guest.stop()


def main():
    if os.geteuid() != 0:
        sys.exit("the systemd stage needs root (systemd-nspawn)")
    for path in ["target/release/flute-token-broker"]:
        check((REPO / path).exists(), f"{path} is built")
    check(list((REPO / "target/debian").glob("flute-token-broker_*.deb")), "the .deb is built (deploy/debian/build-deb)")
    started = time.monotonic()
    root = build_root()
    report = []
    try:
        from_the_package(root, report)
        by_hand(root, report)
    except StageFailure as e:
        say(f"FAILED: {report[-1][0] if report else 'setup'}: {e}")
        return 1
    passed = sum(1 for _, ok, _, _ in report if ok)
    say(f"systemd stage: {time.monotonic() - started:.0f} s")
    say(f"systemd: {passed} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
