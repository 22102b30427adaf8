"""Runs every broker container of deploy/kubernetes the way the kubelet
would, without a cluster, and probes it the way the kubelet does (run by
.ci/run, as root).

For each pod template (Deployment, DaemonSet, Pod, ...) in the rendered
manifests (`kubectl kustomize` of every kustomization, plus the standalone
files):

- The pod gets a network namespace with a veth pair: a pod IP that is not
  loopback, reached from the host side as the kubelet reaches it.
- Each container whose image is the broker runs from a root filesystem made
  like the image's (the Dockerfile's ENTRYPOINT binary, glibc), read-only when
  `readOnlyRootFilesystem` says so, with the pod's volumes mounted where the
  container mounts them: ConfigMap and Secret files with the kubelet's modes
  and fsGroup ownership, emptyDir (0777, fsGroup, setgid) and hostPath
  (DirectoryOrCreate makes it root-owned 0755, shared between pods). It runs
  with the container's command and args (else the Dockerfile's ENTRYPOINT and
  CMD), as the pod's user, group, fsGroup and supplementalGroups, with every
  capability dropped and no_new_privs.
- The one change to the container: the token URLs point at an emulator in the
  pod's network namespace (environment overrides), as there is no Flute here.
- startupProbe, then readinessProbe and livenessProbe, with the kubelet's
  semantics: httpGet / tcpSocket / grpc from the host to the pod IP, exec
  inside the container (its root, user and network), periodSeconds,
  failureThreshold and timeoutSeconds as written.
- Every Service targetPort and NetworkPolicy ingress port that selects the
  pod, and every declared containerPort, has a listener on the pod IP.
- Containers that are clients (FLUTE_BROKER_ADDR=unix:...) run
  `flute-token-broker get` as their own user, through their own mounts; a
  container with FLUTE_TOKEN_FILE must find the token file (a `[[sinks]]`)
  on its volume, readable by its uid and groups, holding a token the
  endpoint accepts.
- Hub and agents (deploy/kubernetes/fleet): a Deployment behind a headless
  Service runs as many pods as its replicas; the Service's name resolves,
  in every pod started later, to the ready pods' IPs (the pod's /etc/hosts
  stands in for cluster DNS), and pods route to each other through the
  host. TLS Secrets that a cert-manager Certificate in the manifests
  describes are issued from a CA made here, with the Certificate's DNS and
  URI SANs. Brokers whose environments all call the token endpoint start
  first, then those that follow upstream brokers (agents). An agent must
  become ready through the Service name over mutual TLS; then, while the
  callers below use the agent's socket, the hub replica it follows is
  killed (SIGKILL): no call at the agent may fail, and the agent must
  follow the other replica. Then every issued TLS Secret is renewed (a new
  key and serial, as cert-manager does) and swapped into the remaining
  hub's and the agent's volumes the kubelet's way (`..data` renamed onto a
  new directory; Secret and ConfigMap volumes are always written so) while
  the callers keep going: no call may fail, no broker restarts, and each
  logs the new serial.
- Termination: the preStop hook runs while the pod is still ready, then
  SIGTERM; the broker must exit 0 within terminationGracePeriodSeconds.
- A DaemonSet that serves a hostPath socket must roll with maxSurge 1 and
  maxUnavailable 0, and is rolled as the DaemonSet controller does it: a
  second pod of the template starts on the same hostPath directory while the
  first runs, and once it is ready the first is terminated. Meanwhile
  callers use the socket (.ci/restart_load.py: a grpcio channel with default
  options and `flute-token-broker get` every 10 ms, and a watcher): no call
  may fail, and the watcher must hold the new broker's token within 1 s of
  the old broker's SIGTERM.
"""

import ctypes
import json
import os
import pathlib
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "deploy" / "container" / "Dockerfile"
EMULATOR_PORT = 9470
# RFC 2544's benchmarking range: never routed, only on our own veth pairs.
POD_NET = "198.18.{}.{}"
# A container with one of these is a client of the broker: of its socket, or of a token file sink.
CLIENT_VARIABLES = ("FLUTE_BROKER_ADDR", "FLUTE_TOKEN_FILE")
WORKLOAD_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job", "Pod"}


# ---------------------------------------------------------------- in the container

def enter(spec):
    """Child side: join the pod's network, chroot into the container's root,
    take its identity, drop every capability, exec its command."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{spec['netns']}", os.O_RDONLY)
    if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
        raise OSError(ctypes.get_errno(), "setns")
    os.close(fd)
    os.chroot(spec["root"])
    os.chdir(spec.get("workdir") or "/")
    for cap in range(64):  # the bounding set, while we still may
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
    os.setgroups(spec["groups"])
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    if libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "no_new_privs")
    os.execve(spec["argv"][0], spec["argv"], spec["env"])


if len(sys.argv) == 3 and sys.argv[1] == "--enter":
    enter(json.loads(sys.argv[2]))

# ---------------------------------------------------------------- host side

import yaml  # noqa: E402  (the container side above needs only the stdlib)

BIN = pathlib.Path(os.environ.get("FLUTE_BROKER_BIN", ROOT / "target" / "debug" / "flute-token-broker"))
failures = []
cleanup = []
exercised = []


def check(ok, what, detail=""):
    print(f"  {'ok' if ok else 'FAILED'}: {what}" + (f" ({detail})" if detail and not ok else ""))
    if not ok:
        failures.append(what)
    return ok


def sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True)


def render():
    docs, rendered = [], set()
    for kustomization in sorted(K8S.rglob("kustomization.yaml")):
        out = subprocess.run(["kubectl", "kustomize", str(kustomization.parent)], check=True, capture_output=True, text=True).stdout
        docs += [d for d in yaml.safe_load_all(out) if d]
        resources = yaml.safe_load(kustomization.read_text()).get("resources", [])
        rendered |= {(kustomization.parent / r).resolve() for r in resources}
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name != "kustomization.yaml" and path.resolve() not in rendered:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def image_defaults():
    """ENTRYPOINT, CMD and USER of the Dockerfile's final stage."""
    final = DOCKERFILE.read_text().split("\nFROM ")[-1]
    out = {"entrypoint": [], "cmd": [], "user": "0:0"}
    for line in final.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("ENTRYPOINT", "CMD"):
            out[word.lower() if word == "CMD" else "entrypoint"] = json.loads(rest)
        elif word == "USER":
            out["user"] = rest.strip()
    return out


def pod_spec(doc):
    if doc["kind"] == "Pod":
        return doc["metadata"], doc["spec"]
    return doc["spec"]["template"]["metadata"], doc["spec"]["template"]["spec"]


def is_broker(container):
    return container.get("image", "").split("/")[-1].startswith("flute-token-broker:")


class Pod:
    def __init__(self, index, doc, objects, work, host_paths):
        self.doc = doc
        self.index = index
        self.name = f"{doc['kind']}/{doc['metadata']['name']}"
        self.namespace = doc["metadata"].get("namespace", "default")
        self.meta, self.spec = pod_spec(doc)
        self.objects = objects
        self.netns = f"ftb-pod-{index}"
        self.ip = POD_NET.format(index, 2)
        self.work = work / f"pod-{index}"
        self.work.mkdir()
        self.host_paths = host_paths
        self.volumes = {}
        # ConfigMap and Secret volumes: name → (kind, object name, mode, group).
        self.projected = {}
        self.processes = []
        security = self.spec.get("securityContext", {})
        self.fs_group = security.get("fsGroup")

    # -- network
    def network(self):
        host_if, pod_if = f"ftbh{self.netns[8:]}", f"ftbp{self.netns[8:]}"
        sh("ip", "netns", "add", self.netns)
        cleanup.append(lambda: subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True))
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", pod_if)
        cleanup.append(lambda: subprocess.run(["ip", "link", "delete", host_if], capture_output=True))
        sh("ip", "link", "set", pod_if, "netns", self.netns)
        sh("ip", "addr", "add", f"{self.ip[:-2]}.1/30", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "-n", self.netns, "addr", "add", f"{self.ip}/30", "dev", pod_if)
        sh("ip", "-n", self.netns, "link", "set", pod_if, "up")
        sh("ip", "-n", self.netns, "link", "set", "lo", "up")
        # Pods reach each other through the host, as on a node's bridge.
        sh("ip", "-n", self.netns, "route", "add", "default", "via", f"{self.ip[:-2]}.1")

    # -- volumes, made as the kubelet makes them
    def volume(self, name):
        if name in self.volumes:
            return self.volumes[name]
        spec = next(v for v in self.spec.get("volumes", []) if v["name"] == name)
        path = self.work / f"vol-{name}"
        group = self.fs_group if self.fs_group is not None else 0
        if "configMap" in spec or "secret" in spec:
            source = spec.get("configMap") or spec["secret"]
            kind = "ConfigMap" if "configMap" in spec else "Secret"
            wanted = source.get("name") or source["secretName"]
            obj = self.objects.get((kind, wanted))
            if obj is None and kind == "Secret":
                obj = issued_secret(self.objects, wanted, self.work.parent)
            check(obj is not None, f"{self.name}: volume {name} names {kind} {wanted}, which the manifests define (or a Certificate issues)")
            data = dict((obj or {}).get("data") or {}) | dict((obj or {}).get("stringData") or {})
            path.mkdir()
            mode = source.get("defaultMode", 0o644)
            if self.fs_group is not None:
                mode |= 0o440  # the kubelet's read-only volume mask with fsGroup
            kubelet_write(path, data, mode, group)
            os.chmod(path, 0o755)
            self.projected[name] = (kind, wanted, mode, group)
        elif "emptyDir" in spec:
            path.mkdir()
            os.chown(path, 0, group)
            path.chmod(0o2777 if self.fs_group is not None else 0o777)
        elif "hostPath" in spec:
            host = spec["hostPath"]["path"]
            if host not in self.host_paths:
                check(spec["hostPath"].get("type") == "DirectoryOrCreate", f"{self.name}: hostPath {host} is created by the pod that uses it first (DirectoryOrCreate)")
                shared = self.work.parent / f"host{host.replace('/', '_')}"
                shared.mkdir()
                shared.chmod(0o755)  # DirectoryOrCreate: root-owned 0755
                self.host_paths[host] = shared
            path = self.host_paths[host]
        else:
            raise SystemExit(f"{self.name}: volume {name}: this harness does not know {sorted(spec)}")
        self.volumes[name] = path
        return path

    # -- a container's root filesystem
    def rootfs(self, container, binary_at):
        root = self.work / f"root-{container['name']}"
        root.mkdir()
        sh("mount", "--bind", str(root), str(root))
        cleanup.append(lambda: subprocess.run(["umount", "-R", "-l", str(root)], capture_output=True))
        for d in ("usr/lib", "usr/lib64", "proc", "dev", "etc", "tmp", pathlib.Path(binary_at).parent.relative_to("/")):
            (root / d).mkdir(parents=True, exist_ok=True)
        for link, target in (("lib", "usr/lib"), ("lib64", "usr/lib64")):
            (root / link).symlink_to(target)
        # The distroless base carries CA certificates (the token endpoint's TLS).
        (root / "etc" / "ssl" / "certs").mkdir(parents=True)
        for d in ("/usr/lib", "/usr/lib64", "/etc/ssl/certs"):
            sh("mount", "--bind", "-o", "ro", d, str(root) + d)
        sh("mount", "-t", "proc", "proc", str(root / "proc"))
        for dev in ("null", "zero", "random", "urandom"):
            (root / "dev" / dev).touch()
            sh("mount", "--bind", f"/dev/{dev}", str(root / "dev" / dev))
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")
        (root / "etc" / "group").write_text("root:x:0:\nnonroot:x:65532:\n")
        (root / "etc" / "hosts").write_text(cluster_dns())
        # A name on several lines resolves to all of them (as DNS answers
        # with every A record), not to the first.
        (root / "etc" / "host.conf").write_text("multi on\n")
        shutil.copy2(BIN, root / binary_at.lstrip("/"))
        for mount in container.get("volumeMounts", []):
            target = root / mount["mountPath"].lstrip("/")
            target.mkdir(parents=True, exist_ok=True)
            sh("mount", "--bind", str(self.volume(mount["name"])), str(target))
            if mount.get("readOnly"):
                sh("mount", "-o", "remount,bind,ro", str(target))
        if container.get("securityContext", {}).get("readOnlyRootFilesystem"):
            sh("mount", "-o", "remount,bind,ro", str(root))
        return root

    def identity(self, container, image):
        pod_sc, sc = self.spec.get("securityContext", {}), container.get("securityContext", {})
        user, _, group = image["user"].partition(":")
        uid = sc.get("runAsUser", pod_sc.get("runAsUser", int(user)))
        gid = sc.get("runAsGroup", pod_sc.get("runAsGroup", int(group or 0)))
        groups = [gid] + ([self.fs_group] if self.fs_group is not None else []) + pod_sc.get("supplementalGroups", [])
        return uid, gid, sorted(set(groups))

    def check_security(self, container, image):
        pod_sc, sc = self.spec.get("securityContext", {}), container.get("securityContext", {})
        uid = self.identity(container, image)[0]
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        check(not (non_root and uid == 0), f"{self.name}/{container['name']}: runAsNonRoot agrees with the uid it runs as ({uid})")
        check("ALL" in sc.get("capabilities", {}).get("drop", []), f"{self.name}/{container['name']}: drops every capability")
        check(sc.get("allowPrivilegeEscalation") is False, f"{self.name}/{container['name']}: allowPrivilegeEscalation: false")

    def launch(self, container, root, argv, image, env, **popen):
        uid, gid, groups = self.identity(container, image)
        spec = {"netns": self.netns, "root": str(root), "workdir": container.get("workingDir"), "uid": uid, "gid": gid, "groups": groups, "argv": argv, "env": env}
        return subprocess.Popen([sys.executable, __file__, "--enter", json.dumps(spec)], **popen)

    def ports(self):
        return {p["name"]: p["containerPort"] for c in self.all_containers() for p in c.get("ports", []) if "name" in p}

    def all_containers(self):
        return self.spec.get("initContainers", []) + self.spec.get("containers", [])


# Ready pods, for the headless Services' names: (namespace, labels, ip).
ready_pods = []
headless = []


def cluster_dns():
    """/etc/hosts standing in for cluster DNS: each headless Service's names
    resolve to the ready pods it selects."""
    lines = ["127.0.0.1 localhost"]
    for service in headless:
        ns, name = service["metadata"].get("namespace", "default"), service["metadata"]["name"]
        names = f"{name} {name}.{ns} {name}.{ns}.svc {name}.{ns}.svc.cluster.local"
        lines += [f"{ip} {names}" for pod_ns, labels, ip in ready_pods if pod_ns == ns and selects(service["spec"].get("selector"), labels)]
    return "\n".join(lines) + "\n"


pki = {}


def kubelet_write(path, data, mode, group):
    """A ConfigMap or Secret volume's files as the kubelet's atomic writer
    makes them: a new timestamped directory holding the files, the `..data`
    symlink renamed onto it, and each key a symlink into `..data` (made
    once). An update swaps `..data`; the visible names never change."""
    generation = path / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    generation.mkdir()
    for key, value in data.items():
        f = generation / key
        f.write_text(value)
        os.chown(f, 0, group)
        f.chmod(mode)
    generation.chmod(0o755)
    old = os.readlink(path / "..data") if (path / "..data").is_symlink() else None
    os.symlink(generation.name, path / "..data_tmp")
    os.rename(path / "..data_tmp", path / "..data")
    for key in data:
        if not (path / key).is_symlink():
            os.symlink(f"..data/{key}", path / key)
    if old:
        shutil.rmtree(path / old, ignore_errors=True)


def issued_secret(objects, secret_name, work):
    """The Secret a cert-manager Certificate would write (tls.crt, tls.key,
    ca.crt), issued here from one CA with the Certificate's SANs."""
    cert = next((d for (kind, _), d in objects.items() if kind == "Certificate" and d["spec"].get("secretName") == secret_name), None)
    if cert is None:
        return None
    if secret_name in pki:
        return pki[secret_name]
    return issue(cert, secret_name, work)


def issue(cert, secret_name, work):
    """A certificate for the Certificate `cert` from the probe's CA (made on
    first use): a new key and serial at every call."""
    d = work / "pki"
    if not pki:
        d.mkdir()
        sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", "/CN=pod-probe CA", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
        pki["ca"] = (d / "ca.crt").read_text()
    spec = cert["spec"]
    sans = [f"DNS:{n}" for n in spec.get("dnsNames", [])] + [f"URI:{u}" for u in spec.get("uris", [])]
    usage = {"server auth": "serverAuth", "client auth": "clientAuth"}
    extensions = d / f"{secret_name}.ext"
    extensions.write_text(f"subjectAltName={','.join(sans)}\nextendedKeyUsage={','.join(usage[u] for u in spec.get('usages', ['server auth']))}\n")
    key, csr, crt = (d / f"{secret_name}.{x}" for x in ("key", "csr", "crt"))
    sh("openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={cert['metadata']['name']}", "-keyout", str(key), "-out", str(csr))
    sh("openssl", "x509", "-req", "-in", str(csr), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2", "-extfile", str(extensions), "-out", str(crt))
    serial = subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", str(crt)], capture_output=True, text=True, check=True).stdout.strip().split("=")[1]
    exercised.append(f"Secret/{secret_name} issued as Certificate/{cert['metadata']['name']} describes it ({', '.join(sans)}), serial {serial}")
    pki[secret_name] = {"stringData": {"tls.crt": crt.read_text(), "tls.key": key.read_text(), "ca.crt": pki["ca"]}, "serial": serial}
    return pki[secret_name]


def broker_config(pod, objects):
    """The broker container's config.toml (from its ConfigMap), if any."""
    for c in pod.all_containers():
        for mount in c.get("volumeMounts", []) if is_broker(c) else []:
            vol = next(v for v in pod.spec.get("volumes", []) if v["name"] == mount["name"])
            if "configMap" in vol:
                return tomllib.loads(objects[("ConfigMap", vol["configMap"]["name"])]["data"]["config.toml"])
    return None


def follows_upstream(config):
    return any(e.get("upstream") for e in (config or {}).get("environments", {}).values())


def replicas(doc, docs):
    """Pods to run for a workload: a Deployment behind a headless Service
    runs all its replicas (agents fail over between them), others one."""
    if doc["kind"] == "Deployment" and any(
        d["kind"] == "Service" and d["spec"].get("clusterIP") == "None" and selects(d["spec"].get("selector"), pod_spec(doc)[0].get("labels", {}))
        for d in docs
    ):
        return doc["spec"].get("replicas", 1)
    return 1


def tcp_open(ip, port, timeout=1.0):
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            return True
    except OSError:
        return False


def probe_once(pod, container, root, probe, image, env):
    timeout = probe.get("timeoutSeconds", 1)
    ports = pod.ports()
    if "httpGet" in probe:
        h = probe["httpGet"]
        port = ports.get(h["port"], h["port"])
        url = f"{h.get('scheme', 'HTTP').lower()}://{pod.ip}:{port}{h.get('path', '/')}"
        try:
            # The kubelet connects directly: no proxy from the environment.
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=timeout) as r:
                return 200 <= r.status < 400, f"GET {url}: {r.status}"
        except Exception as e:  # noqa: BLE001 - any failure is a failed probe
            return False, f"GET {url}: {e}"
    if "tcpSocket" in probe:
        port = ports.get(probe["tcpSocket"]["port"], probe["tcpSocket"]["port"])
        return tcp_open(pod.ip, port, timeout), f"tcp {pod.ip}:{port}"
    if "grpc" in probe:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        target = f"{pod.ip}:{probe['grpc']['port']}"
        try:
            with grpc.insecure_channel(target) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", "")), timeout=timeout)
                return reply.status == health_pb2.HealthCheckResponse.SERVING, f"grpc {target}: {reply.status}"
        except grpc.RpcError as e:
            return False, f"grpc {target}: {e.code()}"
    if "exec" in probe:
        command = probe["exec"]["command"]
        child = pod.launch(container, root, command, image, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            return False, f"exec {shlex.join(command)}: no answer within timeoutSeconds={timeout}"
        return child.returncode == 0, f"exec {shlex.join(command)}: exit {child.returncode}: {out.strip()[-300:]}"
    raise SystemExit(f"unknown probe {sorted(probe)}")


def probe_until(pod, container, root, kind, image, env, process):
    """The kubelet's loop: periodSeconds apart, success once, failure after
    failureThreshold in a row. Returns whether it succeeded."""
    probe = container.get(kind)
    if not probe:
        return True
    what = f"{pod.name}/{container['name']}: {kind} ({next(k for k in probe if k in ('httpGet', 'tcpSocket', 'grpc', 'exec'))})"
    time.sleep(probe.get("initialDelaySeconds", 0))
    failures_in_row, detail = 0, ""
    while failures_in_row < probe.get("failureThreshold", 3):
        if process.poll() is not None:
            return check(False, what, f"the broker exited with {process.returncode}")
        ok, detail = probe_once(pod, container, root, probe, image, env)
        if ok:
            exercised.append(what)
            return check(True, what)
        failures_in_row += 1
        time.sleep(probe.get("periodSeconds", 10))
    return check(False, what, f"{failures_in_row} failures in a row, last: {detail}")


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def run_pod(pod, docs, image, config_env, emulator_args):
    print(f"{pod.name} at {pod.ip}")
    pod.network()
    brokers = [c for c in pod.all_containers() if is_broker(c)]
    clients = [c for c in pod.all_containers() if not is_broker(c) and any(e.get("name") in CLIENT_VARIABLES for e in c.get("env", []))]
    running = []
    if brokers:
        emulator = subprocess.Popen(["ip", "netns", "exec", pod.netns, str(BIN), "emulator", "--listen", f"127.0.0.1:{EMULATOR_PORT}", *emulator_args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cleanup.append(emulator.kill)
        while not subprocess.run(["ip", "netns", "exec", pod.netns, sys.executable, "-c", f"import socket; socket.create_connection(('127.0.0.1', {EMULATOR_PORT}), 1)"], capture_output=True).returncode == 0:
            time.sleep(0.05)
    for container in brokers:
        pod.check_security(container, image)
        root = pod.rootfs(container, image["entrypoint"][0])
        argv = container.get("command", image["entrypoint"]) + container.get("args", image["cmd"] if "command" not in container else [])
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin"} | {e["name"]: e["value"] for e in container.get("env", []) if "value" in e} | config_env
        log = open(pod.work / f"{container['name']}.log", "w")
        process = pod.launch(container, root, argv, image, env, stdout=log, stderr=subprocess.STDOUT)
        cleanup.append(process.kill)
        running.append((container, root, env, process))
        ok = probe_until(pod, container, root, "startupProbe", image, env, process)
        ok = ok and probe_until(pod, container, root, "readinessProbe", image, env, process)
        ok = ok and probe_until(pod, container, root, "livenessProbe", image, env, process)
        if not ok:
            print((pod.work / f"{container['name']}.log").read_text()[-3000:])
        elif container.get("readinessProbe"):
            ready_pods.append((pod.namespace, pod.meta.get("labels", {}), pod.ip))
        for port in container.get("ports", []):
            check(tcp_open(pod.ip, port["containerPort"]), f"{pod.name}/{container['name']}: containerPort {port.get('name', '')} {port['containerPort']} has a listener at the pod IP")
    return running, clients


def check_services(pod, docs):
    labels = pod.meta.get("labels", {})
    for doc in docs:
        if doc["kind"] == "Service" and doc["spec"].get("selector") and selects(doc["spec"]["selector"], labels):
            for port in doc["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                number = pod.ports().get(target, target)
                check(isinstance(number, int) and tcp_open(pod.ip, number), f"Service/{doc['metadata']['name']} port {port['port']} -> targetPort {target}: a listener at {pod.ip}:{number}")
        if doc["kind"] == "NetworkPolicy" and selects(doc["spec"]["podSelector"].get("matchLabels"), labels):
            for rule in doc["spec"].get("ingress", []):
                for port in rule.get("ports", []):
                    number = pod.ports().get(port["port"], port["port"])
                    check(isinstance(number, int) and tcp_open(pod.ip, number), f"NetworkPolicy/{doc['metadata']['name']} ingress port {port['port']}: a listener at {pod.ip}:{number}")


def run_client(pod, container, image):
    env = {e["name"]: e.get("value") for e in container["env"]}
    if "FLUTE_TOKEN_FILE" in env:
        run_file_client(pod, container, image, env["FLUTE_TOKEN_FILE"])
    addr = env.get("FLUTE_BROKER_ADDR") or ""
    if not addr.startswith("unix:"):
        return
    binary = "/.probe/flute-token-broker"  # stands in for the application's own client
    pod.check_security(container, image)
    root = pod.rootfs(container, binary)
    child = pod.launch(container, root, [binary, "get", "--env", "sandbox", "--addr", addr, "--timeout", "5s"], image, {"PATH": "/usr/bin"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = child.communicate(timeout=30)
    what = f"{pod.name}/{container['name']}: a client as uid {pod.identity(container, image)[0]} gets a token through {addr}"
    if check(child.returncode == 0 and out.strip(), what, f"exit {child.returncode}: {err.strip()}"):
        exercised.append(what)


def run_file_client(pod, container, image, path):
    """The token file, as the container sees it: there once the broker's
    startup probe passed, readable by the container's uid and groups
    (permission bits, as the kernel decides), and a token the endpoint accepts."""
    mount = max((m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"].rstrip("/") + "/")), key=lambda m: len(m["mountPath"]), default=None)
    what = f"{pod.name}/{container['name']}: reads a valid token from {path}"
    if not check(mount is not None, f"{pod.name}/{container['name']}: {path} is on one of its volumes"):
        return
    host_file = pod.volume(mount["name"]) / path[len(mount["mountPath"].rstrip("/")) + 1:]
    uid, _, groups = pod.identity(container, image)
    try:
        st = os.stat(host_file)
    except FileNotFoundError:
        check(False, what, "no such file after the broker's startup probe passed")
        return
    mode = st.st_mode
    # The kernel's order, for a process without CAP_DAC_OVERRIDE: the owner's
    # bits if it owns the file, else the group's if it is in the group, else others'.
    if st.st_uid == uid:
        readable = bool(mode & 0o400)
    elif st.st_gid in groups:
        readable = bool(mode & 0o040)
    else:
        readable = bool(mode & 0o004)
    if not check(readable, f"{pod.name}/{container['name']}: uid {uid} with groups {groups} may read {path} (mode {mode & 0o777:04o}, owner {st.st_uid}:{st.st_gid})"):
        return
    token = host_file.read_text()
    probe = "import sys, urllib.request as u; print(u.urlopen(u.Request(sys.argv[1], headers={'Authorization': 'Bearer ' + sys.stdin.read()}), timeout=5).status)"
    answer = subprocess.run(["ip", "netns", "exec", pod.netns, sys.executable, "-c", probe, f"http://127.0.0.1:{EMULATOR_PORT}/v2/transactions"], input=token, capture_output=True, text=True)
    if check(answer.returncode == 0 and answer.stdout.strip() == "200", what, answer.stderr.strip()[-300:]):
        exercised.append(what)


def terminate(pod, container, root, env, process, image, shutdown_grace):
    grace = pod.spec.get("terminationGracePeriodSeconds", 30)
    started = time.monotonic()
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "exec" in pre_stop:
        hook = pod.launch(container, root, pre_stop["exec"]["command"], image, env)
        ready = container.get("readinessProbe")
        if ready:
            ok, detail = probe_once(pod, container, root, ready, image, env)
            check(ok, f"{pod.name}/{container['name']}: still ready while the preStop hook runs", detail)
        check(hook.wait(timeout=grace) == 0, f"{pod.name}/{container['name']}: preStop hook {shlex.join(pre_stop['exec']['command'])} exits 0")
        exercised.append(f"{pod.name}/{container['name']}: preStop exec")
    delay = time.monotonic() - started
    check(grace > delay + shutdown_grace, f"{pod.name}: terminationGracePeriodSeconds {grace} > preStop {delay:.1f} s + shutdown_grace {shutdown_grace} s")
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=max(grace - delay, 1))
    except subprocess.TimeoutExpired:
        code = "still running"
    check(code == 0, f"{pod.name}/{container['name']}: exits 0 after SIGTERM within the grace period", f"exit {code}")


def host_socket(pod):
    """The hostPath directory a DaemonSet's broker serves its socket in, on
    the host side, and the socket's name, if it does."""
    for container in pod.all_containers():
        if not is_broker(container):
            continue
        args = container.get("args", [])
        listen = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--listen" and args[i + 1].startswith("unix:")]
        for addr in listen:
            path = addr[len("unix:"):]
            for mount in container.get("volumeMounts", []):
                prefix = mount["mountPath"].rstrip("/") + "/"
                volume = next(v for v in pod.spec.get("volumes", []) if v["name"] == mount["name"])
                if path.startswith(prefix) and "hostPath" in volume:
                    return pod.volume(mount["name"]) / path[len(prefix):]
    return None


def roll_daemonset(pod, running, docs, image, config_env, emulator_args, next_index, shutdown_grace):
    """A DaemonSet rolling update on one node: the replacement pod starts
    beside the old one on the same hostPath directory; once it is ready the
    old pod is terminated. Returns the replacement's pod and containers."""
    import restart_load

    strategy = pod.doc["spec"].get("updateStrategy", {})
    rolling = strategy.get("rollingUpdate", {})
    check(
        strategy.get("type", "RollingUpdate") == "RollingUpdate" and rolling.get("maxSurge") == 1 and rolling.get("maxUnavailable") == 0,
        f"{pod.name}: rolls with maxSurge 1 and maxUnavailable 0 (the replacement serves the node's socket before the old pod stops)",
    )
    socket_path = host_socket(pod)
    replacement = Pod(next_index, pod.doc, pod.objects, pod.work.parent, pod.host_paths)
    outcome = {}

    def update():
        new_running, _ = run_pod(replacement, docs, image, config_env, emulator_args)
        outcome["new"] = new_running
        outcome["sigterm"] = time.monotonic()
        for container, root, env, process in running:
            terminate(pod, container, root, env, process, image, shutdown_grace)
        outcome["stopped"] = time.monotonic()

    grpc_caller, process_caller, watcher, _, began = restart_load.run(str(socket_path), str(BIN), update, duration=12.0, action_at=3.0)
    for caller in (grpc_caller, process_caller):
        check(caller.failed == 0, f"{pod.name} rolling update: no failed call", caller.summary())
    current = subprocess.run([BIN, "get", "--env", "sandbox", "--format", "json", "--addr", f"unix:{socket_path}"], capture_output=True, text=True)
    new_token = json.loads(current.stdout)["token_id"] if current.returncode == 0 else None
    after = [(at, token) for at, token in watcher.token_ids() if at > outcome.get("sigterm", float("inf"))]
    held = after[0][0] - outcome["sigterm"] if after else None
    check(
        held is not None and held <= 1.0 and after[-1][1] == new_token,
        f"{pod.name} rolling update: the watcher holds the new broker's token within 1 s of the old broker's SIGTERM",
        f"watcher lines {watcher.lines}, new token {new_token}",
    )
    exercised.append(
        f"{pod.name} rolling update (maxSurge 1): {grpc_caller.summary()}; {process_caller.summary()}; "
        f"watcher on the new token {held * 1000 if held is not None else float('nan'):.0f} ms after the old broker's SIGTERM; "
        f"old broker stopped {(outcome['stopped'] - outcome['sigterm']) * 1000:.0f} ms after SIGTERM"
    )
    return replacement, outcome["new"]


def hub_names(config, docs):
    """The Deployments behind the headless Services an agent's upstream names."""
    names = set()
    for env in config.get("environments", {}).values():
        for addr in env.get("upstream", []):
            host = addr.split("://")[-1].split(":")[0].split(".")[0]
            for d in docs:
                if d["kind"] == "Service" and d["metadata"]["name"] == host:
                    names |= {w["metadata"]["name"] for w in docs if w["kind"] == "Deployment" and selects(d["spec"].get("selector"), pod_spec(w)[0].get("labels", {}))}
    return names


def hub_failover(agent, hubs, image, shutdown_grace):
    """Kills the hub replica an agent follows while callers use the agent's
    socket: no call may fail, and the agent must follow another replica.
    Returns the killed hub."""
    import restart_load

    log = agent.work / "broker.log"

    def following():
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        return [line.get("upstream", "") for line in lines if line.get("message") == "following the upstream broker"]

    before = following()
    followed = next((hub for hub in hubs if before and f"({hub.ip}:" in before[-1]), None)
    if not check(followed is not None, f"{agent.name}: follows a hub replica through the headless Service", f"log says {before}"):
        return None
    outcome = {}

    def kill():
        for _, _, _, process in followed.running:
            process.kill()
            process.wait()
        outcome["killed"] = time.monotonic()

    grpc_caller, process_caller, watcher, _, _ = restart_load.run(str(host_socket(agent)), str(BIN), kill, duration=10.0, action_at=3.0)
    for caller in (grpc_caller, process_caller):
        check(caller.failed == 0, f"{agent.name}: no failed call at the agent while the hub replica it follows is killed", caller.summary())
    after = following()[len(before):]
    others = [hub.ip for hub in hubs if hub is not followed]
    if not check(any(f"({ip}:" in a for a in after for ip in others), f"{agent.name}: follows another hub replica after the loss", f"log says {after}"):
        print(log.read_text()[-4000:])
    exercised.append(f"{agent.name}: hub replica {followed.ip} killed: {grpc_caller.summary()}; {process_caller.summary()}; agent now follows {after[-1] if after else '?'}")
    return followed


def rotate_fleet_tls(agent, hubs, objects, work):
    """Renews every issued TLS Secret (as cert-manager does: a new key and
    serial) and swaps it into each hub's and the agent's volume the
    kubelet's way, while the callers use the agent's socket: no call may
    fail, no broker restarts, and each broker logs the new serial."""
    import restart_load

    pods = [*hubs, agent]
    pids = {pod.name + str(pod.index): [process.pid for _, _, _, process in pod.running] for pod in pods}
    renewed = {}

    def rotate():
        for name in [n for n in pki if n != "ca"]:
            cert = next(d for (kind, _), d in objects.items() if kind == "Certificate" and d["spec"].get("secretName") == name)
            renewed[name] = issue(cert, name, work)
        for pod in pods:
            for volume, (kind, wanted, mode, group) in pod.projected.items():
                if kind == "Secret" and wanted in renewed:
                    kubelet_write(pod.volumes[volume], renewed[wanted]["stringData"], mode, group)

    grpc_caller, process_caller, _, _, _ = restart_load.run(str(host_socket(agent)), str(BIN), rotate, duration=8.0, action_at=3.0)
    for caller in (grpc_caller, process_caller):
        check(caller.failed == 0, f"{agent.name}: no failed call at the agent while the fleet's TLS Secrets rotate", caller.summary())

    def reloaded(pod):
        log = pod.work / "broker.log"
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        return {line.get("serial", "").replace(":", "").upper().lstrip("0") for line in lines if line.get("message", "").startswith("TLS material reloaded")}

    seen = []
    for pod in pods:
        wanted = {renewed[wanted]["serial"].lstrip("0") for _, (kind, wanted, _, _) in pod.projected.items() if kind == "Secret" and wanted in renewed}
        deadline = time.monotonic() + 10
        while not wanted <= reloaded(pod) and time.monotonic() < deadline:
            time.sleep(0.1)
        check(wanted <= reloaded(pod), f"{pod.name}: took the renewed certificate without a restart", f"wanted {wanted}, logged {reloaded(pod)}")
        alive = [process.poll() is None for _, _, _, process in pod.running]
        check(all(alive) and [process.pid for _, _, _, process in pod.running] == pids[pod.name + str(pod.index)],
              f"{pod.name}: no restart while its TLS Secret rotated")
        seen.append(f"{pod.name} ({pod.ip}) took serial {', '.join(sorted(wanted))}")
    exercised.append(f"TLS Secrets renewed and swapped the kubelet's way under load: {grpc_caller.summary()}; {process_caller.summary()}; {'; '.join(seen)}; no restart")


def main():
    if os.geteuid() != 0:
        raise SystemExit("pod-probe.py needs root (network namespaces, mounts)")
    # Left over from an interrupted run: the names would clash.
    for stale in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
        if stale.startswith("ftb-pod-"):
            subprocess.run(["ip", "netns", "delete", stale], capture_output=True)
    docs = render()
    objects = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    headless.extend(d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None")
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1")
    image = image_defaults()
    work = pathlib.Path(tempfile.mkdtemp(prefix="ftb-pods-"))
    host_paths = {}
    try:
        workloads = [d for d in docs if d["kind"] in WORKLOAD_KINDS for _ in range(replicas(d, docs))]
        pods = [Pod(i + 1, d, objects, work, host_paths) for i, d in enumerate(workloads)]
        # Brokers first (a client pod, such as the per-node broker's, needs
        # one running), hubs before the agents that follow them.
        pods.sort(key=lambda p: (not any(is_broker(c) for c in p.all_containers()), follows_upstream(broker_config(p, objects))))
        started = []
        hubs = []
        for pod in pods:
            config = broker_config(pod, objects)
            secret = objects.get(("Secret", "flute-api-key"), {}).get("stringData", {}).get("client-secret", "")
            emulator_args = ["--client-id", (config or {}).get("credentials", {}).get("client_id", ""), "--client-secret", secret]
            url = f"http://127.0.0.1:{EMULATOR_PORT}/oauth2/token"
            # The endpoint override goes only to environments that call it:
            # one that follows an upstream has no token_url.
            environments = (config or {}).get("environments", {})
            config_env = {"FLUTE_BROKER__OAUTH__ALLOW_INSECURE_HTTP": "true"} | {
                f"FLUTE_BROKER__ENVIRONMENTS__{env.upper()}__TOKEN_URL": url for env in ("sandbox", "production") if not environments.get(env, {}).get("upstream")
            }
            running, clients = run_pod(pod, docs, image, config_env, emulator_args)
            pod.running = running
            if replicas(pod.doc, docs) > 1:
                hubs.append(pod)
            check_services(pod, docs)
            for container in clients:
                run_client(pod, container, image)
            grace = int(str((config or {}).get("server", {}).get("shutdown_grace", "10s")).rstrip("s"))
            if pod.doc["kind"] == "DaemonSet" and host_socket(pod) is not None:
                next_index = len(pods) + 1 + len(started)
                pod, running = roll_daemonset(pod, running, docs, image, config_env, emulator_args, next_index, grace)
                pod.running = running
            if follows_upstream(config) and host_socket(pod) is not None:
                fleet = [h for h in hubs if h.doc["metadata"]["name"] in hub_names(config, docs)]
                killed = hub_failover(pod, fleet, image, grace)
                started = [(p, r, g) for p, r, g in started if p is not killed]
                rotate_fleet_tls(pod, [h for h in fleet if h is not killed], objects, work)
            started.append((pod, running, grace))
        for pod, running, grace in started:
            for container, root, env, process in running:
                terminate(pod, container, root, env, process, image, grace)
    finally:
        for undo in reversed(cleanup):
            try:
                undo()
            except Exception:  # noqa: BLE001 - best effort
                pass
        shutil.rmtree(work, ignore_errors=True)
    print("exercised:\n" + "\n".join(f"  {e}" for e in exercised))
    print(f"pod probe checks: {'FAILED: ' + str(failures) if failures else 'all passed'}")
    sys.exit(1 if failures else 0)


main()
