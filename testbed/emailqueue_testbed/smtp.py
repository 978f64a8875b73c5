"""A recording SMTP server (aiosmtpd) with fault injection, and its client.

Run as its own process (`python -m emailqueue_testbed.smtp`): it keeps every
message it accepts and serves a small JSON control API over HTTP so tests and
benchmarks in other processes can read messages and inject faults:

    GET  /messages        every recorded message (mail_from, rcpt_tos, data, message_id)
    GET  /count           {"count": N}
    GET  /receipts?since=K  [[message_id, received_at], ...] of messages K, K+1, ... (incremental reads
                          for long runs: 100,000 messages are not fetched again every second)
    POST /clear           forget messages, faults and delay
    POST /faults/clear    end every fault (messages are kept)
    POST /fault           {"code": 451, "message": "...", "count": N, "seconds": S, "recipients": [...]}
    POST /delay           {"seconds": S}   (delay before answering DATA)
"""
from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import json
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller


@dataclass
class Fault:
    code: int
    message: str
    remaining: int | None          # answers left; None = no count limit
    until: float | None            # monotonic deadline; None = no time limit
    recipients: frozenset[str] | None

    def applies(self, rcpt_tos: list[str]) -> bool:
        if self.until is not None and time.monotonic() > self.until:
            return False
        if self.remaining is not None and self.remaining <= 0:
            return False
        return self.recipients is None or any(r.lower() in self.recipients for r in rcpt_tos)


@dataclass
class Recorder:
    """Shared state between the SMTP handler (asyncio thread) and the control API."""

    record_bodies: bool = True
    messages: list[dict[str, Any]] = field(default_factory=list)
    count: int = 0
    faults: list[Fault] = field(default_factory=list)
    delay: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fault_for(self, rcpt_tos: list[str]) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.applies(rcpt_tos):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    return fault
        return None

    async def handle_DATA(self, server, session, envelope) -> str:  # aiosmtpd hook
        if self.delay:
            await asyncio.sleep(self.delay)
        fault = self.fault_for(list(envelope.rcpt_tos))
        if fault:
            return f"{fault.code} {fault.message}"
        raw = envelope.original_content or envelope.content
        data = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        parsed = email.message_from_string(data, policy=email.policy.default)
        with self.lock:
            self.count += 1
            self.messages.append({
                "mail_from": envelope.mail_from,
                "rcpt_tos": list(envelope.rcpt_tos),
                "message_id": str(parsed.get("Message-ID", "")),
                "subject": str(parsed.get("Subject", "")),
                "data": data if self.record_bodies else "",
                "received_at": time.time(),
            })
        return "250 Message accepted for delivery"


def _control_handler(recorder: Recorder):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _reply(self, payload: Any, status: int = 200) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            with recorder.lock:
                if url.path == "/receipts":
                    since = int((urllib.parse.parse_qs(url.query).get("since") or ["0"])[0])
                    return self._reply([[m["message_id"], m["received_at"]] for m in recorder.messages[since:]])
                if self.path == "/messages":
                    return self._reply(list(recorder.messages))
                if self.path == "/count":
                    return self._reply({"count": recorder.count})
            self._reply({"error": "not found"}, 404)

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            with recorder.lock:
                if self.path == "/clear":
                    recorder.messages.clear()
                    recorder.count = 0
                    recorder.faults.clear()
                    recorder.delay = 0.0
                elif self.path == "/faults/clear":
                    recorder.faults.clear()
                elif self.path == "/fault":
                    recipients = body.get("recipients")
                    recorder.faults.append(Fault(
                        code=int(body["code"]), message=body.get("message", "injected fault"),
                        remaining=body.get("count"),
                        until=time.monotonic() + body["seconds"] if body.get("seconds") else None,
                        recipients=frozenset(r.lower() for r in recipients) if recipients else None))
                elif self.path == "/delay":
                    recorder.delay = float(body.get("seconds", 0))
                else:
                    return self._reply({"error": "not found"}, 404)
            self._reply({"ok": True})

    return Handler


def serve(host: str, port: int, control_port: int, record_bodies: bool = True) -> None:
    recorder = Recorder(record_bodies=record_bodies)
    controller = Controller(recorder, hostname=host, port=port, data_size_limit=64 * 1024 * 1024)
    controller.start()
    httpd = ThreadingHTTPServer((host, control_port), _control_handler(recorder))
    print(f"smtp listening on {host}:{port}, control on {host}:{control_port}", flush=True)
    try:
        httpd.serve_forever()
    finally:
        controller.stop()


class SmtpControl:
    """Client for the recording server's control API (used by tests and benchmarks)."""

    def __init__(self, host: str, port: int, control_port: int) -> None:
        self.host, self.port, self.control_port = host, port, control_port

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{self.host}:{self.control_port}{path}", data=data, method=method,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def messages(self) -> list[dict[str, Any]]:
        return self._call("GET", "/messages")

    def count(self) -> int:
        return self._call("GET", "/count")["count"]

    def receipts(self, since: int = 0) -> list[tuple[str, float]]:
        """(Message-ID, received_at) of the messages recorded after the first `since`, in order."""
        return [(str(m), float(t)) for m, t in self._call("GET", f"/receipts?since={int(since)}")]

    def clear(self) -> None:
        self._call("POST", "/clear", {})

    def set_fault(self, code: int, message: str = "injected fault", count: int | None = None,
                  seconds: float | None = None, recipients: list[str] | None = None) -> None:
        self._call("POST", "/fault", {"code": code, "message": message, "count": count, "seconds": seconds,
                                      "recipients": recipients})

    def clear_faults(self) -> None:
        """End every injected fault; recorded messages stay."""
        self._call("POST", "/faults/clear", {})

    def set_delay(self, seconds: float) -> None:
        self._call("POST", "/delay", {"seconds": seconds})

    def wait_for(self, n: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until at least n messages are recorded; returns them (raises TimeoutError)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.count() >= n:
                return self.messages()
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.count()} of {n} messages arrived within {timeout:.0f}s")
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--no-bodies", action="store_true", help="count messages but keep no bodies (benchmarks)")
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.control_port, record_bodies=not args.no_bodies)


if __name__ == "__main__":
    main()
