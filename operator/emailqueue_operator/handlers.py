"""kopf handlers: a watch handler starts one asyncio poll loop per EmailQueue.

A loop (not a timer) because each resource polls at its own `behavior.pollSeconds`, and
our own task (not a kopf daemon) because a daemon makes kopf put a finalizer on every
EmailQueue (see ScaleLoop). The blocking work (pika, the kubernetes client) runs in a
worker thread; the policy state is restored from `status.policy` whenever a loop starts
to lead, so an operator restart or a leader change continues the stabilization windows,
cooldowns and learned rates where they were. Only the elected leader polls (leader.py).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import kopf
from prometheus_client import REGISTRY

from . import kube
from .leader import LEADERSHIP
from .metrics import OperatorMetrics
from .poller import Context, PollResult, poll
from .rabbitmq import BrokerPool
from .scaling import PolicyState

GROUP, VERSION, PLURAL = kube.GROUP, kube.VERSION, kube.PLURAL

TARGETS = kube.WatchedTargets()
CONTEXT = Context(pool=BrokerPool(), secrets=kube.SecretCache(), metrics=OperatorMetrics(REGISTRY),
                  targets=TARGETS, may_scale=LEADERSHIP.may_scale)


# v0.1 ran kopf daemons, which put this finalizer on every EmailQueue. No handler needs
# one now, and kopf removes the configured finalizer from any object it sees carrying it
# while no handler requires it: upgraded clusters lose it at the operator's first event.
LEGACY_FINALIZER = "emailqueue.dev/operator"


# Threads that run the blocking part of polls (pika, the kubernetes client), status
# patches and deletion checks: asyncio's default executor, sized here (its own default
# is min(32, cores + 4)). kopf's `settings.execution.max_workers` is not this: it sizes
# kopf's executor for sync handlers, and the only ones here are the probe and start-up.
# A poll mostly waits on the broker and the apiserver; more threads than this only add
# memory and GIL contention.
POLL_THREADS = int(os.environ.get("EMAILQUEUE_POLL_THREADS", "16"))


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = LEGACY_FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="emailqueue.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="emailqueue.dev")
    settings.posting.level = logging.WARNING  # our own events are posted explicitly
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 30
    # kopf keeps a worker task per EmailQueue that had an event, holding the last raw body,
    # for idle_timeout after it (default 5 s). Every EmailQueue's status is written at least
    # every 30 s and comes back as an event: at 5 s a sixth of them would hold a worker.
    settings.batching.idle_timeout = 0.5
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=POLL_THREADS, thread_name_prefix="poll"))


log = logging.getLogger("emailqueue_operator")


def _post(body: Mapping[str, Any], namespace: str, name: str, result: PollResult) -> None:
    """Post the poll's Kubernetes Events and log them (not through kopf's object
    logger, which would post them a second time). kopf reads only apiVersion, kind and
    metadata of the body, from any mapping (a slimmed one here)."""
    for event in result.events:
        kopf.event(cast(kopf.Body, body), type=event.type, reason=event.reason, message=event.message)
        log.log(logging.WARNING if event.type == "Warning" else logging.INFO, "%s/%s %s: %s", namespace, name,
                event.reason, event.message)


# Status is re-written at least this often even when nothing but the policy's clock
# moved, so a restarted operator finds a recent PolicyState.
STATUS_REFRESH_SECONDS = 30.0


def material(status: dict[str, Any]) -> bytes:
    """A digest of the part of a status patch worth writing: without timestamps that move
    every poll. Idle queues then cost no write (and no watch event back to every kopf
    operator); a 16-byte digest, not the text, is what each loop remembers."""
    trimmed = {k: v for k, v in status.items() if k != "policy"}
    if isinstance(trimmed.get("lastDecision"), dict):
        trimmed["lastDecision"] = {k: v for k, v in trimmed["lastDecision"].items() if k != "at"}
    return hashlib.blake2b(json.dumps(trimmed, sort_keys=True, default=str).encode(), digest_size=16).digest()


def target_key(namespace: str | None, spec: Any) -> tuple[str, str, str]:
    ref = (spec or {}).get("scaleTargetRef") or {}
    return (namespace or "", str(ref.get("kind") or "Deployment"), str(ref.get("name") or ""))


class TargetClaims:
    """Which EmailQueues scale which workload: (namespace, kind, name) → {EmailQueue: created}.

    Every EmailQueue the operator watches has a loop in this process (a follower's too),
    and each loop keeps its own entry current, so the registry is complete without a watch
    or a request; only one process polls (the leader), so one registry decides. (A kopf
    index would do the same, but holds every handler until all objects are indexed.) Used
    only from the event loop's thread.
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


KEPT_METADATA = ("name", "namespace", "uid", "generation", "creationTimestamp", "deletionTimestamp")
KEPT_STATUS = ("policy", "conditions")


def slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """What a loop needs of a watched EmailQueue. The body also carries managedFields and
    kubectl's last-applied copy (kilobytes each) and the rest of the status; a loop holds
    its body between events, so five thousand loops would hold all of that."""
    meta = body.get("metadata") or {}
    kept: dict[str, Any] = {key: meta[key] for key in KEPT_METADATA if key in meta}
    ours = {key: value for key, value in (meta.get("annotations") or {}).items() if key.startswith("emailqueue.dev/")}
    if ours:
        kept["annotations"] = ours
    status = body.get("status") or {}
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": kept,
            "spec": body.get("spec") or {}, "status": {key: status[key] for key in KEPT_STATUS if key in status}}


class ScaleLoop:
    """One EmailQueue's poll loop: an asyncio task of its own, fed the latest body by the watch.

    Not a kopf daemon: kopf puts a finalizer on every object a daemon serves, so an
    EmailQueue could not be deleted while the operator is away (uninstalled first, crashed,
    scaled to zero). Nothing here needs to run before an EmailQueue goes: a deleted one's
    loop only stops polling and drops its claims and metrics, which the watch's DELETED
    event triggers as well as a finalizer would.
    """

    def __init__(self, body: Mapping[str, Any]) -> None:
        self.body = body
        self.seen_at = time.monotonic()
        """When the watch last brought this EmailQueue (see SILENT_SECONDS)."""
        self.stopped = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class ScaleLoops:
    """The running loops by EmailQueue uid, started and stopped from watch events."""

    def __init__(self, run: Callable[[ScaleLoop], Awaitable[None]]) -> None:
        self._run = run
        self._loops: dict[str, ScaleLoop] = {}

    def __len__(self) -> int:
        return len(self._loops)

    def observe(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """Start, refresh or stop the loop of the EmailQueue an event is about (event loop thread)."""
        body = slim(body)
        meta = body["metadata"]
        uid = str(meta.get("uid") or "")
        loop = self._loops.get(uid)
        if event_type == "DELETED" or meta.get("deletionTimestamp"):
            if loop is not None:
                del self._loops[uid]
                loop.stopped.set()
            return
        if loop is not None:
            loop.body, loop.seen_at = body, time.monotonic()
            return
        loop = self._loops[uid] = ScaleLoop(body)
        loop.task = asyncio.get_running_loop().create_task(self._guarded(uid, loop))

    async def _guarded(self, uid: str, loop: ScaleLoop) -> None:
        try:
            await self._run(loop)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: log it; the next watch event of this EmailQueue starts a new loop
            log.exception("scale loop of %s failed", uid)
        finally:
            if self._loops.get(uid) is loop:
                del self._loops[uid]

    async def stop_all(self, timeout: float) -> None:
        """Stop every loop: let them finish their poll for `timeout` seconds, then cancel."""
        loops, self._loops = list(self._loops.values()), {}
        for loop in loops:
            loop.stopped.set()
        tasks = [loop.task for loop in loops if loop.task is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


# The leader rewrites every EmailQueue's status at least every STATUS_REFRESH_SECONDS, and
# each write comes back as a watch event. A loop that has heard nothing for this long may
# serve an EmailQueue deleted while kopf re-listed (a relist reports no deletions): it
# checks with one GET. Without a finalizer nothing else would stop it.
SILENT_SECONDS = 10 * STATUS_REFRESH_SECONDS


def emailqueue_gone(namespace: str, name: str, uid: str) -> bool:
    """Whether the EmailQueue is deleted (or replaced by a namesake). Unknown → False."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = client.CustomObjectsApi(kube.api_client())
    try:
        resp: Any = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, _request_timeout=10,
                                                     _preload_content=False)
        current = json.loads(kube.drain(resp))
    except ApiException as exc:
        return bool(exc.status == 404)
    except Exception:  # unreachable apiserver: keep serving it, ask again later
        return False
    return str((current.get("metadata") or {}).get("uid") or "") != uid


async def scale_loop(loop: ScaleLoop) -> None:
    """Poll the queue and scale the target until the EmailQueue goes away.

    Only the leader polls (see leader.py); a follower's loop waits, its claim on the target
    kept current, and on taking over it restores the policy state from the status the
    previous leader wrote, so stabilization windows and cooldowns carry on.
    """
    meta = loop.body.get("metadata") or {}
    namespace, name, uid = str(meta.get("namespace") or ""), str(meta.get("name") or ""), str(meta.get("uid") or "")
    aio = asyncio.get_running_loop()
    claimed: tuple[str, str, str] | None = None
    leading = False
    state, conditions_now = PolicyState(), []
    next_at = aio.time()
    written: bytes | None = None
    written_at = float("-inf")
    try:
        while not loop.stopped.is_set():
            body = loop.body
            key = target_key(namespace, body.get("spec"))
            if key != claimed:
                CLAIMS.release(claimed, name)
                claimed = key
            claims = CLAIMS.claim(key, name, str((body.get("metadata") or {}).get("creationTimestamp") or ""))
            if not LEADERSHIP.leading():
                if leading:  # a former leader's series would double every sum() on the dashboards
                    CONTEXT.metrics.forget(namespace, name)
                leading = False
                await LEADERSHIP.wait_leading(loop.stopped)
                continue
            if not leading:
                # (Re)starting to lead: the status is the previous leader's memory.
                status = body.get("status") or {}
                state = PolicyState.from_status(status.get("policy"))
                conditions_now = list(status.get("conditions") or [])
                written, written_at, next_at, leading = None, float("-inf"), aio.time(), True
                del status
            # Our own last status, not the watched one: the watch may lag behind our patch.
            snapshot = {"metadata": dict(body.get("metadata") or {}), "spec": dict(body.get("spec") or {}),
                        "status": {"conditions": conditions_now}}
            try:
                result = await asyncio.to_thread(_started_poll, next_at, snapshot, state, claims)
            except Exception as exc:  # a bug past gather's guard: report it, keep the loop alive
                log.exception("%s/%s: poll failed unexpectedly", namespace, name)
                kopf.exception(cast(kopf.Body, body), reason="PollFailed", message=f"{type(exc).__name__}: {exc}")
                await _sleep(loop.stopped, 30)
                next_at = aio.time()
                continue
            state = result.state
            conditions_now = result.status.get("conditions", conditions_now)
            summary = material(result.status)
            if summary != written or aio.time() - written_at >= STATUS_REFRESH_SECONDS:
                try:
                    await asyncio.to_thread(kube.patch_status, namespace, name, result.status)
                    written, written_at = summary, aio.time()
                except Exception as exc:  # status is informative; the next poll writes it again
                    log.warning("%s/%s: status patch failed: %s", namespace, name, exc)
            _post(body, namespace, name, result)
            poll_seconds = result.poll_seconds
            # Not held over the sleep: the status written (decision, policy history, conditions)
            # is kilobytes of dicts, times every EmailQueue. conditions_now and state stay.
            del result, snapshot, body  # (the watch may bring a new body meanwhile)
            if time.monotonic() - loop.seen_at > SILENT_SECONDS:
                if await asyncio.to_thread(emailqueue_gone, namespace, name, uid):
                    log.warning("%s/%s: deleted while the watch was re-listing; polling stops", namespace, name)
                    break
                loop.seen_at = time.monotonic()
            next_at += poll_seconds
            delay = next_at - aio.time()
            if delay < 0:  # we fell behind: do not try to catch up with a burst
                next_at = aio.time()
                delay = 0
            await _sleep(loop.stopped, delay)
    finally:
        CLAIMS.release(claimed, name)
        CONTEXT.metrics.forget(namespace, name)
        CONTEXT.specs.forget(uid)


def _started_poll(scheduled: float, body: Mapping[str, Any], state: PolicyState,
                  claims: list[tuple[str, str]]) -> PollResult:
    """One poll in a worker thread; its lag is measured here, when it starts, not when the
    loop hands it to the executor: with every thread busy, the wait is in the executor's queue."""
    CONTEXT.metrics.poll_lag.observe(max(0.0, time.monotonic() - scheduled))  # loop.time() is monotonic
    return poll(body, state, CONTEXT, claims)


async def _sleep(stopped: asyncio.Event, seconds: float) -> None:
    """Sleep, waking early when the loop is stopped."""
    try:
        await asyncio.wait_for(stopped.wait(), timeout=seconds)
    except TimeoutError:
        pass


LOOPS = ScaleLoops(scale_loop)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def track(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
    """Every watch event of an EmailQueue: start its loop, hand it the new body, or stop it.

    A watching handler needs no finalizer; kopf strips the one v0.1 put on (its name is
    still `settings.persistence.finalizer`) at the first event it sees of such an object.
    """
    raw = event.get("object")  # plain dicts: kopf's Body views would keep the whole event alive
    LOOPS.observe(event.get("type"), raw if isinstance(raw, Mapping) else body)


@kopf.on.cleanup()
async def stop_loops(**_: Any) -> None:
    """Stop polling before the process (and its Lease) goes: no scale after the hand-over."""
    await LOOPS.stop_all(timeout=10.0)
    CONTEXT.pool.close()
    TARGETS.close()


@kopf.on.probe(id="pollers")
def pollers(**_: Any) -> dict[str, Any]:
    return {"brokerConnections": CONTEXT.pool.open_connections(), "emailQueues": len(LOOPS),
            "leading": LEADERSHIP.leading(), "targetWatches": TARGETS.counts(), "time": time.time()}
