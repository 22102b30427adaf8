"""Offline checks of everything under deploy/ (run by .ci/run).

- Kubernetes manifests validate (strict) against the Kubernetes schemas.
- kustomization.yaml lists every manifest except the examples.
- The config files shipped in deploy/ pass `flute-token-broker check-config`,
  with their secrets and, without them, with `--skip-secrets`.
- The systemd unit passes `systemd-analyze verify` and its exposure is <= 2.0.
"""

import os
import pathlib
import subprocess
import sys
import tempfile

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "debug" / "flute-token-broker"
K8S_VERSION = "1.33.0"
failures = []


def run(cmd, env=None, what=None):
    result = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    status = "ok" if result.returncode == 0 else f"FAILED ({result.returncode})"
    print(f"{what or ' '.join(map(str, cmd))}: {status}")
    if result.returncode != 0:
        print(result.stdout + result.stderr)
        failures.append(what or cmd)
    return result


k8s = ROOT / "deploy" / "kubernetes"
manifests = sorted(p for p in k8s.rglob("*.yaml") if p.name != "kustomization.yaml")
run(["kubernetes-validate", "--strict", "--quiet", "-k", K8S_VERSION, *map(str, manifests)], what=f"kubernetes-validate {len(manifests)} manifests")

kustomization = yaml.safe_load((k8s / "kustomization.yaml").read_text())
listed = set(kustomization["resources"])
expected = {p.name for p in k8s.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
if listed != expected:
    failures.append("kustomization resources")
    print(f"kustomization.yaml resources {sorted(listed)} != manifests {sorted(expected)}")
else:
    print(f"kustomization lists all {len(listed)} manifests: ok")

with tempfile.TemporaryDirectory() as tmp:
    secret = pathlib.Path(tmp) / "client-secret"
    secret.write_text("placeholder-secret\n")
    secret.chmod(0o600)
    (pathlib.Path(tmp) / "flute-client-secret").write_text("placeholder-secret\n")
    configmap = yaml.safe_load((k8s / "configmap.yaml").read_text())
    k8s_config = pathlib.Path(tmp) / "k8s-config.toml"
    k8s_config.write_text(configmap["data"]["config.toml"])
    for config, env in [
        (k8s_config, {"FLUTE_BROKER__CREDENTIALS__CLIENT_SECRET_FILE": str(secret)}),
        (ROOT / "deploy" / "systemd" / "config.toml", {"CREDENTIALS_DIRECTORY": tmp}),
        (ROOT / "deploy" / "config.example.toml", {"FLUTE_BROKER__CREDENTIALS__CLIENT_SECRET_FILE": str(secret)}),
    ]:
        run([BIN, "check-config", "--config", config], env=env, what=f"check-config {config.name}")
    # Every other ConfigMap's config.toml (the variants), checked as text.
    variants = []
    for manifest in manifests:
        for doc in yaml.safe_load_all(manifest.read_text()):
            if doc and doc["kind"] == "ConfigMap" and "config.toml" in doc.get("data", {}) and manifest != k8s / "configmap.yaml":
                variant = pathlib.Path(tmp) / f"{doc['metadata']['name']}.toml"
                variant.write_text(doc["data"]["config.toml"])
                variants.append(variant)
    # A pipeline without the secret: everything but the key source is checked.
    for config in (ROOT / "deploy" / "systemd" / "config.toml", ROOT / "deploy" / "systemd" / "agent.toml", ROOT / "deploy" / "config.example.toml", k8s_config, *variants):
        clean = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY" and not k.startswith("FLUTE_BROKER__")}
        result = subprocess.run([BIN, "check-config", "--skip-secrets", "--config", config], env=clean, capture_output=True, text=True)
        print(f"check-config --skip-secrets {config.name}: {'ok' if result.returncode == 0 else 'FAILED'}")
        if result.returncode != 0:
            print(result.stderr)
            failures.append(f"check-config --skip-secrets {config.name}")

    unit = pathlib.Path(tmp) / "flute-token-broker.service"
    unit.write_text((ROOT / "deploy" / "systemd" / "flute-token-broker.service").read_text().replace("/usr/bin/flute-token-broker", str(BIN)))
    socket_unit = pathlib.Path(tmp) / "flute-token-broker.socket"
    socket_unit.write_text((ROOT / "deploy" / "systemd" / "flute-token-broker.socket").read_text())
    run(["systemd-analyze", "verify", str(unit), str(socket_unit)], what="systemd-analyze verify")
    result = run(["systemd-analyze", "security", "--offline=true", "--threshold=20", str(unit)], what="systemd-analyze security (exposure <= 2.0)")
    print([line for line in result.stdout.splitlines() if "Overall exposure" in line][-1:])

print(f"deploy checks: {'FAILED: ' + str(failures) if failures else 'all passed'}")
sys.exit(1 if failures else 0)
