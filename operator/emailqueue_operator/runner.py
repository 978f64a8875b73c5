"""Starts the operator process: metrics server, leader election, kopf event loop and scope."""
from __future__ import annotations

import asyncio
import logging

import kopf
from kopf._core.engines import peering
from prometheus_client import start_http_server

from email_worker.logs import JsonFormatter

from .leader import ElectionSettings, Elector, default_identity


class _QuietWatchHandler(logging.Filter):
    """Drops kopf's per-event "Handler 'track' succeeded." lines (one per watch event and
    EmailQueue: a thousand EmailQueues would log dozens a second). Failures still pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.getMessage().startswith("Handler 'track'")


async def _operate(namespaces: list[str], liveness: str | None, election: ElectionSettings | None) -> None:
    elector = None
    if election is not None:
        elector = Elector(election)
        elector.start(asyncio.get_running_loop())
    try:
        # kopf runs standalone: the Lease, not a kopf peering, decides who scales. The identity
        # is given: kopf's own default asks getpass.getuser(), which raises KeyError for a uid
        # with no passwd entry: the image's 65532 (found when the chart first ran as real pods).
        identity = election.identity if election is not None else default_identity()
        await kopf.operator(clusterwide=not namespaces, namespaces=namespaces, standalone=True,
                            liveness_endpoint=liveness, identity=peering.Identity(identity))
    finally:
        if elector is not None:  # after kopf's cleanup stopped the scale loops: then hand over
            # Blocking on purpose: the default executor may still hold polls that outlived
            # their cancellation, and the hand-over must not queue behind them.
            elector.stop()


def configure_logging(log_format: str, verbose: bool) -> None:
    """Levels and format of the operator's logs. `json` is the worker's schema (one for the
    project, `email_worker.logs.JsonFormatter`): time, level, logger, message, structured extras,
    the kopf object reference and, on failures, the traceback."""
    root = logging.getLogger()
    if log_format == "json":
        for handler in root.handlers:
            handler.setFormatter(JsonFormatter())
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # The kubernetes client and kopf are chatty at INFO about every request.
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # probe failures are reported by us, once
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # a line per kubelet probe otherwise
    watch_log = logging.getLogger("kopf.objects")
    if not any(isinstance(f, _QuietWatchHandler) for f in watch_log.filters):
        watch_log.addFilter(_QuietWatchHandler())


def run_operator(namespaces: list[str], metrics_port: int, health_port: int, log_format: str, verbose: bool,
                 election: ElectionSettings | None = None) -> int:
    configure_logging(log_format, verbose)

    from . import handlers  # registers the kopf handlers

    # Cluster-wide: one watch per kind for every namespace, not one per namespace holding EmailQueues.
    handlers.TARGETS.cluster_wide = not namespaces

    if metrics_port:
        start_http_server(metrics_port)
    liveness = f"http://0.0.0.0:{health_port}/healthz" if health_port else None
    asyncio.run(_operate(namespaces, liveness, election))
    return 0
