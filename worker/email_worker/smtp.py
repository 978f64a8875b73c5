"""SMTP delivery over one reused connection per sender thread.

`SmtpSender.send(job)` returns only after the server's 250 for the DATA; any failure is
raised as the smtplib/socket exception so `routing.route_failure` can classify it. A
failure while opening the session (connect, greeting, EHLO, STARTTLS, AUTH) is raised as
`routing.SmtpSessionError` wrapping it: it is about our side, never about the email. The
connection is opened lazily, kept across messages, re-opened with backoff when it breaks,
and a send that fails because an idle, reused connection had been closed by the server is
retried once on a fresh connection (that failure says nothing about the message).
"""
from __future__ import annotations

import smtplib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import Message
from typing import Literal

from email_worker.backoff import Backoff
from email_worker.message import EmailJob, build_email
from email_worker.routing import SmtpSessionError

TlsMode = Literal["none", "starttls", "tls"]


@dataclass(frozen=True)
class SmtpConfig:
    host: str = "127.0.0.1"
    port: int = 25
    tls: TlsMode = "none"
    """none: plain; starttls: upgrade after EHLO (fails if not offered); tls: implicit TLS (465)."""
    username: str | None = None
    password: str | None = None
    timeout: float = 30.0
    """Socket timeout per SMTP command, seconds."""
    verify_tls: bool = True
    ca_file: str | None = None
    local_hostname: str | None = None
    """Name sent in EHLO; None = this host's FQDN."""
    message_id_domain: str = "emailqueue.local"
    """Right-hand side of Message-ID: <{job id}@{domain}>."""

    def __repr__(self) -> str:  # never leak the password through a debug print
        return (f"SmtpConfig(host={self.host!r}, port={self.port}, tls={self.tls!r}, "
                f"username={self.username!r}, password={'***' if self.password else None})")


class SmtpSender:
    """Not thread-safe: one per sender thread (each keeps its own connection)."""

    def __init__(self, config: SmtpConfig, on_connect: Callable[[], None] | None = None,
                 backoff_initial: float = 0.5, backoff_max: float = 30.0) -> None:
        self.config = config
        self._smtp: smtplib.SMTP | None = None
        self._on_connect = on_connect
        self._connect_backoff = Backoff(base=backoff_initial, cap=backoff_max)

    def ready_in(self) -> float:
        """Seconds until the next connection attempt is allowed (0 when connected or no backoff).

        The sender thread waits this long before taking the next job, so an SMTP outage does
        not spin every queued job through the retry tiers at full speed.
        """
        if self._smtp is not None:
            return 0.0
        return self._connect_backoff.remaining()

    def send(self, job: EmailJob) -> dict[str, tuple[int, str]]:
        """Deliver the job; raise on anything but a 250 for the transaction.

        Returns the recipients the server refused while accepting the others
        ({address: (code, reply)}), usually empty; those did not get the email.
        """
        message = build_email(job, message_id_domain=self.config.message_id_domain,
                              date=datetime.now(UTC))
        reused = self._smtp is not None
        try:
            return self._transaction(job, message)
        except smtplib.SMTPServerDisconnected:
            self.close()
            if not reused:
                raise
            # The server dropped an idle connection; the message was never accepted.
            return self._transaction(job, message)

    def _transaction(self, job: EmailJob, message: Message) -> dict[str, tuple[int, str]]:
        smtp = self._connection()
        try:
            refused = smtp.send_message(message, from_addr=job.envelope_sender,
                                        to_addrs=list(job.envelope_recipients))
        except smtplib.SMTPServerDisconnected:
            self.close()
            raise
        except smtplib.SMTPException:  # before OSError: SMTPException subclasses it
            # A reply error: smtplib already sent RSET; make sure the session is clean and keep it.
            self._reset_or_close()
            raise
        except OSError:
            self.close()
            raise
        return {address: (code, reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply))
                for address, (code, reply) in refused.items()}

    def _connection(self) -> smtplib.SMTP:
        if self._smtp is None:
            try:
                self._smtp = self._connect()
            except BaseException:
                self._connect_backoff.failed()
                raise
            self._connect_backoff.succeeded()
        return self._smtp

    def _connect(self) -> smtplib.SMTP:
        cfg = self.config
        stage = "connect"
        try:
            context = self._tls_context() if cfg.tls != "none" else None
            smtp: smtplib.SMTP
            if cfg.tls == "tls":
                smtp = smtplib.SMTP_SSL(cfg.host, cfg.port, local_hostname=cfg.local_hostname, timeout=cfg.timeout,
                                        context=context)
            else:
                smtp = smtplib.SMTP(cfg.host, cfg.port, local_hostname=cfg.local_hostname, timeout=cfg.timeout)
        except Exception as exc:
            raise SmtpSessionError(stage, exc) from exc
        try:
            stage = "EHLO"
            smtp.ehlo()
            if cfg.tls == "starttls":
                # starttls() raises SMTPNotSupportedError when not offered: never fall back to plain.
                stage = "STARTTLS"
                smtp.starttls(context=context)
                smtp.ehlo()
            if cfg.username:
                stage = "AUTH"
                smtp.login(cfg.username, cfg.password or "")
        except Exception as exc:
            _quietly_close(smtp)
            raise SmtpSessionError(stage, exc) from exc
        except BaseException:
            _quietly_close(smtp)
            raise
        if self._on_connect is not None:
            self._on_connect()
        return smtp

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.config.ca_file)
        if not self.config.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _reset_or_close(self) -> None:
        if self._smtp is None:
            return
        try:
            self._smtp.rset()
        except (smtplib.SMTPException, OSError):
            self.close()

    def check(self) -> None:
        """Open (or NOOP) the connection; raises if SMTP is unreachable. Used at start-up."""
        smtp = self._connection()
        try:
            smtp.noop()
        except (smtplib.SMTPException, OSError):
            self.close()
            raise

    def close(self) -> None:
        if self._smtp is not None:
            smtp, self._smtp = self._smtp, None
            try:
                smtp.quit()
            except (smtplib.SMTPException, OSError):
                _quietly_close(smtp)


def _quietly_close(smtp: smtplib.SMTP) -> None:
    try:
        smtp.close()
    except OSError:
        pass
