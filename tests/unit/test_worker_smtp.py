"""SMTP sending: connections are reused, broken ones replaced, failures surface as exceptions.

Uses a throwaway in-process aiosmtpd server on a free port (local loopback only).
"""
from __future__ import annotations

import shutil
import smtplib
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from email_worker.message import parse_message
from email_worker.routing import SmtpSessionError, classify_failure
from email_worker.smtp import SmtpConfig, SmtpSender


@dataclass
class Handler:
    replies: list[str] = field(default_factory=list)   # queued non-250 answers for DATA
    received: list[Any] = field(default_factory=list)
    sessions: set[int] = field(default_factory=set)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.sessions.add(id(session))
        if self.replies:
            return self.replies.pop(0)
        self.received.append(envelope)
        return "250 OK"


@pytest.fixture
def server() -> Iterator[tuple[Controller, Handler]]:
    handler = Handler()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    yield controller, handler
    controller.stop()


def job(n: int) -> Any:
    raw = f'{{"id": "j{n}", "to": "u{n}@example.com", "bcc": "b@example.com", "from": "a@example.com", ' \
          f'"subject": "s", "text": "t"}}'
    return parse_message(raw.encode(), None)


def sender_for(controller: Controller, connects: list[int]) -> SmtpSender:
    return SmtpSender(SmtpConfig(host="127.0.0.1", port=controller.port, timeout=5, message_id_domain="d.example"),
                      on_connect=lambda: connects.append(1))


def test_one_connection_carries_many_messages(server: tuple[Controller, Handler]) -> None:
    controller, handler = server
    connects: list[int] = []
    sender = sender_for(controller, connects)
    for n in range(5):
        sender.send(job(n))
    sender.close()
    assert len(handler.received) == 5 and len(handler.sessions) == 1 and len(connects) == 1
    assert handler.received[0].rcpt_tos == ["u0@example.com", "b@example.com"]
    assert b"Message-ID: <j0@d.example>" in handler.received[0].original_content


def test_a_connection_the_server_dropped_is_replaced_transparently(server: tuple[Controller, Handler]) -> None:
    controller, handler = server
    connects: list[int] = []
    sender = sender_for(controller, connects)
    sender.send(job(1))
    sender._smtp.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]  # like a server idle timeout
    sender.send(job(2))
    assert [e.rcpt_tos[0] for e in handler.received] == ["u1@example.com", "u2@example.com"]
    assert len(connects) == 2


def test_4xx_and_5xx_replies_raise_and_the_connection_stays_usable(server: tuple[Controller, Handler]) -> None:
    controller, handler = server
    handler.replies = ["451 4.3.0 try later", "550 5.1.1 no such user"]
    connects: list[int] = []
    sender = sender_for(controller, connects)
    with pytest.raises(smtplib.SMTPDataError) as first:
        sender.send(job(1))
    with pytest.raises(smtplib.SMTPDataError) as second:
        sender.send(job(2))
    sender.send(job(3))
    assert classify_failure(first.value).failure_class == "temporary"
    assert classify_failure(second.value).failure_class == "permanent"
    assert len(handler.received) == 1 and len(connects) == 1


def test_unreachable_server_raises_and_backs_off() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sender = SmtpSender(SmtpConfig(host="127.0.0.1", port=port, timeout=2), backoff_initial=5, backoff_max=60)
    assert sender.ready_in() == 0
    with pytest.raises(SmtpSessionError) as caught:
        sender.send(job(1))
    assert isinstance(caught.value.cause, ConnectionRefusedError) and caught.value.stage == "connect"
    assert classify_failure(caught.value).failure_class == "sender"  # the circuit, never the dead queue
    assert 4 < sender.ready_in() <= 5  # the sender thread waits this long before the next job


def test_starttls_required_but_not_offered_is_an_error_not_a_plaintext_fallback(
        server: tuple[Controller, Handler]) -> None:
    controller, handler = server
    sender = SmtpSender(SmtpConfig(host="127.0.0.1", port=controller.port, tls="starttls", timeout=5))
    with pytest.raises(SmtpSessionError) as caught:
        sender.send(job(1))
    assert isinstance(caught.value.cause, smtplib.SMTPNotSupportedError) and caught.value.stage == "STARTTLS"
    assert handler.received == []


def test_config_repr_hides_the_password() -> None:
    assert "hunter2" not in repr(SmtpConfig(username="u", password="hunter2"))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


def _authenticator(users: dict[str, str]) -> Any:
    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and users.get(auth_data.login.decode()) == auth_data.password.decode()
        return AuthResult(success=ok, handled=False)
    return authenticate


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_starttls_with_auth_delivers_and_verifies_the_certificate(certificate: tuple[str, str]) -> None:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    handler = Handler()
    controller = Controller(handler, hostname="127.0.0.1", port=_free_port(), tls_context=context,
                            require_starttls=True, auth_required=True,
                            authenticator=_authenticator({"mailer": "p@ss:w/rd"}))
    controller.start()
    try:
        good = SmtpConfig(host="127.0.0.1", port=controller.port, tls="starttls", ca_file=cert, timeout=5,
                          username="mailer", password="p@ss:w/rd")
        SmtpSender(good).send(job(1))
        assert len(handler.received) == 1

        with pytest.raises(SmtpSessionError) as wrong_password:
            SmtpSender(SmtpConfig(**{**good.__dict__, "password": "nope"})).send(job(2))
        assert isinstance(wrong_password.value.cause, smtplib.SMTPAuthenticationError)
        # Our credentials being wrong must not dead-letter customer mail.
        assert classify_failure(wrong_password.value).failure_class == "sender"

        with pytest.raises(SmtpSessionError) as bad_ca:  # unknown CA: verification is on by default
            SmtpSender(SmtpConfig(**{**good.__dict__, "ca_file": None})).send(job(3))
        assert isinstance(bad_ca.value.cause, ssl.SSLError)
        assert classify_failure(bad_ca.value).failure_class == "sender"
        assert len(handler.received) == 1
    finally:
        controller.stop()


def test_implicit_tls(certificate: tuple[str, str]) -> None:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    handler = Handler()
    controller = Controller(handler, hostname="127.0.0.1", port=_free_port(), ssl_context=context)
    controller.start()
    try:
        SmtpSender(SmtpConfig(host="127.0.0.1", port=controller.port, tls="tls", ca_file=cert, timeout=5)).send(job(1))
        assert len(handler.received) == 1
    finally:
        controller.stop()


def test_partially_refused_recipients_are_reported_not_raised(server: tuple[Controller, Handler]) -> None:
    controller, handler = server

    async def handle_RCPT(server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any) -> str:
        if address.startswith("b@"):
            return "450 4.2.1 mailbox busy"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    handler.handle_RCPT = handle_RCPT  # type: ignore[attr-defined]
    raw = '{"id": "p1", "to": ["a@example.com", "b@example.com"], "from": "x@example.com", "text": "t"}'
    sender = SmtpSender(SmtpConfig(host="127.0.0.1", port=controller.port, timeout=5))
    try:
        refused = sender.send(parse_message(raw.encode(), None))
    finally:
        sender.close()  # an open session holds the server's stop() for its whole timeout
    assert refused == {"b@example.com": (450, "4.2.1 mailbox busy")}
    assert handler.received[0].rcpt_tos == ["a@example.com"]
