"""Helpers for tests that drive the operator on the test bed: manifests and waiting."""
from __future__ import annotations

import contextlib
import http.server
import json
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import yaml


def worker_deployment(name: str, replicas: int = 0) -> str:
    return yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "worker", "image": "example.invalid/email-worker:0"}]}}},
    })


def amqp_secret(name: str, uri: str) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                           "stringData": {"uri": uri}})


def emailqueue(name: str, spec: dict[str, Any]) -> str:
    return yaml.safe_dump({"apiVersion": "emailqueue.dev/v1alpha1", "kind": "EmailQueue",
                           "metadata": {"name": name}, "spec": spec})


def get_json(kube_env, namespace: str, *what: str) -> dict[str, Any]:
    return json.loads(kube_env.kubectl("-n", namespace, "get", *what, "-o", "json").stdout)


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def publish_steadily(url: str, queue: str, rate: float, seconds: float, stop: threading.Event | None = None) -> int:
    """Publish `rate` persistent messages per second for `seconds` (or until `stop` is set)."""
    sent = 0
    with pika.BlockingConnection(pika.URLParameters(url)) as conn:
        ch = conn.channel()
        started = time.monotonic()
        while (stop is None or not stop.is_set()) and time.monotonic() - started < seconds:
            due = int((time.monotonic() - started) * rate)
            while sent < due:
                ch.basic_publish("", queue, b"{}", pika.BasicProperties(delivery_mode=2))
                sent += 1
            conn.sleep(0.05)
    return sent


@contextlib.contextmanager
def https_server(folder: Path, content_type: str, body: Callable[[str], bytes]) -> Iterator[tuple[str, str]]:
    """A loopback HTTPS server with a self-signed certificate for rabbit.internal answering
    every GET with `body(path)`; yields (url, ca_pem)."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=rabbit.internal", "-addext", "subjectAltName=DNS:rabbit.internal"],
                   check=True, capture_output=True)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's name
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.end_headers()
            self.wfile.write(body(self.path))

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_port}", cert.read_text()
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def smtp_relay(handler: Any) -> Iterator[int]:
    """An aiosmtpd server on a free loopback port with `handler` (its hooks decide the answers);
    yields the port, stops the server afterwards."""
    from aiosmtpd.controller import Controller

    from emailqueue_testbed import state

    port = state.free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


def message_id_of(content: bytes) -> str:
    """The Message-ID header of raw SMTP DATA ('' when absent)."""
    for line in content.split(b"\r\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip().decode()
    return ""

