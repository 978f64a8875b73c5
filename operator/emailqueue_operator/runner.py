"""Starts the operator process: metrics server, kopf event loop, scope and peering."""
from __future__ import annotations

import asyncio
import json
import logging

import kopf
from prometheus_client import start_http_server


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                           "message": record.getMessage()})


def run_operator(namespaces: list[str], metrics_port: int, health_port: int, peering: str | None,
                 log_format: str, verbose: bool) -> int:
    if log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(_JsonFormatter())
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.INFO)
    # The kubernetes client and kopf are chatty at INFO about every request.
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # probe failures are reported by us, once

    from . import handlers  # noqa: F401  (registers the kopf handlers)

    if metrics_port:
        start_http_server(metrics_port)
    liveness = f"http://0.0.0.0:{health_port}/healthz" if health_port else None
    asyncio.run(kopf.operator(
        clusterwide=not namespaces, namespaces=namespaces,
        standalone=peering is None, peering_name=peering,
        liveness_endpoint=liveness,
    ))
    return 0
