"""Leader election on a coordination.k8s.io/v1 Lease: one operator replica scales, the others wait.

The protocol is client-go's (what KEDA and every controller-runtime operator run with
``--leader-elect``): the holder renews the Lease every ``retry_seconds``; a follower takes
it over only after it has seen the same Lease record, unchanged, for ``lease_seconds`` on
its *own* clock (so clock skew between nodes does not matter); every write carries the
resourceVersion it read, so two candidates never both win. The holder stops scaling when
it could not renew for ``renew_deadline_seconds`` (< ``lease_seconds``): it has given up
before anyone may take over, and the difference is the margin for a poll already under way.

Why not kopf peering: a peering freezes the whole operator (watching too) and needs the
KopfPeering CRDs and a distinct priority per replica; its default lifetime is 60 s. A Lease
gates exactly the scale loops, and the takeover takes one lease plus one retry period.

The election runs in a thread of its own, not on asyncio's default executor: a thousand
polls blocked on a slow broker must not delay the renewal and cost the leadership.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Gauge

log = logging.getLogger("emailqueue_operator.leader")

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass(frozen=True)
class ElectionSettings:
    """How this replica takes part in the election (flags of `emailqueue-operator run`)."""

    identity: str
    """This replica's name in the Lease's holderIdentity (unique per process)."""
    namespace: str
    """Namespace of the Lease (the operator's own)."""
    lease_name: str = "emailqueue-operator"
    """Name of the Lease; replicas sharing it elect one leader."""
    lease_seconds: float = 15.0
    """A leader not heard of for this long is replaced (Lease leaseDurationSeconds)."""
    renew_deadline_seconds: float = 10.0
    """A leader that could not renew for this long stops scaling; must be below lease_seconds."""
    retry_seconds: float = 2.0
    """How often the leader renews and a follower looks at the Lease."""

    def __post_init__(self) -> None:
        if not 0 < self.retry_seconds < self.renew_deadline_seconds < self.lease_seconds:
            raise ValueError("leader election needs 0 < retry period < renew deadline < lease duration "
                             f"(got {self.retry_seconds} < {self.renew_deadline_seconds} < {self.lease_seconds})")


def default_identity() -> str:
    """The pod's name (POD_NAME from the downward API, else the host name) and a random suffix,
    so a restarted container never mistakes its predecessor's Lease for its own."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def default_namespace() -> str:
    """POD_NAMESPACE, else the in-cluster service account's namespace, else `default`."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as handle:
            return handle.read().strip() or "default"
    except OSError:
        return "default"


# --- the Lease record and the pure decision ---------------------------------------------------

@dataclass(frozen=True)
class LeaseRecord:
    """The fields of a Lease the election reads and writes."""

    holder: str | None
    lease_seconds: int
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0
    resource_version: str | None = None
    """None: not stored yet (create it)."""

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> LeaseRecord:
        spec = obj.get("spec") or {}
        return cls(holder=spec.get("holderIdentity") or None, lease_seconds=int(spec.get("leaseDurationSeconds") or 0),
                   acquire_time=spec.get("acquireTime"), renew_time=spec.get("renewTime"),
                   transitions=int(spec.get("leaseTransitions") or 0),
                   resource_version=(obj.get("metadata") or {}).get("resourceVersion"))

    def spec(self) -> dict[str, Any]:
        return {"holderIdentity": self.holder, "leaseDurationSeconds": self.lease_seconds,
                "acquireTime": self.acquire_time, "renewTime": self.renew_time, "leaseTransitions": self.transitions}


def micro_time(epoch: float) -> str:
    """A Kubernetes MicroTime (RFC 3339 with microseconds)."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Election:
    """The election's memory and decisions, without I/O or a clock of its own.

    ``now`` is a monotonic time, ``wall`` the epoch time written into the Lease (informative:
    nobody's decision depends on another node's clock).
    """

    def __init__(self, settings: ElectionSettings) -> None:
        self.settings = settings
        self.observed: LeaseRecord | None = None
        self.observed_at = float("-inf")
        self.leading_until = float("-inf")

    def leading(self, now: float) -> bool:
        return now < self.leading_until

    @property
    def poll_guard(self) -> float:
        """Seconds of leadership a poll must have ahead of it to start: a leader that missed two
        renewals in a row starts no more polls, so a poll under way has this much more time,
        beyond lease - renew deadline, before anyone may take over."""
        return max(0.0, self.settings.renew_deadline_seconds - 2 * self.settings.retry_seconds)

    def may_poll(self, now: float) -> bool:
        return now + self.poll_guard < self.leading_until

    def next_record(self, current: LeaseRecord | None, now: float, wall: float) -> LeaseRecord | None:
        """What to write after reading `current` (None: no Lease yet), or None to wait."""
        me, stamp = self.settings.identity, micro_time(wall)
        lease = max(1, round(self.settings.lease_seconds))
        if current is None:
            return LeaseRecord(me, lease, stamp, stamp, 0, None)
        if self.observed is None or current.resource_version != self.observed.resource_version:
            self.observed, self.observed_at = current, now
        if current.holder == me:
            return replace(current, lease_seconds=lease, renew_time=stamp)
        expired = now - self.observed_at >= (current.lease_seconds or self.settings.lease_seconds)
        if current.holder is None or expired:
            return LeaseRecord(me, lease, stamp, stamp, current.transitions + 1, current.resource_version)
        self.leading_until = float("-inf")  # someone else holds a live Lease
        return None

    def written(self, record: LeaseRecord, started: float) -> None:
        """Our write (sent at `started`) went through: we lead until the renew deadline."""
        self.observed, self.observed_at = record, started
        self.leading_until = started + self.settings.renew_deadline_seconds

    def lost_race(self) -> None:
        """The Lease changed under our write (409): someone else wrote first."""
        self.leading_until = float("-inf")

    def released(self, record: LeaseRecord, wall: float) -> LeaseRecord:
        """The record that hands the Lease over at once (on shutdown): no holder, 1 s lease."""
        self.leading_until = float("-inf")
        return replace(record, holder=None, lease_seconds=1, renew_time=micro_time(wall))


# --- I/O: the Lease through the kubernetes client ------------------------------------------

class Conflict(Exception):
    """The Lease was written by someone else since we read it."""


class LeaseStore(Protocol):
    def read(self) -> LeaseRecord | None: ...

    def write(self, record: LeaseRecord) -> LeaseRecord: ...


class KubeLeaseStore:
    """The Lease object through its own ApiClient (own connection pool: renewals never wait
    for a free connection behind a thousand polls)."""

    def __init__(self, namespace: str, name: str, timeout: float) -> None:
        from kubernetes import client

        from . import kube

        kube.api_client()  # loads the in-cluster config or the kubeconfig into the default Configuration
        # Raw calls: with `_preload_content=False` the client returns the urllib3 response (the JSON is
        # parsed here, not into client models), and bodies are plain dicts it serialises as they are.
        # The generated annotations (V1Lease in, V1Lease out) describe neither, hence Any.
        self._api: Any = client.CoordinationV1Api(client.ApiClient())
        self._exception = client.exceptions.ApiException
        self.namespace, self.name, self.timeout = namespace, name, timeout

    def read(self) -> LeaseRecord | None:
        try:
            resp = self._api.read_namespaced_lease(self.name, self.namespace, _request_timeout=self.timeout,
                                                   _preload_content=False)
        except self._exception as exc:
            if exc.status == 404:
                return None
            raise
        return LeaseRecord.from_object(json.loads(resp.data))

    def write(self, record: LeaseRecord) -> LeaseRecord:
        body: dict[str, Any] = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                "metadata": {"name": self.name, "namespace": self.namespace,
                                             "labels": {"app.kubernetes.io/name": "emailqueue-operator"}},
                                "spec": record.spec()}
        try:
            if record.resource_version is None:
                resp = self._api.create_namespaced_lease(self.namespace, body, _request_timeout=self.timeout,
                                                         _preload_content=False)
            else:
                body["metadata"]["resourceVersion"] = record.resource_version
                resp = self._api.replace_namespaced_lease(self.name, self.namespace, body,
                                                          _request_timeout=self.timeout, _preload_content=False)
        except self._exception as exc:
            if exc.status == 409:
                raise Conflict() from None
            raise
        return LeaseRecord.from_object(json.loads(resp.data))


# --- the gate the scale loops wait on ---------------------------------------------------------

class Leadership:
    """May this process scale now? Always yes until an election is attached (standalone).

    Read from any thread (``leading()``); scale loops wait on ``wait_leading()``.
    """

    def __init__(self) -> None:
        self._election: Election | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._acquired: asyncio.Event | None = None
        self._clock: Callable[[], float] = time.monotonic

    def attach(self, election: Election, loop: asyncio.AbstractEventLoop,
               clock: Callable[[], float] = time.monotonic) -> None:
        self._election, self._loop, self._clock = election, loop, clock
        self._acquired = asyncio.Event()

    def detach(self) -> None:
        self._election = self._loop = self._acquired = None

    @property
    def elected(self) -> bool:
        """Whether an election decides (False: standalone, always leading)."""
        return self._election is not None

    def leading(self) -> bool:
        """Whether a scale loop may start a poll now (Election.may_poll)."""
        election = self._election
        return election is None or election.may_poll(self._clock())

    def may_scale(self) -> bool:
        """True until the renew deadline of a leader that cannot renew (a follower may take the
        Lease only after the lease duration): checked right before each /scale patch."""
        election = self._election
        return election is None or election.leading(self._clock())

    def notify(self) -> None:
        """Called by the election thread after every round: wakes the waiting loops on a gain."""
        loop, acquired = self._loop, self._acquired
        if loop is None or acquired is None:
            return
        setter = acquired.set if self.leading() else acquired.clear
        try:
            loop.call_soon_threadsafe(setter)
        except RuntimeError:  # the loop is closed: the operator is shutting down
            pass

    async def wait_leading(self, stopped: asyncio.Event) -> None:
        """Return when this process leads or `stopped` is set."""
        acquired = self._acquired
        if acquired is None or self.leading():
            return
        waiters = [asyncio.ensure_future(acquired.wait()), asyncio.ensure_future(stopped.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()


LEADERSHIP = Leadership()


class Elector:
    """Runs the election rounds in a thread until stopped, then hands the Lease over."""

    def __init__(self, settings: ElectionSettings, store: LeaseStore | None = None,
                 leadership: Leadership = LEADERSHIP, registry: CollectorRegistry = REGISTRY,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.election = Election(settings)
        self.store = store if store is not None else KubeLeaseStore(
            settings.namespace, settings.lease_name, timeout=min(5.0, settings.renew_deadline_seconds / 2))
        self.leadership = leadership
        self.clock, self.wall = clock, wall
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._was_leading = False
        self._gauge = Gauge("emailqueue_operator_leader", "1 while this operator replica holds the leader Lease",
                            registry=registry)

    def round(self) -> None:
        """One read-decide-write round; never raises (a failed round only lets the deadline run)."""
        started = self.clock()
        try:
            current = self.store.read()
            record = self.election.next_record(current, started, self.wall())
            if record is not None:
                self.election.written(self.store.write(record), started)
        except Conflict:
            self.election.lost_race()
        except Exception as exc:  # the apiserver is unreachable: keep leading until the deadline
            log.warning("leader election: Lease %s/%s unavailable: %s", self.settings.namespace,
                        self.settings.lease_name, type(exc).__name__)
        self._transition()

    def _transition(self) -> None:
        leading = self.election.leading(self.clock())
        if leading != self._was_leading:
            holder = self.election.observed.holder if self.election.observed else None
            if leading:
                log.info("leader election: %s now leads (Lease %s/%s)", self.settings.identity,
                         self.settings.namespace, self.settings.lease_name)
            else:
                log.warning("leader election: %s stopped leading (holder now %s)", self.settings.identity, holder)
            self._was_leading = leading
            self._gauge.set(1 if leading else 0)
        self.leadership.notify()

    def release(self) -> None:
        """Hand the Lease over at once (shutdown after the scale loops stopped)."""
        observed = self.election.observed
        if observed is None or observed.holder != self.settings.identity:
            return
        try:
            self.election.observed = self.store.write(self.election.released(observed, self.wall()))
            log.info("leader election: %s released the Lease", self.settings.identity)
            self._was_leading = False  # said just now; no "stopped leading" warning
            self._gauge.set(0)
        except Exception as exc:  # the follower takes over when the lease runs out instead
            log.warning("leader election: releasing the Lease failed: %s", type(exc).__name__)
        self._transition()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = self.clock()
            self.round()
            # Between rounds, wake at the deadline too, so an expired leadership is noticed.
            self._stop.wait(max(0.0, self.settings.retry_seconds - (self.clock() - started)))

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.leadership.attach(self.election, loop, self.clock)
        self._thread = threading.Thread(target=self._run, name="leader-election", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.settings.retry_seconds + 10)
        self.release()
        self.leadership.detach()
