"""etcd + kube-apiserver on loopback, the way envtest runs them.

Generates a CA, a serving certificate, an admin client certificate (group
system:masters), a service-account key pair and a static token for a second,
unprivileged identity, starts etcd and kube-apiserver (RBAC authorizer) and writes
a kubeconfig with two contexts: `testbed` (admin) and `unprivileged`.
"""
from __future__ import annotations

import secrets
import shutil
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from . import state

COMPONENT = "kube"
UNPRIVILEGED_USER = "testbed-user"


def openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise state.TestbedError(f"openssl {' '.join(args[:2])} failed: {result.stderr.strip()}")


def issue(pki: Path, certs: dict[str, tuple[str, str]]) -> None:
    """name -> (subject, extensions file in pki): a key and a certificate signed by pki's CA each."""
    for name, (subject, ext) in certs.items():
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=pki)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "3650", "-extfile", ext, "-out", f"{name}.crt", cwd=pki)


def make_pki(pki: Path) -> None:
    """CA, apiserver serving cert (127.0.0.1/localhost), admin client cert, SA keys."""
    if (pki / "admin.crt").exists():
        return
    pki.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650", "-subj", "/CN=testbed-ca",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=pki)
    (pki / "san.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n")
    (pki / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    issue(pki, {"apiserver": ("/CN=kube-apiserver", "san.ext"),
                "admin": ("/O=system:masters/CN=testbed-admin", "client.ext")})
    openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    (pki / "tokens.csv").write_text(f"{secrets.token_hex(16)},{UNPRIVILEGED_USER},1001,testbed-users\n")


def write_kubeconfig(path: Path, pki: Path, server: str) -> None:
    token = (pki / "tokens.csv").read_text().split(",", 1)[0]
    path.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: testbed
  cluster:
    server: {server}
    certificate-authority: {pki / 'ca.crt'}
users:
- name: testbed-admin
  user:
    client-certificate: {pki / 'admin.crt'}
    client-key: {pki / 'admin.key'}
- name: {UNPRIVILEGED_USER}
  user:
    token: {token}
contexts:
- name: testbed
  context: {{cluster: testbed, user: testbed-admin}}
- name: unprivileged
  context: {{cluster: testbed, user: {UNPRIVILEGED_USER}}}
current-context: testbed
""")
    path.chmod(0o600)


def _readyz(server: str, pki: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    try:
        with urllib.request.urlopen(f"{server}/readyz", context=ctx, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def healthy(record: state.Record | None) -> bool:
    if record is None or "server" not in record.facts or not all(state.alive(p) for p in record.pids):
        return False  # none, one that failed half-way (no facts), or one with a process gone
    return _readyz(record.facts["server"], Path(record.facts["pki"]))


def up(timeout: float = 180.0) -> state.Record:
    """Start etcd and kube-apiserver unless a healthy pair is already running.

    A start that fails half-way (a binary not built, a port taken, a timeout) stops what it
    started and leaves no record, so the next `up` starts clean instead of finding a half pair."""
    record = state.load(COMPONENT)
    if healthy(record):
        return record
    state.stop(COMPONENT)
    etcd, apiserver = state.binary("etcd"), state.binary("kube-apiserver")  # both built, or nothing starts
    try:
        return _start(etcd, apiserver, timeout)
    except BaseException:
        state.stop(COMPONENT)
        raise


def _start(etcd: Path, apiserver: Path, timeout: float) -> state.Record:
    base = state.STATE_DIR / "kube"
    shutil.rmtree(base / "etcd", ignore_errors=True)
    pki = base / "pki"
    make_pki(pki)
    logs = state.STATE_DIR / "logs"
    etcd_port, peer_port, api_port = state.free_port(), state.free_port(), state.free_port()
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    etcd_pid = state.spawn([
        etcd, "--name", "testbed", "--data-dir", base / "etcd",
        "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
        "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
        "--initial-cluster", f"testbed=http://127.0.0.1:{peer_port}",
        "--unsafe-no-fsync", "--log-level", "warn",
    ], logs / "etcd.log")
    state.save(state.Record(COMPONENT, (etcd_pid,), {}))
    state.wait_until(lambda: state.port_open(etcd_port), 30, "etcd", log=logs / "etcd.log")
    server = f"https://127.0.0.1:{api_port}"
    api_argv = [
        str(apiserver),
        "--etcd-servers", etcd_url, "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
        "--secure-port", str(api_port),
        "--tls-cert-file", pki / "apiserver.crt", "--tls-private-key-file", pki / "apiserver.key",
        "--client-ca-file", pki / "ca.crt",
        "--authorization-mode", "RBAC", "--token-auth-file", pki / "tokens.csv",
        "--service-account-key-file", pki / "sa.pub", "--service-account-signing-key-file", pki / "sa.key",
        "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
        "--service-cluster-ip-range", "10.96.0.0/16", "--allow-privileged=true",
        # No controller-manager or scheduler here: admission that waits on them is off.
        "--disable-admission-plugins", "ServiceAccount,NamespaceLifecycle",
        "--profiling=false", "--v=1",
    ]
    api_argv = [str(a) for a in api_argv]
    api_pid = state.spawn(api_argv, logs / "kube-apiserver.log")
    kubeconfig = state.STATE_DIR / "kubeconfig"
    write_kubeconfig(kubeconfig, pki, server)
    record = state.Record(COMPONENT, (etcd_pid, api_pid),
                          {"server": server, "pki": str(pki), "kubeconfig": str(kubeconfig),
                           "version": state.versions()["KUBERNETES_VERSION"], "api_argv": api_argv})
    state.save(record)
    state.wait_until(lambda: _readyz(server, pki), timeout, "kube-apiserver /readyz",
                     interval=0.5, log=logs / "kube-apiserver.log")
    return record


def restart_apiserver(down_seconds: float = 0.0, timeout: float = 120.0) -> state.Record:
    """Stop kube-apiserver and start it again on the same port and etcd (a restart, not a
    new cluster: every object survives). For fault tests."""
    record = state.load(COMPONENT)
    if record is None or "api_argv" not in record.facts:
        raise state.TestbedError("no restartable kube-apiserver is running (start it with kube.up())")
    state.kill_group(record.pids[1])
    time.sleep(down_seconds)
    log = state.STATE_DIR / "logs" / "kube-apiserver.log"
    api_pid = state.spawn(record.facts["api_argv"], log)
    record = state.Record(COMPONENT, (record.pids[0], api_pid), record.facts)
    state.save(record)
    state.wait_until(lambda: _readyz(record.facts["server"], Path(record.facts["pki"])), timeout,
                     "kube-apiserver /readyz after a restart", interval=0.5, log=log)
    return record


def down() -> bool:
    return state.stop(COMPONENT)
