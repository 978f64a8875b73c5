"""kopf handlers: one async daemon per EmailQueue runs its poll loop.

A daemon (not a timer) because each resource polls at its own `behavior.pollSeconds`.
The blocking work (pika, the kubernetes client) runs in a worker thread; the policy
state is restored from `status.policy` when the daemon starts, so an operator restart
continues the stabilization windows, cooldowns and learned rates where they were.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import kopf
from prometheus_client import REGISTRY

from . import kube
from .metrics import OperatorMetrics
from .poller import Context, PollResult, poll
from .rabbitmq import BrokerPool
from .scaling import PolicyState

GROUP, VERSION, PLURAL = kube.GROUP, kube.VERSION, kube.PLURAL

CONTEXT = Context(pool=BrokerPool(), secrets=kube.SecretCache(), metrics=OperatorMetrics(REGISTRY))


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = "emailqueue.dev/operator"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="emailqueue.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="emailqueue.dev")
    settings.posting.level = logging.WARNING  # our own events are posted explicitly
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 30
    settings.execution.max_workers = 32


@kopf.on.cleanup()
def close_connections(**_: Any) -> None:
    CONTEXT.pool.close()


log = logging.getLogger("emailqueue_operator")


def _post(body: kopf.Body, namespace: str, name: str, result: PollResult) -> None:
    """Post the poll's Kubernetes Events and log them (not through kopf's object
    logger, which would post them a second time)."""
    for event in result.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        log.log(logging.WARNING if event.type == "Warning" else logging.INFO, "%s/%s %s: %s", namespace, name,
                event.reason, event.message)


# Status is re-written at least this often even when nothing but the policy's clock
# moved, so a restarted operator finds a recent PolicyState.
STATUS_REFRESH_SECONDS = 30.0


def material(status: dict[str, Any]) -> str:
    """The part of a status patch worth writing, as a canonical string: without timestamps
    that move every poll. Idle queues then cost no write (and no watch event back to every
    kopf operator); a string keeps a thousand daemons' memory of it small."""
    trimmed = {k: v for k, v in status.items() if k != "policy"}
    if isinstance(trimmed.get("lastDecision"), dict):
        trimmed["lastDecision"] = {k: v for k, v in trimmed["lastDecision"].items() if k != "at"}
    return json.dumps(trimmed, sort_keys=True, default=str)


def target_key(namespace: str | None, spec: Any) -> tuple[str, str, str]:
    ref = (spec or {}).get("scaleTargetRef") or {}
    return (namespace or "", str(ref.get("kind") or "Deployment"), str(ref.get("name") or ""))


class TargetClaims:
    """Which EmailQueues scale which workload: (namespace, kind, name) → {EmailQueue: created}.

    Every EmailQueue the operator watches has a daemon in this process, and each daemon
    keeps its own entry current, so the registry is complete without a watch or a request.
    (A kopf index would do the same, but holds every handler until all objects are
    indexed, which turns start-up into one burst of finalizer patches, one connection
    each.) Used only from the event loop's thread.
    """

    def __init__(self) -> None:
        self._by_target: dict[tuple[str, str, str], dict[str, str]] = {}

    def claim(self, key: tuple[str, str, str], name: str, created: str) -> list[tuple[str, str]]:
        self._by_target.setdefault(key, {})[name] = created
        return sorted((stamp, who) for who, stamp in self._by_target[key].items())

    def release(self, key: tuple[str, str, str] | None, name: str) -> None:
        if key is None:
            return
        holders = self._by_target.get(key, {})
        holders.pop(name, None)
        if not holders:
            self._by_target.pop(key, None)


CLAIMS = TargetClaims()


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10.0)
async def scale_loop(name: str, namespace: str, body: kopf.Body, stopped: kopf.DaemonStopped,
                     logger: kopf.Logger, **_: Any) -> None:
    """Poll the queue and scale the target until the EmailQueue goes away."""
    state = PolicyState.from_status((body.status or {}).get("policy"))
    # The poll needs only the previous conditions (for their transition times).
    conditions_now = list((body.status or {}).get("conditions") or [])
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    written: str | None = None
    written_at = float("-inf")
    claimed: tuple[str, str, str] | None = None
    try:
        while not stopped:
            CONTEXT.metrics.poll_lag.observe(max(0.0, loop.time() - next_at))
            # Our own last status, not the watched one: the watch may lag behind our patch.
            snapshot = {"metadata": dict(body.metadata), "spec": dict(body.spec),
                        "status": {"conditions": conditions_now}}
            key = target_key(namespace, body.spec)
            if key != claimed:
                CLAIMS.release(claimed, name)
                claimed = key
            claims = CLAIMS.claim(key, name, str(body.metadata.get("creationTimestamp") or ""))
            try:
                result = await asyncio.to_thread(poll, snapshot, state, CONTEXT, claims)
            except Exception as exc:  # a bug past gather's guard: report it, keep the loop alive
                logger.exception("poll failed unexpectedly")
                kopf.exception(body, reason="PollFailed", message=f"{type(exc).__name__}: {exc}")
                await stopped.wait(30)
                next_at = loop.time()
                continue
            state = result.state
            conditions_now = result.status.get("conditions", conditions_now)
            summary = material(result.status)
            if summary != written or loop.time() - written_at >= STATUS_REFRESH_SECONDS:
                try:
                    await asyncio.to_thread(kube.patch_status, namespace, name, result.status)
                    written, written_at = summary, loop.time()
                except Exception as exc:  # status is informative; the next poll writes it again
                    logger.warning("status patch failed: %s", exc)
            _post(body, namespace, name, result)
            next_at += result.poll_seconds
            delay = next_at - loop.time()
            if delay < 0:  # we fell behind: do not try to catch up with a burst
                next_at = loop.time()
                delay = 0
            await stopped.wait(delay)
    finally:
        CLAIMS.release(claimed, name)
        CONTEXT.metrics.forget(namespace, name)


@kopf.on.probe(id="pollers")
def pollers(**_: Any) -> dict[str, Any]:
    return {"brokerConnections": CONTEXT.pool.open_connections(), "time": time.time()}
