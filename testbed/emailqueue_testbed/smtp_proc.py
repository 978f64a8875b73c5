"""Starts and stops the recording SMTP server as a test bed component."""
from __future__ import annotations

import sys

from . import state
from .smtp import SmtpControl

COMPONENT = "smtp"


def control(record: state.Record) -> SmtpControl:
    return SmtpControl("127.0.0.1", record.facts["port"], record.facts["control_port"])


def healthy(record: state.Record | None) -> bool:
    if record is None or not all(state.alive(p) for p in record.pids):
        return False
    try:
        control(record).count()
        return state.port_open(record.facts["port"])
    except OSError:
        return False


def up(timeout: float = 30.0) -> state.Record:
    record = state.load(COMPONENT)
    if healthy(record):
        return record
    state.stop(COMPONENT)
    port, control_port = state.free_port(), state.free_port()
    pid = state.spawn([sys.executable, "-m", "emailqueue_testbed.smtp", "--port", str(port),
                       "--control-port", str(control_port)], state.STATE_DIR / "logs" / "smtp.log")
    record = state.Record(COMPONENT, (pid,), {"port": port, "control_port": control_port})
    state.save(record)
    state.wait_until(lambda: healthy(record), timeout, "recording SMTP server",
                     log=state.STATE_DIR / "logs" / "smtp.log")
    return record


def down() -> bool:
    return state.stop(COMPONENT)

