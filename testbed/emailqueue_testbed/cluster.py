"""A real single-node Kubernetes cluster without Docker (issue 13): real pods from our images.

`make cluster-up` runs etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
containerd (runc, CNI bridge), kubelet, kube-proxy and CoreDNS, all built from pinned Go
modules (testbed/build-bins.sh cluster) or taken from Debian (runc, CNI plugins, iptables),
and imports the project's images (testbed/build-images.sh) into containerd. One node,
`eqtb-node`, becomes Ready; the Deployment controller, the scheduler, the kubelet and
containerd then do for real what the test bed's simulated kubelet (kubelet.py) plays.

Safety, by construction:

- **Nothing leaves a network namespace of our own.** Every cluster process runs in a
  *sandbox*: `unshare --net --mount --propagation private --fork`. The node network (bridge
  `eqbr0` at 10.88.0.1/16, the pods' veths, kube-proxy's iptables rules, CoreDNS) lives in
  that namespace; it has no link to the host's, so a pod can reach the node and other pods
  and nothing else. The host reaches the apiserver through a forwarder process that listens
  on the host's loopback and connects from inside the sandbox's namespace.
- **The machine's settings are left as they were.** In the sandbox's private mount namespace
  the kubelet's global sysctls (vm.overcommit_memory, vm.panic_on_oom, kernel.panic,
  kernel.panic_on_oops, kernel.keys.root_max*) are regular files bind-mounted over their
  /proc/sys entries, /run is a tmpfs, and /var/lib and /var/log are our own folders (the
  kubelet hard-codes /var/log/containers, CNI's IPAM /var/lib/cni): every mount vanishes
  with the sandbox. Every process of the cluster, the pods included, lives under the cgroup
  `eqtb-cluster` of each hierarchy (the kubelet's cgroupRoot); `down()` kills what is in it,
  removes those cgroups, and `leftovers()` proves nothing remains.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import state
from .kube import issue, openssl
from .netlab import in_netns

COMPONENT = "cluster"
NODE_NAME = "eqtb-node"
NODE_IP = "10.88.0.1"
POD_CIDR = "10.88.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"
API_SERVICE_IP = "10.96.0.1"
DNS_IP = NODE_IP  # CoreDNS runs on the node itself (a process of the sandbox, not a pod)
BRIDGE = "eqbr0"
API_PORT = 6443
CGROUP = "eqtb-cluster"
CGROUP_FS = Path("/sys/fs/cgroup")
PAUSE_IMAGE = "localhost/emailqueue-testbed/pause:3.10"
# What the kubelet would write to the machine: values it wants, served from our own files.
SHIELDED_SYSCTLS = {
    "vm/overcommit_memory": "1", "vm/panic_on_oom": "0", "kernel/panic": "10",
    "kernel/panic_on_oops": "1", "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}
# Host folders the sandbox hides behind its own (everything written there stays ours).
HIDDEN_DIRS = ("/var/lib", "/var/log")
# Paths of the host that a cluster would create if it escaped its sandbox (checked by leftovers()).
HOST_PATHS = ("/var/lib/kubelet", "/var/lib/containerd", "/var/log/pods", "/var/log/containers",
              "/var/lib/cni", "/etc/cni/net.d", "/opt/containerd", "/run/containerd", "/run/runc",
              "/usr/libexec/kubernetes", "/etc/kubernetes", "/opt/nri", "/etc/nri", "/etc/cdi")
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy",
            "containerd", "containerd-shim-runc-v2", "ctr", "coredns", "kubectl")
DEBIAN_TOOLS = {"/usr/sbin/runc": "runc", "/usr/lib/cni/bridge": "containernetworking-plugins",
                "/usr/lib/cni/host-local": "containernetworking-plugins",
                "/usr/lib/cni/loopback": "containernetworking-plugins", "/usr/sbin/iptables": "iptables"}


class ClusterError(state.TestbedError):
    """The real cluster could not be built, started, reached or cleaned up."""


def base_dir() -> Path:
    return state.STATE_DIR / "cluster"


# --------------------------------------------------------------------------- host side: files
CLIENTS = {  # file name -> subject (RBAC's built-in bindings know these users and groups)
    "admin": "/O=system:masters/CN=eqtb-admin",
    "kubelet": f"/O=system:nodes/CN=system:node:{NODE_NAME}",
    "controller-manager": "/CN=system:kube-controller-manager",
    "scheduler": "/CN=system:kube-scheduler",
    "kube-proxy": "/CN=system:kube-proxy",
    "apiserver-kubelet-client": "/O=system:masters/CN=kube-apiserver-kubelet-client",
    # CoreDNS reads Services, EndpointSlices and Namespaces; it gets the ClusterRole below.
    "coredns": "/CN=eqtb:coredns",
}


def make_pki(pki: Path) -> None:
    """A CA, the apiserver's serving certificate (node IP, Service IP, loopback, names), a
    client certificate per component and the service-account key pair."""
    if (pki / "complete").exists():
        return
    shutil.rmtree(pki, ignore_errors=True)
    pki.mkdir(parents=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650", "-subj", "/CN=eqtb-cluster-ca",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=pki)
    (pki / "server.ext").write_text(
        f"subjectAltName=IP:127.0.0.1,IP:{NODE_IP},IP:{API_SERVICE_IP},DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
        "extendedKeyUsage=serverAuth\n")
    (pki / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    certs = {"apiserver": ("/CN=kube-apiserver", "server.ext")}
    certs.update({name: (subject, "client.ext") for name, subject in CLIENTS.items()})
    issue(pki, certs)
    openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    (pki / "complete").write_text("")


def kubeconfig(pki: Path, user: str, server: str) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "eqtb",
        "clusters": [{"name": "eqtb", "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")}}],
        "users": [{"name": user, "user": {"client-certificate": str(pki / f"{user}.crt"),
                                          "client-key": str(pki / f"{user}.key")}}],
        "contexts": [{"name": "eqtb", "context": {"cluster": "eqtb", "user": user}}],
    }, indent=2)


def write_config(base: Path, images: Sequence[Path]) -> dict[str, Any]:
    """Every file the sandbox's processes read; returns the sandbox's plan (argv per process)."""
    pki = base / "pki"
    make_pki(pki)
    conf = base / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    inside = f"https://127.0.0.1:{API_PORT}"
    for user in CLIENTS:
        (conf / f"{user}.kubeconfig").write_text(kubeconfig(pki, user, inside))
    for sub in ("containerd", "kubelet", "pod-logs", "etcd", "varlib", "varlog", "cni/net.d", "cni/ipam",
                "containerd-opt", "volume-plugins", "sysctl", "cgroupfs", "run"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    bins = {name: str(binary(name)) for name in BINARIES}
    (conf / "containerd.toml").write_text(f"""version = 3
root = "{base / 'containerd'}"
state = "/run/containerd"
# NRI would make /opt/nri and /etc/nri; nothing here uses it.
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins]
  [plugins.'io.containerd.internal.v1.opt']
    path = "{base / 'containerd-opt'}"
  [plugins.'io.containerd.image-verifier.v1.bindir']
    bin_dir = "{base / 'containerd-opt/image-verifier'}"
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = "overlayfs"
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = "{PAUSE_IMAGE}"
  [plugins.'io.containerd.cri.v1.runtime']
    # No CAP_SYS_RESOURCE here: a container's oom_score_adj may not go below containerd's own.
    restrict_oom_score_adj = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = "runc"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = "/usr/sbin/runc"
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ["/usr/lib/cni"]
      conf_dir = "{base / 'cni/net.d'}"
  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
""")
    (base / "cni/net.d/10-eqtb.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "eqtb",
        "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "dataDir": str(base / "cni/ipam"),
                      "ranges": [[{"subnet": POD_CIDR, "rangeStart": "10.88.1.2", "gateway": NODE_IP}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }, indent=2))
    (conf / "kubelet.yaml").write_text(json.dumps({
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        # This machine: cgroup v1 (hybrid), no systemd, no swap accounting, no CAP_SYS_RESOURCE.
        "failCgroupV1": False, "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{CGROUP}", "cgroupsPerQOS": True,
        "failSwapOn": False, "maxOpenFiles": 20000, "protectKernelDefaults": False,
        "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
        "address": NODE_IP, "port": 10250, "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1", "healthzPort": 10248,
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(pki / "ca.crt")}},
        "authorization": {"mode": "Webhook"},
        "clusterDNS": [DNS_IP], "clusterDomain": "cluster.local", "resolvConf": "",
        "podLogsDir": str(base / "pod-logs"), "volumePluginDir": str(base / "volume-plugins"),
        "serializeImagePulls": False, "registerNode": True,
        # A test machine's disk is shared: evict only when it is really full.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "2%", "imagefs.available": "2%",
                         "nodefs.inodesFree": "2%"},
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "shutdownGracePeriod": "0s", "rotateCertificates": False, "serverTLSBootstrap": False,
        "nodeStatusUpdateFrequency": "4s", "syncFrequency": "10s",
    }, indent=2))
    (conf / "kube-proxy.yaml").write_text(json.dumps({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(conf / "kube-proxy.kubeconfig")},
        "mode": "iptables", "clusterCIDR": POD_CIDR, "hostnameOverride": NODE_NAME,
        "healthzBindAddress": "127.0.0.1:10256", "metricsBindAddress": "127.0.0.1:10249",
        # 0: leave the kernel's conntrack table size and timeouts alone (they are global).
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }, indent=2))
    # Port 53 on every address of the sandbox's namespace: its loopback and the node's bridge.
    (conf / "Corefile").write_text(f""".:53 {{
    errors
    health 127.0.0.1:8080
    ready 127.0.0.1:8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {conf / 'coredns.kubeconfig'} eqtb
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
""")
    (conf / "resolv.conf").write_text(f"nameserver {DNS_IP}\n")
    argv = {
        "etcd": [bins["etcd"], "--name", "eqtb", "--data-dir", str(base / "etcd"),
                 "--listen-client-urls", "http://127.0.0.1:2379", "--advertise-client-urls", "http://127.0.0.1:2379",
                 "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls",
                 "http://127.0.0.1:2380", "--initial-cluster", "eqtb=http://127.0.0.1:2380",
                 "--unsafe-no-fsync", "--log-level", "warn"],
        "kube-apiserver": [
            bins["kube-apiserver"], "--etcd-servers", "http://127.0.0.1:2379",
            "--bind-address", "0.0.0.0", "--advertise-address", NODE_IP, "--secure-port", str(API_PORT),
            "--tls-cert-file", str(pki / "apiserver.crt"), "--tls-private-key-file", str(pki / "apiserver.key"),
            "--client-ca-file", str(pki / "ca.crt"), "--authorization-mode", "Node,RBAC",
            "--service-account-key-file", str(pki / "sa.pub"),
            "--service-account-signing-key-file", str(pki / "sa.key"),
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range", SERVICE_CIDR, "--allow-privileged=true",
            "--kubelet-client-certificate", str(pki / "apiserver-kubelet-client.crt"),
            "--kubelet-client-key", str(pki / "apiserver-kubelet-client.key"),
            "--kubelet-preferred-address-types", "InternalIP", "--profiling=false", "--v=1"],
        "kube-controller-manager": [
            bins["kube-controller-manager"], "--kubeconfig", str(conf / "controller-manager.kubeconfig"),
            "--authentication-kubeconfig", str(conf / "controller-manager.kubeconfig"),
            "--authorization-kubeconfig", str(conf / "controller-manager.kubeconfig"),
            "--bind-address", "127.0.0.1", "--leader-elect=false", "--use-service-account-credentials=true",
            "--service-account-private-key-file", str(pki / "sa.key"), "--root-ca-file", str(pki / "ca.crt"),
            "--cluster-signing-cert-file", str(pki / "ca.crt"), "--cluster-signing-key-file", str(pki / "ca.key"),
            "--service-cluster-ip-range", SERVICE_CIDR, "--allocate-node-cidrs=false", "--v=1"],
        "kube-scheduler": [
            bins["kube-scheduler"], "--kubeconfig", str(conf / "scheduler.kubeconfig"),
            "--authentication-kubeconfig", str(conf / "scheduler.kubeconfig"),
            "--authorization-kubeconfig", str(conf / "scheduler.kubeconfig"),
            "--bind-address", "127.0.0.1", "--leader-elect=false", "--v=1"],
        "containerd": [bins["containerd"], "--config", str(conf / "containerd.toml"), "--log-level", "warn"],
        "kubelet": [
            bins["kubelet"], "--config", str(conf / "kubelet.yaml"),
            "--kubeconfig", str(conf / "kubelet.kubeconfig"), "--root-dir", str(base / "kubelet"),
            "--hostname-override", NODE_NAME, "--node-ip", NODE_IP, "--v=1"],
        "kube-proxy": [bins["kube-proxy"], "--config", str(conf / "kube-proxy.yaml"), "--v=1"],
        "coredns": [bins["coredns"], "-conf", str(conf / "Corefile")],
    }
    return {"base": str(base), "argv": argv, "host_ns": {"net": _ns_inode("net"), "mnt": _ns_inode("mnt")},
            "ctr": bins["ctr"], "kubectl": bins["kubectl"],
            "shim_dir": str(Path(bins["containerd-shim-runc-v2"]).parent),
            "shim": bins["containerd-shim-runc-v2"], "images": [str(p) for p in images],
            "admin_kubeconfig": str(conf / "admin.kubeconfig"), "pki": str(pki)}


def binary(name: str) -> Path:
    pins = state.versions()
    key = {"containerd": "CONTAINERD_VERSION", "containerd-shim-runc-v2": "CONTAINERD_VERSION",
           "ctr": "CONTAINERD_VERSION", "coredns": "COREDNS_VERSION", "etcd": "ETCD_VERSION"}.get(
        name, "KUBERNETES_VERSION")
    path = state.CACHE_DIR / "bin" / f"{name}-{pins[key]}"
    if not path.exists():
        raise ClusterError(f"{path} is not built: run `testbed/build-bins.sh cluster` (make cluster-up does)")
    return path


# --------------------------------------------------------------------------- cgroups
def controllers() -> list[Path]:
    """Every cgroup hierarchy mounted under /sys/fs/cgroup (v1 controllers, name=systemd, unified)."""
    found = []
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            point = Path(fields[4])
            fstype = fields[fields.index("-") + 1]
            if fstype in ("cgroup", "cgroup2") and point.parent == CGROUP_FS:
                found.append(point)
    return sorted(found)


def make_cgroups() -> None:
    for root in controllers():
        for sub in (root / CGROUP, root / CGROUP / "system"):
            sub.mkdir(exist_ok=True)
            if root.name == "cpuset":  # a cpuset cgroup takes no task before it has cpus and mems
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    if not (sub / knob).read_text().strip():
                        (sub / knob).write_text((sub.parent / knob).read_text())


def join_cgroups(pid: int) -> None:
    for root in controllers():
        procs = root / CGROUP / "system" / "cgroup.procs"
        try:
            procs.write_text(str(pid))
        except OSError as exc:
            if root.name != "unified":  # hybrid: the v2 tree may refuse (controllers in use)
                raise ClusterError(f"cannot move pid {pid} into {procs}: {exc}") from exc


def cgroup_pids() -> set[int]:
    pids: set[int] = set()
    for root in controllers():
        top = root / CGROUP
        if not top.is_dir():
            continue
        for dirpath, _dirs, files in os.walk(top):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError):
                    pids.update(int(p) for p in Path(dirpath, "cgroup.procs").read_text().split())
    return pids


def remove_cgroups() -> list[str]:
    """Remove our cgroup trees, deepest first; what could not be removed is returned."""
    failed = []
    for root in controllers():
        top = root / CGROUP
        if not top.is_dir():
            continue
        dirs = [Path(d) for d, _s, _f in os.walk(top)]
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                failed.append(str(d))
    return failed


# --------------------------------------------------------------------------- the sandbox (inside)
def _sh(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode:
        raise ClusterError(f"{' '.join(argv)}: {result.stderr.strip() or result.stdout.strip()}")


def _ns_inode(kind: str) -> int:
    return os.stat(f"/proc/self/ns/{kind}").st_ino


def sandbox_setup(plan: Mapping[str, Any]) -> None:
    """Mounts and network of the sandbox; refuses to run in the host's namespaces."""
    # The plan carries the namespaces of the process that wrote it (the host's).
    if _ns_inode("net") == plan["host_ns"]["net"]:
        raise ClusterError("the sandbox must run in its own network namespace (unshare --net)")
    if _ns_inode("mnt") == plan["host_ns"]["mnt"]:
        raise ClusterError("the sandbox must run in its own mount namespace (unshare --mount)")
    base = Path(plan["base"])
    _sh("mount", "--make-rprivate", "/")
    # sysfs of this network namespace (the CNI plugins and the kubelet read /sys/class/net),
    # with the host's cgroup hierarchies carried over on top of it.
    keep = base / "cgroupfs"
    _sh("mount", "--rbind", str(CGROUP_FS), str(keep))
    _sh("mount", "-t", "sysfs", "sysfs", "/sys")
    _sh("mount", "--move", str(keep), str(CGROUP_FS))
    _sh("mount", "-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run")
    for host_dir, ours in zip(HIDDEN_DIRS, ("varlib", "varlog"), strict=True):
        _sh("mount", "--bind", str(base / ours), host_dir)
    for name, value in SHIELDED_SYSCTLS.items():
        shield = base / "sysctl" / name.replace("/", ".")
        shield.write_text(value + "\n")
        _sh("mount", "--bind", str(shield), f"/proc/sys/{name}")
    _sh("ip", "link", "set", "lo", "up")
    _sh("ip", "link", "add", BRIDGE, "type", "bridge")
    _sh("ip", "addr", "add", f"{NODE_IP}/16", "dev", BRIDGE)
    _sh("ip", "link", "set", BRIDGE, "up")
    # Per network namespace: routing between the bridge's ports and iptables on bridged frames
    # (kube-proxy's Service rules for pod-to-pod traffic on one bridge).
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
    Path("/proc/sys/net/bridge/bridge-nf-call-iptables").write_text("1")


def _http_ok(url: str, pki: Path | None = None) -> bool:
    ctx = None
    if url.startswith("https"):
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt")) if pki else None
        if ctx and pki:
            ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def sandbox_main(plan_path: Path) -> int:
    plan = json.loads(plan_path.read_text())
    base = Path(plan["base"])
    status = base / "status.json"
    logs = base / "logs"
    logs.mkdir(exist_ok=True)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def report(**facts: Any) -> None:
        tmp = status.with_suffix(".tmp")
        tmp.write_text(json.dumps(facts))
        tmp.replace(status)

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    env = dict(os.environ, PATH=f"{plan['shim_dir']}:/usr/sbin:/usr/bin:/sbin:/bin")
    # containerd finds the shim as containerd-shim-runc-v2 on PATH.
    shim_link = base / "shim" / "containerd-shim-runc-v2"
    shim_link.parent.mkdir(exist_ok=True)
    shim_link.unlink(missing_ok=True)
    shim_link.symlink_to(plan["shim"])
    env["PATH"] = f"{shim_link.parent}:{env['PATH']}"

    def start(name: str) -> None:
        out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        procs[name] = subprocess.Popen(plan["argv"][name], stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env)

    def wait(name: str, check: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if stopping:
                raise ClusterError("stopped while starting")
            if procs[name].poll() is not None:
                raise ClusterError(f"{name} exited ({procs[name].returncode}); see {logs / (name + '.log')}")
            if check():
                return
            time.sleep(0.2)
        raise ClusterError(f"{name} not ready after {timeout:.0f} s; see {logs / (name + '.log')}")

    pki = Path(plan["pki"])
    try:
        join_cgroups(os.getpid())  # first: everything started from here is in the cluster's cgroups
        sandbox_setup(plan)
        start("etcd")
        wait("etcd", lambda: state.port_open(2379), 60)
        start("containerd")
        start("kube-apiserver")
        wait("containerd", lambda: Path("/run/containerd/containerd.sock").exists(), 60)
        # All at once (each is mostly hashing and writing its layers).
        imports = {image: subprocess.Popen([plan["ctr"], "-a", "/run/containerd/containerd.sock", "-n", "k8s.io",
                                            "images", "import", "--no-unpack", image], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE, text=True, env=env)
                   for image in plan["images"]}
        for image, proc in imports.items():
            _out, err = proc.communicate()
            if proc.returncode:
                raise ClusterError(f"ctr images import {image}: {err.strip()}")
        wait("kube-apiserver", lambda: _http_ok(f"https://127.0.0.1:{API_PORT}/readyz", pki), 180)
        for name in ("kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "coredns"):
            start(name)
        wait("kubelet", lambda: _http_ok("http://127.0.0.1:10248/healthz"), 120)
        wait("kube-proxy", lambda: _http_ok("http://127.0.0.1:10256/healthz"), 120)
        wait("coredns", lambda: _http_ok("http://127.0.0.1:8080/health"), 120)
        report(ready=True, pids={n: p.pid for n, p in procs.items()})
    except (ClusterError, OSError) as exc:
        report(ready=False, error=str(exc), pids={n: p.pid for n, p in procs.items()})
        stopping = True
    while not stopping:
        for name, proc in procs.items():
            if proc.poll() is not None:
                report(ready=False, error=f"{name} exited ({proc.returncode}); see {logs / (name + '.log')}",
                       pids={n: p.pid for n, p in procs.items()})
                stopping = True
                break
        time.sleep(0.5)
    # Nothing of a stopped cluster is kept (etcd, images and pods go with it): a short grace.
    for name in reversed(list(procs)):
        with contextlib.suppress(ProcessLookupError):
            procs[name].terminate()
    deadline = time.monotonic() + 5
    for proc in procs.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
    return 0


# --------------------------------------------------------------------------- forwarder
async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.close()


async def _forward(listen_port: int, netns: str, target: tuple[str, int]) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with in_netns(netns):  # the socket is born in the sandbox's namespace
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, target), 10)
        except (TimeoutError, OSError):
            sock.close()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(sock=sock)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


def forward(target_host: str, target_port: int) -> int:
    """A host loopback port that reaches target_host:target_port inside the cluster's network
    (a Service's ClusterIP, a pod, the node): a forwarder process, stopped by down()."""
    record = state.load(COMPONENT)
    if record is None:
        raise ClusterError("the cluster is not up (make cluster-up)")
    port = state.free_port()
    log = base_dir() / "logs" / f"forward-{port}.log"
    pid = state.spawn([sys.executable, "-m", "emailqueue_testbed.cluster", "forward", "--listen", str(port),
                       "--netns", record.facts["netns"], "--to", f"{target_host}:{target_port}"], log)
    forwarders = base_dir() / "forwarders"
    forwarders.mkdir(exist_ok=True)
    (forwarders / str(pid)).write_text(f"{port} {target_host}:{target_port}\n")
    state.wait_until(lambda: state.port_open(port), 15, f"forwarder to {target_host}:{target_port}", log=log)
    return port


# --------------------------------------------------------------------------- host side: up / down
def _check_tools() -> None:
    missing = sorted({pkg for path, pkg in DEBIAN_TOOLS.items() if not os.access(path, os.X_OK)})
    if missing:
        raise ClusterError(f"missing Debian packages: {' '.join(missing)} (testbed/install-deps.sh cluster)")
    if os.geteuid() != 0:
        raise ClusterError("the real cluster needs root (namespaces, cgroups, mounts, containers)")


def healthy(record: state.Record | None) -> bool:
    if record is None or not all(state.alive(p) for p in record.pids):
        return False
    try:
        status = json.loads((base_dir() / "status.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(status.get("ready")) and _http_ok(f"{record.facts['server']}/readyz", Path(record.facts["pki"]))


def kubectl(*args: str, check: bool = True, timeout: float = 120, input: str | None = None) -> str:
    record = state.load(COMPONENT)
    if record is None:
        raise ClusterError("the cluster is not up (make cluster-up)")
    result = subprocess.run([str(binary("kubectl")), "--kubeconfig", record.facts["kubeconfig"], *args],
                            capture_output=True, text=True, timeout=timeout, input=input)
    if check and result.returncode:
        raise ClusterError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def up(images: Sequence[Path] = (), timeout: float = 300.0) -> state.Record:
    """Start the cluster (or reuse a healthy one) and wait for a Ready node and DNS."""
    record = state.load(COMPONENT)
    if healthy(record):
        assert record is not None
        import_images(images)
        return record
    down()
    _check_tools()
    try:
        return _start(images, timeout)
    except BaseException:
        down()
        raise


def _start(images: Sequence[Path], timeout: float) -> state.Record:
    base = base_dir()
    started = time.monotonic()
    shutil.rmtree(base / "logs", ignore_errors=True)
    plan = write_config(base, [pause_image(), *images])
    plan_path = base / "plan.json"
    plan_path.write_text(json.dumps(plan, indent=2))
    (base / "status.json").unlink(missing_ok=True)
    make_cgroups()
    logs = base / "logs"
    # unshare makes the namespaces in itself, then forks the sandbox: both are in them.
    pid = state.spawn(["unshare", "--net", "--mount", "--propagation", "private", "--fork", "--",
                       sys.executable, "-m", "emailqueue_testbed.cluster", "sandbox", "--plan", str(plan_path)],
                      logs / "sandbox.log")
    join_cgroups(pid)  # before it forks: everything it starts is in our cgroups
    netns = f"/proc/{pid}/ns/net"
    record = state.Record(COMPONENT, (pid,), {"netns": netns, "pki": plan["pki"]})
    state.save(record)

    def sandbox_ready() -> bool:
        try:
            status = json.loads((base / "status.json").read_text())
        except (OSError, ValueError):
            if not state.alive(pid):
                raise ClusterError(f"the sandbox exited; see {logs / 'sandbox.log'}") from None
            return False
        if not status.get("ready"):
            raise ClusterError(f"cluster start failed: {status.get('error')}")
        return True

    state.wait_until(sandbox_ready, timeout, "the cluster's processes", interval=0.5, log=logs / "sandbox.log")
    port = state.free_port()
    fwd_log = logs / "forward-apiserver.log"
    fwd = state.spawn([sys.executable, "-m", "emailqueue_testbed.cluster", "forward", "--listen", str(port),
                       "--netns", netns, "--to", f"127.0.0.1:{API_PORT}"], fwd_log)
    server = f"https://127.0.0.1:{port}"
    kube_path = state.STATE_DIR / "cluster.kubeconfig"
    kube_path.write_text(kubeconfig(Path(plan["pki"]), "admin", server))
    kube_path.chmod(0o600)
    record = state.Record(COMPONENT, (pid, fwd), {
        "netns": netns, "pki": plan["pki"], "server": server, "kubeconfig": str(kube_path),
        "node": NODE_NAME, "versions": {k: v for k, v in state.versions().items() if k.endswith("_VERSION")}})
    state.save(record)
    state.wait_until(lambda: _http_ok(f"{server}/readyz", Path(plan["pki"])), 60, "the apiserver through the forwarder",
                     log=fwd_log)
    kubectl("apply", "-f", "-", input=json.dumps(_coredns_rbac()))
    kubectl("wait", "--for=condition=Ready", f"node/{NODE_NAME}", f"--timeout={int(timeout)}s", timeout=timeout + 10)

    # Pods can be created once the controller-manager has made the namespace's ServiceAccount
    # (admission refuses a pod whose ServiceAccount does not exist yet): up means usable.
    def default_service_account() -> bool:
        try:
            kubectl("-n", "default", "get", "serviceaccount", "default", timeout=15)
            return True
        except ClusterError:
            return False

    state.wait_until(default_service_account, 60, "the default ServiceAccount", interval=0.5,
                     log=logs / "kube-controller-manager.log")
    record = state.Record(COMPONENT, record.pids, {**record.facts, "up_seconds": round(time.monotonic() - started, 1)})
    state.save(record)
    return record


def import_images(images: Sequence[Path]) -> None:
    """Import docker-archive tarballs into the running cluster's containerd (namespace k8s.io)."""
    record = state.load(COMPONENT)
    if record is None:
        raise ClusterError("the cluster is not up (make cluster-up)")
    sandbox = record.pids[0]
    for image in images:
        # containerd's socket is on the sandbox's own /run: enter its mount namespace to reach it.
        result = subprocess.run(["nsenter", f"--mount=/proc/{sandbox}/ns/mnt", "--", str(binary("ctr")),
                                 "-a", "/run/containerd/containerd.sock", "-n", "k8s.io", "images", "import",
                                 "--no-unpack", str(image)], capture_output=True, text=True, timeout=300)
        if result.returncode:
            raise ClusterError(f"ctr images import {image}: {result.stderr.strip()}")


def _coredns_rbac() -> dict[str, Any]:
    rules = [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
              "verbs": ["list", "watch"]},
             {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]
    return {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "eqtb:coredns"},
         "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "eqtb:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "eqtb:coredns"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "eqtb:coredns"}]}]}


def pause_image() -> Path:
    """The pod sandbox image, built by testbed/build-images.sh pause (Kubernetes' pause.c, static)."""
    path = state.CACHE_DIR / "images" / "pause-3.10.tar"
    if not path.exists():
        script = state.REPO / "testbed" / "build-pause.sh"
        result = subprocess.run([str(script), str(path)], capture_output=True, text=True)
        if result.returncode:
            raise ClusterError(f"{script} failed: {result.stderr.strip()[-2000:]}")
    return path


def _forwarder_pids() -> list[int]:
    folder = base_dir() / "forwarders"
    return [int(p.name) for p in folder.iterdir()] if folder.is_dir() else []


def down(force: bool = False) -> bool:
    """Stop every process of the cluster (pods included) and remove its cgroups and files.

    The cgroup is the machine's one cluster: a cluster this checkout did not start (no record
    here, processes in the cgroup) is left alone unless `force` (a checkout deleted under it)."""
    record = state.load(COMPONENT)
    if record is None and not force and cgroup_pids():
        raise ClusterError(f"a cluster this checkout did not start is running (cgroup {CGROUP} has "
                           f"{len(cgroup_pids())} processes): stop it from its checkout, or "
                           "`python -m emailqueue_testbed.cluster down --force`")
    had = record is not None or any(root.joinpath(CGROUP).exists() for root in controllers())
    for pid in _forwarder_pids():
        state.kill_group(pid)
    if record is not None:
        for pid in record.pids[1:]:  # the apiserver forwarder
            state.kill_group(pid)
        if state.alive(record.pids[0]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pids[0], signal.SIGTERM)
            # The sandbox stops its processes (5 s grace); the pods go with the kill below.
            deadline = time.monotonic() + 8
            while state.alive(record.pids[0]) and time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(record.pids[0], os.WNOHANG)
                time.sleep(0.2)
    for _ in range(100):
        pids = cgroup_pids()
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    if record is not None:
        state.kill_group(record.pids[0])
    failed = remove_cgroups()
    if failed:
        raise ClusterError(f"could not remove cgroups: {', '.join(failed)}")
    base = base_dir()
    if base.exists():
        mounted = _mounts_under(base)
        if mounted:
            raise ClusterError(f"mounts are left under {base}: {', '.join(mounted)}")
        # Keep the PKI (a restart reuses it) and the logs (why it stopped); everything else is
        # state of the stopped cluster.
        for child in base.iterdir():
            if child.name not in ("pki", "logs"):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    (state.STATE_DIR / "cluster.kubeconfig").unlink(missing_ok=True)
    if record is not None:
        record.path.unlink(missing_ok=True)
    return had


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    with open("/proc/self/mountinfo") as mounts:
        return [f.split()[4] for f in mounts if f.split()[4].startswith(prefix)]


def leftovers() -> list[str]:
    """What the cluster left on the machine: processes, cgroups, mounts, namespaces, links,
    host paths. Empty after down()."""
    found = []
    for pid in sorted(cgroup_pids()):
        found.append(f"process {pid} in cgroup {CGROUP}")
    for root in controllers():
        if (root / CGROUP).exists():
            found.append(f"cgroup {root / CGROUP}")
    found += [f"mount {m}" for m in _mounts_under(base_dir())]
    for point in _host_path_mounts() - _PREEXISTING_MOUNTS:
        found.append(f"mount {point}")
    for path in HOST_PATHS:
        if os.path.lexists(path) and path not in _PREEXISTING:
            found.append(f"host path {path}")
    mine = str(base_dir())
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if mine in cmdline or "emailqueue_testbed.cluster" in cmdline:
            found.append(f"process {entry.name}: {cmdline[:120]}")
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    if f" {BRIDGE}:" in links or f" {BRIDGE}@" in links:
        found.append(f"link {BRIDGE} in the host's network namespace")
    return found


def _host_path_mounts() -> set[str]:
    with open("/proc/self/mountinfo") as mounts:
        points = {line.split()[4] for line in mounts}
    return {p for p in points if any(p == h or p.startswith(h + "/") for h in HOST_PATHS)}


# Host paths and mounts that were there before (a machine's own containerd, say), recorded at
# import: never reported.
_PREEXISTING = frozenset(p for p in HOST_PATHS if os.path.lexists(p))
_PREEXISTING_MOUNTS = frozenset(_host_path_mounts())


def status() -> dict[str, Any]:
    record = state.load(COMPONENT)
    return {"up": healthy(record), **(record.facts if record else {})}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emailqueue_testbed.cluster")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the cluster (make cluster-up)")
    p_up.add_argument("--images", nargs="*", default=[], help="docker-archive tarballs to import")
    p_down = sub.add_parser("down", help="stop it and remove what it made (make cluster-down)")
    p_down.add_argument("--force", action="store_true", help="also a cluster another checkout started")
    sub.add_parser("status")
    sub.add_parser("leftovers", help="list what a cluster left on the machine (exit 1 if anything)")
    p_sb = sub.add_parser("sandbox", help="(internal) the processes inside the namespaces")
    p_sb.add_argument("--plan", required=True)
    p_fw = sub.add_parser("forward", help="(internal) host loopback port -> address inside the cluster")
    p_fw.add_argument("--listen", type=int, required=True)
    p_fw.add_argument("--netns", required=True)
    p_fw.add_argument("--to", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "sandbox":
            return sandbox_main(Path(args.plan))
        if args.command == "forward":
            host, port = args.to.rsplit(":", 1)
            asyncio.run(_forward(args.listen, args.netns, (host, int(port))))
            return 0
        if args.command == "up":
            record = up([Path(p) for p in args.images])
            print(f"cluster up in {record.facts['up_seconds']} s: node {NODE_NAME} Ready; "
                  f"KUBECONFIG={record.facts['kubeconfig']}")
        elif args.command == "down":
            print("cluster stopped" if down(force=args.force) else "no cluster was running")
        elif args.command == "status":
            print(json.dumps(status(), indent=2))
        else:
            left = leftovers()
            print("\n".join(left) or "nothing left")
            return 1 if left else 0
    except state.TestbedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


__all__ = ["ClusterError", "up", "down", "forward", "kubectl", "leftovers", "status", "NODE_NAME"]


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
