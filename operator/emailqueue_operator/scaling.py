"""The pure scaling policy: ``decide(spec, observation, state, now) -> Decision``.

This module owns *how many email workers a queue needs* and nothing else: no kopf, pika,
kubernetes or clock. The operator calls it once per poll, the simulator once per simulated
poll; both persist :class:`PolicyState` (the operator in ``status.policy``) so a restart
decides exactly as an uninterrupted run would.

One poll, in order:

1. **Measure.** Backlog ``B`` = ready (+ unacked when ``countUnacked`` and known).
   Arrival rate ``λ`` = the broker's publish rate, else estimated from the backlog change
   since the previous poll plus the consumption rate (``λ ≈ ΔB/Δt + acks/s``).
   Per-replica rate ``μ`` = ``target.ratePerReplica``, else learned: ack rate ÷ busy
   replicas (ready replicas that are consumers), sampled only while messages wait
   (``ready > 0``, so workers are saturated, not starved), EWMA-smoothed (α 0.3), floored
   at ``ratePerReplicaFloor``; frozen while downstream saturation is detected.
2. **Demand terms** (replicas, fractional), ``desired = ceil(max(terms))``:

   - ``backlog``      ``B / backlogPerReplica``                      (KEDA QueueLength)
   - ``messageRate``  ``λ / messageRatePerReplica``                  (KEDA MessageRate)
   - ``drain``        ``(λ + B_eff / drainSeconds) / μ``             (drain SLO)
   - ``age``          ``(λ + B_eff / T) / μ``, ``T = max(maxAge − age_now − startup, poll)``
   - ``schedule``     ``announced rate at now + startup + poll / μ`` (pre-scaling)
   - ``bootstrap``    ``B / 20`` when an SLO is set but ``μ`` is not known yet

   ``B_eff = B + max(0, λ − μ·ready_replicas)·startupSeconds`` is the backlog that will
   exist once replicas started now are ready. The age term asks that the backlog present
   when new replicas come up be gone before its oldest message reaches the SLO: that
   message is ``age_now + startup`` old by then, so ``T`` is what remains of its budget
   (never less than one poll: a breached SLO asks for as much as the bounds allow).
   ``age_now`` is the broker's head-message age when given, else Little's law
   ``B / throughput``.
3. **HPA shaping**, exactly as ``pkg/controller/podautoscaler`` does it: tolerance
   (``(1 − scaleDown tolerance) <= raw/current <= (1 + scaleUp tolerance)`` keeps current;
   for the backlog term the ratio is ``B / (backlogPerReplica × current)``, the HPA's
   external per-pod formula, so boundary cases round as upstream's do), stabilization
   (scale-up takes the minimum recommendation over its window, scale-down the maximum over
   its window; windows are exclusive of their start like ``time.After``), rate policies from
   the replicas at the start of each policy's period (Percent down truncates, as the HPA
   does), then ``[min, max]``. The first measured poll of a running target records its
   current count (clamped to ``max``) as a recommendation, as the HPA does on its first
   reconcile, so taking over a fleet waits out the scale-down window before shrinking it.
   Before shaping, the recommendation is capped by ``ceil(maxSendRate / μ)`` and, while
   saturated, by the replica count already running.
4. **KEDA zero handling.** At 0 replicas the fleet wakes only when ``B > activationBacklog``
   (or an announced campaign is due), to at least ``max(min, 1)``. With ``min == 0`` a
   running fleet goes to 0 only after ``cooldownSeconds`` without any activity (backlog 0,
   no arrivals, no campaign due); the cooldown clock starts at the first observation, so a
   restart never drops a fleet to 0 early.
5. **Blindness.** A failed probe holds the current count (raising it to ``min`` at most);
   after ``fallback.afterFailures`` failures in a row the fallback count is applied, but a
   failure never scales down and so never reaches 0. ``static`` aims at
   ``fallback.replicas``; ``currentIfHigher`` at ``max(current, fallback.replicas)``; both
   clamped to ``[min, max]``. Because scaling down blind is refused, the two modes differ
   only in the reason they report when current is above the fallback count.
6. **Downstream saturation.** While messages wait, settled samples (busy replicas unchanged
   for ``max(startupSeconds, 2·pollSeconds)``) of ``(replicas, ack rate)`` are compared with
   the previous settled sample: replicas up by >= 20 % (and >= 1) with the ack rate up by
   <= 5 % means the bottleneck is downstream (e.g. a provider throttling with 454): the
   fleet is held, no further scale-up, until the backlog drains or the ack rate rises by
   > 10 % again.

Invariants (pinned in ``tests/unit/test_scaling_properties.py``): ``min <= replicas <= max``
except when paused (current is returned) or blind (never scales down, even above max);
more backlog never means fewer replicas for the same state and μ; no scale-down inside the
scale-down window below a recommendation made in it (except the KEDA N→0 cooldown step);
``PolicyState.to_status``/``from_status`` round-trips give identical decisions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from emailqueue_operator.spec import (
    DEFAULT_BACKLOG_PER_REPLICA,
    EmailQueueSpec,
    ScalingRules,
)

__all__ = [
    "Decision",
    "Observation",
    "PolicyState",
    "Saturation",
    "ThroughputSample",
    "decide",
    "scale_down_limit",
    "scale_up_limit",
]

EPSILON: Final = 1e-9
LEARNING_ALPHA: Final = 0.3
SATURATION_REPLICA_GROWTH: Final = 1.20  # replicas up by >= 20 % ...
SATURATION_ACK_GROWTH: Final = 1.05  # ... while the ack rate rose by <= 5 %
SATURATION_CLEAR_ACK_GROWTH: Final = 1.10  # ack rate up > 10 % again: the throttle lifted
# A settled fleet whose acks, while messages wait, stay under 75 % of what its busy
# replicas sustain is held back downstream: cap it at the plateau plus 20 % headroom (the
# headroom lets a lifted throttle show as a rising ack rate). If the capped fleet's acks
# then fall below 85 % of the plateau, the replicas were the bottleneck after all (slow
# but parallel downstream): lift the cap and do not suspect again for a while.
SATURATION_EFFICIENCY: Final = 0.75
SATURATION_HEADROOM: Final = 1.20
SATURATION_CONFIRM: Final = 0.85
SATURATION_VETO_SECONDS: Final = 600.0
# Estimating λ from a backlog difference across a long gap (operator restart, outage)
# would average away the surge we are trying to see; beyond this many polls, don't.
ARRIVAL_ESTIMATE_MAX_GAP_POLLS: Final = 10
# Rateless sources (AMQP passive declare, a management API without its collector): an
# empty queue says "the fleet keeps up", not "no demand". Capacity is given back by
# probing: a step down after a quiet settle, doubled after each step that kept up, back
# to the smallest step (and never below the short count for a while) once the queue
# backs up again.
KEEPUP_STEP_MIN: Final = 0.15
KEEPUP_STEP_MAX: Final = 0.5
KEEPUP_MEMORY_SECONDS: Final = 300.0
KEEPUP_MEMORY_MAX_SECONDS: Final = 1200.0
KEEPUP_SETTLE_MIN_SECONDS: Final = 15.0


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Observation:
    """One poll's view of the queue and the target. ``None`` means "not measured"."""

    ok: bool
    error: str | None
    ready: int
    unacked: int | None
    consumers: int | None
    publish_rate: float | None
    ack_rate: float | None
    oldest_age_seconds: float | None
    current_replicas: int
    ready_replicas: int

    @classmethod
    def failed(cls, error: str, current_replicas: int, ready_replicas: int | None = None) -> Observation:
        """A probe that failed: nothing about the queue is known."""
        return cls(
            ok=False,
            error=error,
            ready=0,
            unacked=None,
            consumers=None,
            publish_rate=None,
            ack_rate=None,
            oldest_age_seconds=None,
            current_replicas=current_replicas,
            ready_replicas=current_replicas if ready_replicas is None else ready_replicas,
        )


@dataclass(frozen=True)
class ThroughputSample:
    """The ack rate a settled fleet of ``replicas`` busy workers achieved at ``at``."""

    at: float
    replicas: int
    ack_rate: float

    def to_status(self) -> dict[str, Any]:
        return {"at": self.at, "replicas": self.replicas, "ackRate": self.ack_rate}

    @classmethod
    def from_status(cls, data: Any) -> ThroughputSample | None:
        if not isinstance(data, Mapping):
            return None
        at, replicas, ack = _num(data.get("at")), _int(data.get("replicas")), _num(data.get("ackRate"))
        if at is None or replicas is None or ack is None:
            return None
        return cls(at, replicas, ack)


@dataclass(frozen=True)
class Saturation:
    """Evidence that more replicas stopped raising throughput: ``observed`` has >= 20 % more
    replicas than ``plateau`` for <= 5 % more acks."""

    since: float
    plateau: ThroughputSample
    observed: ThroughputSample
    cap: int | None = None
    """Replicas the fleet is cut back to (efficiency evidence); None: hold what runs."""

    def evidence(self) -> str:
        return (
            f"ack rate {self.plateau.ack_rate:.1f}/s at {self.plateau.replicas} replicas, "
            f"{self.observed.ack_rate:.1f}/s at {self.observed.replicas}"
        )

    def to_status(self) -> dict[str, Any]:
        return {"since": self.since, "plateau": self.plateau.to_status(), "observed": self.observed.to_status(),
                "cap": self.cap}

    @classmethod
    def from_status(cls, data: Any) -> Saturation | None:
        if not isinstance(data, Mapping):
            return None
        since = _num(data.get("since"))
        plateau = ThroughputSample.from_status(data.get("plateau"))
        observed = ThroughputSample.from_status(data.get("observed"))
        if since is None or plateau is None or observed is None:
            return None
        cap = _int(data.get("cap"))
        return cls(since, plateau, observed, cap if cap is not None and cap > 0 else None)


@dataclass(frozen=True)
class PolicyState:
    """Everything :func:`decide` remembers between polls; round-trips through ``status.policy``.

    Times are epoch seconds as given to :func:`decide`.
    """

    recommendations: tuple[tuple[float, int], ...] = ()
    """(at, replicas) recommendations still able to matter to a stabilization window."""
    scale_events: tuple[tuple[float, int], ...] = ()
    """(at, replica delta) of scale actions, for the Pods/Percent policy periods."""
    last_active_at: float | None = None
    """Last poll with backlog, arrivals or a due campaign (cooldown clock for N→0)."""
    learned_rate: float | None = None
    """Smoothed emails/s one replica sustains, learned from the ack rate."""
    consecutive_failures: int = 0
    fleet_replicas: int | None = None
    """Busy replicas at the last poll, and since when (saturation settle time)."""
    fleet_since: float | None = None
    throughput_baseline: ThroughputSample | None = None
    """Last settled (replicas, ack rate) sample while messages waited."""
    saturation: Saturation | None = None
    saturation_veto_until: float | None = None
    """A cap that cost throughput was lifted: no efficiency-based suspicion before this."""
    last_backlog: int | None = None
    """Backlog and time of the last successful poll (arrival-rate estimate)."""
    last_at: float | None = None
    keepup_replicas: int | None = None
    """Rateless sources: the replica count that has kept the queue empty since ``keepup_since``."""
    keepup_since: float | None = None
    keepup_step: float | None = None
    """Fraction of the fleet the next keep-up probe gives back."""
    keepup_top: int | None = None
    """The replica count when the queue last became empty (probes gave back from there)."""
    short_replicas: int | None = None
    """Busy replicas that last let the queue back up, and when (probes stay above it)."""
    short_at: float | None = None
    short_hold: float | None = None
    """How long probes stay above the short count: doubled each time a probe falls short
    at about the same count again (steady load: fewer and fewer probes), reset once a
    probe keeps up below it (demand fell)."""

    def to_status(self) -> dict[str, Any]:
        """JSON-safe camelCase dict for ``status.policy``.

        Unset fields are ``None`` (JSON null) rather than absent, so a merge patch of this
        dict removes values the previous poll stored.
        """
        return {
            "recommendations": [{"at": at, "replicas": r} for at, r in self.recommendations],
            "scaleEvents": [{"at": at, "delta": d} for at, d in self.scale_events],
            "lastActiveAt": self.last_active_at,
            "learnedRate": self.learned_rate,
            "consecutiveFailures": self.consecutive_failures,
            "fleetReplicas": self.fleet_replicas,
            "fleetSince": self.fleet_since,
            "throughputBaseline": None if self.throughput_baseline is None else self.throughput_baseline.to_status(),
            "saturation": None if self.saturation is None else self.saturation.to_status(),
            "saturationVetoUntil": self.saturation_veto_until,
            "lastBacklog": self.last_backlog,
            "lastAt": self.last_at,
            "keepUpReplicas": self.keepup_replicas,
            "keepUpSince": self.keepup_since,
            "keepUpStep": self.keepup_step,
            "keepUpTop": self.keepup_top,
            "shortReplicas": self.short_replicas,
            "shortAt": self.short_at,
            "shortHold": self.short_hold,
        }

    @classmethod
    def from_status(cls, data: Mapping[str, Any] | None) -> PolicyState:
        """Rebuild from ``status.policy``; missing or malformed parts become empty."""
        if not isinstance(data, Mapping):
            return cls()
        return cls(
            recommendations=_pairs(data.get("recommendations"), "replicas"),
            scale_events=_pairs(data.get("scaleEvents"), "delta"),
            last_active_at=_num(data.get("lastActiveAt")),
            learned_rate=_positive(data.get("learnedRate")),
            consecutive_failures=max(0, _int(data.get("consecutiveFailures")) or 0),
            fleet_replicas=_int(data.get("fleetReplicas")),
            fleet_since=_num(data.get("fleetSince")),
            throughput_baseline=ThroughputSample.from_status(data.get("throughputBaseline")),
            saturation=Saturation.from_status(data.get("saturation")),
            saturation_veto_until=_num(data.get("saturationVetoUntil")),
            last_backlog=_int(data.get("lastBacklog")),
            last_at=_num(data.get("lastAt")),
            keepup_replicas=_int(data.get("keepUpReplicas")),
            keepup_since=_num(data.get("keepUpSince")),
            keepup_step=_positive(data.get("keepUpStep")),
            keepup_top=_int(data.get("keepUpTop")),
            short_replicas=_int(data.get("shortReplicas")),
            short_at=_num(data.get("shortAt")),
            short_hold=_positive(data.get("shortHold")),
        )


@dataclass(frozen=True)
class Decision:
    """What the target should have, why, and the state to persist."""

    replicas: int
    reason: str
    terms: Mapping[str, float]
    limits: tuple[str, ...]
    fallback_active: bool
    saturated: bool
    state: PolicyState
    current_replicas: int = 0
    recommended: int | None = None
    """Replicas the demand terms asked for (after tolerance and caps, before behavior and bounds)."""
    backlog: int | None = None
    arrival_rate: float | None = None
    """λ used (measured, or estimated from the backlog change)."""
    rate_per_replica: float | None = None
    """μ used (configured, or learned)."""
    oldest_age_seconds: float | None = None
    """Head-message age used by the age term (measured or estimated)."""

    @property
    def direction(self) -> str:
        """"up", "down" or "none" relative to the observed current replicas."""
        if self.replicas > self.current_replicas:
            return "up"
        if self.replicas < self.current_replicas:
            return "down"
        return "none"


# --------------------------------------------------------------------------- status coercion


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _positive(value: Any) -> float | None:
    number = _num(value)
    return number if number is not None and number > 0 else None


def _int(value: Any) -> int | None:
    number = _num(value)
    if number is None or not number.is_integer():
        return None
    return int(number)


def _pairs(items: Any, key: str) -> tuple[tuple[float, int], ...]:
    if not isinstance(items, list):
        return ()
    pairs: list[tuple[float, int]] = []
    for item in items:
        if isinstance(item, Mapping):
            at, value = _num(item.get("at")), _int(item.get(key))
            if at is not None and value is not None:
                pairs.append((at, value))
    pairs.sort(key=lambda pair: pair[0])
    return tuple(pairs)


# --------------------------------------------------------------------------- HPA pieces


def _replica_change(events: Iterable[tuple[float, int]], period_seconds: int, now: float) -> int:
    cutoff = now - period_seconds
    return sum(delta for at, delta in events if at > cutoff)


def scale_up_limit(
    current: int, events: tuple[tuple[float, int], ...], rules: ScalingRules, now: float
) -> int:
    """HPA ``calculateScaleUpLimitWithScalingRules`` (``events`` are signed deltas)."""
    if rules.select_policy == "Disabled" or not rules.policies:
        return current
    proposals = []
    for policy in rules.policies:
        start = current - _replica_change(events, policy.period_seconds, now)
        if policy.type == "Pods":
            proposals.append(start + policy.value)
        else:
            # rounded up, or a small fleet could never grow by a percentage
            proposals.append(math.ceil(start * (1 + policy.value / 100)))
    return max(proposals) if rules.select_policy == "Max" else min(proposals)


def scale_down_limit(
    current: int, events: tuple[tuple[float, int], ...], rules: ScalingRules, now: float
) -> int:
    """HPA ``calculateScaleDownLimitWithBehaviors`` (Percent truncates, like ``int32()``)."""
    if rules.select_policy == "Disabled" or not rules.policies:
        return current
    proposals = []
    for policy in rules.policies:
        start = current - _replica_change(events, policy.period_seconds, now)
        if policy.type == "Pods":
            proposals.append(start - policy.value)
        else:
            proposals.append(int(start * (1 - policy.value / 100)))
    # most permissive for scale-down is the lowest count
    return min(proposals) if rules.select_policy == "Max" else max(proposals)


def _prune_recommendations(
    recommendations: tuple[tuple[float, int], ...], now: float, up_window: int, down_window: int
) -> tuple[tuple[float, int], ...]:
    """Keep only recommendations that can still change a future stabilization result.

    A recommendation matters to the scale-up minimum only while inside the up window and
    only if every newer one is larger; to the scale-down maximum only inside the down
    window and if every newer one is smaller. The rest can never win again, so dropping
    them keeps decisions identical while the list stays a few entries long even when the
    simulator decides every second over a one-hour window.
    """
    kept: list[tuple[float, int]] = []
    newer_min = math.inf
    newer_max = -math.inf
    up_cutoff = now - up_window
    down_cutoff = now - down_window
    for at, replicas in reversed(recommendations):
        if (at > up_cutoff and replicas < newer_min) or (at > down_cutoff and replicas > newer_max):
            kept.append((at, replicas))
        newer_min = min(newer_min, replicas)
        newer_max = max(newer_max, replicas)
    kept.reverse()
    return tuple(kept)


def _prune_events(events: tuple[tuple[float, int], ...], now: float,
                  spec: EmailQueueSpec) -> tuple[tuple[float, int], ...]:
    periods = [p.period_seconds for p in spec.behavior.scale_up.policies + spec.behavior.scale_down.policies]
    longest = max(periods, default=0)
    cutoff = now - longest
    return tuple(event for event in events if event[0] > cutoff)


# --------------------------------------------------------------------------- decide


def decide(spec: EmailQueueSpec, obs: Observation, state: PolicyState, now: float) -> Decision:
    """Decide the replica count for one poll. Pure: same inputs, same decision."""
    if spec.paused:
        return Decision(
            replicas=obs.current_replicas,
            reason=f"paused: holding {obs.current_replicas} replicas",
            terms={},
            limits=("paused",),
            fallback_active=False,
            saturated=state.saturation is not None,
            state=state,
            current_replicas=obs.current_replicas,
        )
    if not obs.ok:
        return _decide_blind(spec, obs, state, now)
    return _decide_measured(spec, obs, state, now)


def _record_scale(
    spec: EmailQueueSpec, events: tuple[tuple[float, int], ...], now: float, current: int, replicas: int
) -> tuple[tuple[float, int], ...]:
    # A dry run never scales, so recording a scale event would throttle later decisions
    # against changes that did not happen.
    if replicas == current or spec.dry_run:
        return events
    return (*events, (now, replicas - current))


def _decide_blind(spec: EmailQueueSpec, obs: Observation, state: PolicyState, now: float) -> Decision:
    bounds = spec.replicas
    current = obs.current_replicas
    failures = state.consecutive_failures + 1
    error = obs.error or "probe failed"
    hold = max(current, bounds.min)
    fallback = spec.fallback
    limits: list[str] = []
    if fallback is not None and failures >= fallback.after_failures:
        aim = fallback.replicas if fallback.mode == "static" else max(current, fallback.replicas)
        aim = min(max(aim, bounds.min), bounds.max)
        replicas = max(hold, aim)
        limits.append("fallback")
        reason = (
            f"metrics unavailable for {failures} polls ({error}): fallback {fallback.mode} "
            f"→ {replicas} replicas"
        )
        if aim < current:
            reason += f" (holding {current}: never scale down blind)"
        fallback_active = True
    else:
        replicas = hold
        if bounds.min > current:
            limits.append("min")
        threshold = f"/{fallback.after_failures}" if fallback is not None else ""
        reason = f"metrics unavailable ({error}), failure {failures}{threshold}: holding {replicas} replicas"
        fallback_active = False
    events = _prune_events(_record_scale(spec, state.scale_events, now, current, replicas), now, spec)
    new_state = replace(
        state,
        consecutive_failures=failures,
        scale_events=events,
        # Time spent blind counts as activity: after recovery the fleet still waits a full
        # cooldown before going to 0.
        last_active_at=now if current > 0 else state.last_active_at,
    )
    return Decision(
        replicas=replicas,
        reason=reason,
        terms={},
        limits=tuple(limits),
        fallback_active=fallback_active,
        saturated=state.saturation is not None,
        state=new_state,
        current_replicas=current,
    )


@dataclass
class _Rates:
    backlog: int
    busy: int
    arrival: float | None
    arrival_estimated: bool
    per_replica: float | None
    learned: float | None
    oldest_age: float | None
    ack_rate: float | None
    """The ack rate, None when the sample was a stale zero (see _measure)."""


def _measure(spec: EmailQueueSpec, obs: Observation, state: PolicyState, now: float) -> _Rates:
    target = spec.target
    backlog = max(0, obs.ready)
    if target.count_unacked and obs.unacked is not None:
        backlog += max(0, obs.unacked)
    busy = max(0, obs.ready_replicas)
    if obs.consumers is not None:
        busy = min(busy, max(0, obs.consumers))

    # The management API refreshes a quorum queue's counters only every few seconds
    # (5 s on RabbitMQ 3.10), and between refreshes it reports rates of 0.0. A zero rate
    # that the queue contradicts (messages waiting for busy workers, a growing backlog) is
    # such a stale sample: treat it as unknown rather than as "nothing is happening".
    # Before μ is known a zero is the only evidence there is, and it is kept.
    ack_rate = obs.ack_rate
    if (ack_rate is not None and ack_rate <= EPSILON and obs.ready > 0 and busy > 0
            and state.learned_rate is not None):
        ack_rate = None
    publish_rate = obs.publish_rate
    if (publish_rate is not None and publish_rate <= EPSILON and state.last_backlog is not None
            and backlog > state.last_backlog):
        publish_rate = None

    learned = state.learned_rate
    # Learn only while messages wait (workers saturated, not starved) and not while a
    # downstream throttle holds the ack rate down (that is not the workers' capacity).
    if ack_rate is not None and obs.ready > 0 and busy > 0 and state.saturation is None:
        sample = max(0.0, ack_rate) / busy
        learned = sample if learned is None else LEARNING_ALPHA * sample + (1 - LEARNING_ALPHA) * learned
        learned = max(learned, target.rate_per_replica_floor)
    per_replica = target.rate_per_replica if target.rate_per_replica is not None else learned

    arrival: float | None = None
    estimated = False
    if publish_rate is not None:
        arrival = max(0.0, publish_rate)
    elif state.last_backlog is not None and state.last_at is not None:
        gap = now - state.last_at
        if 0 < gap <= ARRIVAL_ESTIMATE_MAX_GAP_POLLS * spec.behavior.poll_seconds:
            if ack_rate is not None:
                consumed = max(0.0, ack_rate)
            elif per_replica is not None and obs.ready > 0:
                # Workers with messages waiting run at μ. Unacked alone (in flight) says
                # nothing about how fast they go: a fleet that keeps up always has some.
                consumed = per_replica * busy
            else:
                consumed = 0.0
            arrival = max(0.0, (backlog - state.last_backlog) / gap + consumed)
            estimated = True

    oldest_age = obs.oldest_age_seconds
    if oldest_age is None and backlog > 0:
        # Little's law: the wait in a FIFO queue is backlog / rate. The waiting messages are the
        # last `backlog` that arrived, so at a steady arrival rate the oldest came backlog / arrival
        # ago; the ack rate alone overstates it while a fleet catches up (at a surge's start acks
        # lag arrivals ×7: the live demo read 23 s while no email had waited 8 s, and paged).
        # The faster of the two: never above the ack-only estimate.
        throughput = max(ack_rate or 0.0, arrival or 0.0) or None
        if not throughput and per_replica is not None and busy > 0:
            throughput = per_replica * busy
        if not throughput and arrival:
            throughput = arrival
        oldest_age = backlog / throughput if throughput else 0.0
    return _Rates(backlog, busy, arrival, estimated, per_replica, learned, oldest_age, ack_rate)


@dataclass(frozen=True)
class _SaturationUpdate:
    fleet: int
    fleet_since: float
    baseline: ThroughputSample | None
    saturation: Saturation | None
    veto_until: float | None


def _update_saturation(
    spec: EmailQueueSpec, obs: Observation, state: PolicyState, busy: int, ack_rate: float | None, now: float
) -> _SaturationUpdate:
    fleet, since = state.fleet_replicas, state.fleet_since
    if fleet != busy or since is None:
        fleet, since = busy, now
    veto_at = state.saturation_veto_until
    veto = veto_at if veto_at is not None and veto_at > now else None

    def out(baseline: ThroughputSample | None, saturation: Saturation | None,
            veto_until: float | None = veto) -> _SaturationUpdate:
        return _SaturationUpdate(fleet, since, baseline, saturation, veto_until)

    baseline, saturation = state.throughput_baseline, state.saturation
    if obs.ready <= 0:
        # Drained (or never backlogged): acks now follow demand, not capacity.
        return out(None, None)
    if ack_rate is None:
        return out(baseline, saturation)
    ack = max(0.0, ack_rate)
    settle = max(spec.target.startup_seconds, 2.0 * spec.behavior.poll_seconds)
    settled = now - since >= settle and busy > 0
    if saturation is not None:
        best = max(saturation.plateau.ack_rate, saturation.observed.ack_rate)
        if ack > best * SATURATION_CLEAR_ACK_GROWTH + EPSILON and ack > best + EPSILON:
            return out(ThroughputSample(now, busy, ack) if settled else None, None)
        if (saturation.cap is not None and settled and busy <= saturation.cap
                and ack < SATURATION_CONFIRM * saturation.plateau.ack_rate):
            return out(None, None, now + SATURATION_VETO_SECONDS)  # fewer replicas sent less: not downstream
        return out(baseline, saturation)
    if not settled:
        return out(baseline, saturation)
    sample = ThroughputSample(now, busy, ack)
    if (
        baseline is not None
        and busy >= baseline.replicas + 1
        and busy >= baseline.replicas * SATURATION_REPLICA_GROWTH
        and ack <= baseline.ack_rate * SATURATION_ACK_GROWTH
    ):
        return out(baseline, Saturation(since=now, plateau=baseline, observed=sample))
    mu = spec.target.rate_per_replica if spec.target.rate_per_replica is not None else state.learned_rate
    if veto is None and mu and ack < SATURATION_EFFICIENCY * busy * mu:
        # Even a fleet that grew in one step shows it: acks well under what it sustains.
        cap = max(1, math.ceil(ack / mu * SATURATION_HEADROOM - EPSILON))
        if cap < busy:
            plateau = ThroughputSample(now, max(1, math.ceil(ack / mu - EPSILON)), ack)
            return out(sample, Saturation(since=now, plateau=plateau, observed=sample, cap=cap))
    return out(sample, None)


def _usage_ratio(spec: EmailQueueSpec, driver: str | None, raw: float, rates: _Rates, current: int) -> float:
    """demand ÷ current for the tolerance check, computed as the HPA computes it for a KEDA
    metric (``usage / (target × replicas)``) where the driving term is KEDA's, so a ratio
    on a tolerance boundary rounds exactly as upstream's does."""
    target = spec.target
    if driver == "backlog" and target.backlog_per_replica is not None:
        return rates.backlog / (target.backlog_per_replica * current)
    if driver == "messageRate" and target.message_rate_per_replica is not None and rates.arrival is not None:
        return rates.arrival / (target.message_rate_per_replica * current)
    return raw / current


def _demand_terms(
    spec: EmailQueueSpec, obs: Observation, rates: _Rates, now: float
) -> tuple[dict[str, float], list[str]]:
    target = spec.target
    terms: dict[str, float] = {}
    notes: list[str] = []
    backlog = rates.backlog
    arrival = rates.arrival or 0.0
    mu = rates.per_replica
    if target.backlog_per_replica is not None:
        terms["backlog"] = backlog / target.backlog_per_replica
    if target.message_rate_per_replica is not None and rates.arrival is not None:
        terms["messageRate"] = arrival / target.message_rate_per_replica
    lookahead = target.startup_seconds + spec.behavior.poll_seconds
    announced = spec.scheduled_rate(now, lookahead) if spec.schedule else 0.0
    slo_set = target.drain_seconds is not None or target.max_message_age_seconds is not None
    if mu is not None:
        shortfall = max(0.0, arrival - mu * max(0, obs.ready_replicas))
        backlog_eff = backlog + shortfall * target.startup_seconds
        if target.drain_seconds is not None:
            terms["drain"] = (arrival + backlog_eff / target.drain_seconds) / mu
        if target.max_message_age_seconds is not None:
            age_now = rates.oldest_age or 0.0
            budget = max(
                target.max_message_age_seconds - age_now - target.startup_seconds,
                float(spec.behavior.poll_seconds),
            )
            terms["age"] = (arrival + backlog_eff / budget) / mu
        if announced > 0:
            terms["schedule"] = announced / mu
    else:
        if slo_set or announced > 0:
            notes.append("rate per replica not known yet (needs ack rate while messages wait): backlog term only")
        if target.backlog_per_replica is None:
            terms["bootstrap"] = backlog / DEFAULT_BACKLOG_PER_REPLICA
        if announced > 0 and target.message_rate_per_replica is not None:
            terms["schedule"] = announced / target.message_rate_per_replica
    return terms, notes


@dataclass(frozen=True)
class _KeepUp:
    """The rateless keep-up probe: its replica floor for this poll and its memory."""

    replicas: float | None
    note: str
    state: dict[str, Any]


def _keep_up(spec: EmailQueueSpec, obs: Observation, state: PolicyState, rates: _Rates, now: float) -> _KeepUp:
    """Without any rate, an empty queue means the fleet keeps up with an unknown demand.

    While messages wait, every replica is busy: never below the current count. When the
    queue is empty, hold the fleet; after a quiet settle (three polls, at least 15 s,
    every replica ready) give back a step: 15 % first, doubled (up to 50 %) after
    each step the queue stayed empty through. A queue that backs up right after such a
    quiet spell marks the count as short (the busy replicas, or what the arrival rate
    estimated from the growing backlog needs, if more): probes stay above it for
    ``KEEPUP_MEMORY_SECONDS`` and the step starts small again. Sources with rates never
    get here.
    """
    current = max(0, obs.current_replicas)
    memory: dict[str, Any] = {"keepup_replicas": None, "keepup_since": None, "keepup_step": state.keepup_step,
                              "keepup_top": None, "short_replicas": state.short_replicas, "short_at": state.short_at,
                              "short_hold": state.short_hold}
    hold = state.short_hold or KEEPUP_MEMORY_SECONDS
    short_active = state.short_at is not None and now - state.short_at < hold
    if current <= 0:
        return _KeepUp(None, "", memory)
    settled_fleet = obs.ready_replicas >= current
    if obs.ready > 0:
        # Messages wait for busy workers: the fleet is not too big, whatever the terms say.
        # Backed up right after a probe gave capacity back: that count is short.
        probed = state.keepup_top is not None and current < state.keepup_top
        if state.keepup_replicas is not None and probed and settled_fleet:
            short = rates.busy
            if rates.arrival is not None and rates.per_replica:
                # the most that would still fall short of the estimated arrivals
                short = max(short, min(spec.replicas.max, math.ceil(rates.arrival / rates.per_replica - EPSILON) - 1))
            again = (state.short_replicas is not None
                     and 0.9 * state.short_replicas <= short <= 1.1 * state.short_replicas)
            memory.update(short_replicas=short, short_at=now, keepup_step=None,
                          short_hold=min(2 * hold, KEEPUP_MEMORY_MAX_SECONDS) if again else KEEPUP_MEMORY_SECONDS)

        return _KeepUp(float(current), "messages waiting (no rate source): not giving back capacity", memory)
    # A step inside the scale-down tolerance would be absorbed by it.
    step = max(state.keepup_step or KEEPUP_STEP_MIN, min(KEEPUP_STEP_MAX, spec.behavior.scale_down_tolerance + 0.05))
    if state.keepup_replicas == current and state.keepup_since is not None:
        since = state.keepup_since
    else:
        since = now
        if state.keepup_replicas is not None and current < state.keepup_replicas:
            step = min(KEEPUP_STEP_MAX, step * 2)  # the last step kept up: the next may be bigger
    top = state.keepup_top if state.keepup_replicas is not None and state.keepup_top is not None else current
    memory.update(keepup_replicas=current, keepup_since=since, keepup_step=step, keepup_top=max(top, current))
    # Every replica is ready (checked below), so a step that undershoots shows as a
    # backlog within a few polls; the scale-down window adds its own wait on top.
    settle = max(3.0 * spec.behavior.poll_seconds, KEEPUP_SETTLE_MIN_SECONDS)
    if now - since < settle or not settled_fleet:
        return _KeepUp(float(current), "queue empty (no rate source): holding while it keeps up", memory)
    if state.short_replicas is not None and current <= state.short_replicas:
        memory.update(short_replicas=None, short_at=None, short_hold=None)  # demand fell below the short count
    probe = min(current - 1, math.floor(current * (1.0 - step)))
    fell_short = memory["short_replicas"] if short_active else None
    if fell_short is not None:
        probe = max(probe, fell_short + 1)
    probe = max(probe, spec.replicas.min, 0)
    if probe >= current:
        return _KeepUp(float(current),
                       f"queue empty (no rate source); {fell_short} replicas fell behind recently: holding", memory)
    return _KeepUp(float(probe),
                   f"queue empty for {now - since:.0f}s (no rate source): giving back capacity step by step", memory)


@dataclass
class _Why:
    """What limited a decision (condition reasons) and why (reason text), collected on the way."""

    limits: list[str]
    notes: list[str]

    def add(self, limit: str, note: str | None = None) -> None:
        self.limits.append(limit)
        if note:
            self.notes.append(note)


def _decide_measured(spec: EmailQueueSpec, obs: Observation, state: PolicyState, now: float) -> Decision:
    bounds, behavior = spec.replicas, spec.behavior
    current = max(0, obs.current_replicas)
    rates = _measure(spec, obs, state, now)
    sat = _update_saturation(spec, obs, state, rates.busy, rates.ack_rate, now)
    terms, notes = _demand_terms(spec, obs, rates, now)
    keepup = _KeepUp(None, "", {})
    slo_set = spec.target.drain_seconds is not None or spec.target.max_message_age_seconds is not None
    if slo_set and obs.publish_rate is None and obs.ack_rate is None:
        # KEDA's QueueLength/MessageRate terms alone keep KEDA's behavior (parity).
        keepup = _keep_up(spec, obs, state, rates, now)
        if keepup.replicas is not None:
            terms["keepUp"] = keepup.replicas
            notes.append(keepup.note)
    announced_due = terms.get("schedule", 0.0) > 0
    active = rates.backlog > 0 or (rates.arrival or 0.0) > EPSILON or announced_due
    last_active_at = now if active else (state.last_active_at if state.last_active_at is not None else now)
    why = _Why([], notes)
    recommendations = state.recommendations
    recommended: int | None = None

    def finish(replicas: int, reason: str) -> Decision:
        new_state = PolicyState(
            recommendations=recommendations,
            scale_events=_prune_events(_record_scale(spec, state.scale_events, now, current, replicas), now, spec),
            last_active_at=last_active_at, learned_rate=rates.learned, consecutive_failures=0,
            fleet_replicas=sat.fleet, fleet_since=sat.fleet_since, throughput_baseline=sat.baseline,
            saturation=sat.saturation, saturation_veto_until=sat.veto_until,
            last_backlog=rates.backlog, last_at=now, **keepup.state,
        )
        return Decision(
            replicas=replicas, reason=reason, terms=dict(terms), limits=tuple(dict.fromkeys(why.limits)),
            fallback_active=False, saturated=sat.saturation is not None, state=new_state, current_replicas=current,
            recommended=recommended, backlog=rates.backlog, arrival_rate=rates.arrival,
            rate_per_replica=rates.per_replica, oldest_age_seconds=rates.oldest_age,
        )

    summary = _summary(spec, rates)
    # KEDA activation: a fleet at 0 stays there until the backlog passes activationBacklog.
    waking = current == 0 and (rates.backlog > bounds.activation_backlog or announced_due)
    if current == 0 and not waking and bounds.min == 0:
        if rates.backlog > 0:
            why.add("activation")
            return finish(0, f"{summary}; at 0 replicas until backlog > activationBacklog {bounds.activation_backlog}")
        return finish(0, f"{summary}; idle at 0 replicas")
    # KEDA cooldown: N→0 only after a full cooldown without activity.
    idle_for = now - last_active_at
    if current > 0 and bounds.min == 0 and not active and idle_for >= behavior.cooldown_seconds:
        recommendations = ()  # the HPA is off at 0 replicas: its history must not shape the next wake-up
        return finish(0, f"{summary}; idle for {idle_for:.0f}s (cooldown {behavior.cooldown_seconds}s) → 0 replicas")

    raw = max(terms.values(), default=0.0)
    driver = max(terms, key=lambda name: terms[name]) if terms else None
    recommended = _recommend(spec, rates, sat.saturation, driver, raw, current, why)
    # The HPA's first reconcile of a target records its current count as a recommendation
    # (recordInitialRecommendation): a fleet taken over at 10 with demand 2 waits out the
    # scale-down window. Above max it is recorded as max, the count the HPA scales it to.
    if current > 0 and state.last_at is None and not recommendations:
        recommendations = ((now, min(current, bounds.max)),)
    stabilized, recommendations = _stabilize(behavior, recommendations, recommended, current, now, why)
    replicas = _shape(spec, current, stabilized, state.scale_events, now, idle_for, why)
    driver_note = f"; {driver} term {terms[driver]:.1f}" if driver is not None else ""
    reason = f"{summary}{driver_note} → {replicas} replicas"
    if why.notes:
        reason += " (" + "; ".join(why.notes) + ")"
    return finish(replicas, reason)


def _recommend(spec: EmailQueueSpec, rates: _Rates, saturation: Saturation | None, driver: str | None, raw: float,
               current: int, why: _Why) -> int:
    """The demand terms' replica count after tolerance, the send-rate cap and saturation."""
    behavior = spec.behavior
    desired = math.ceil(raw - EPSILON) if raw > 0 else 0
    if current > 0 and desired != current:
        ratio = _usage_ratio(spec, driver, raw, rates, current)
        if (1.0 - behavior.scale_down_tolerance) <= ratio <= (1.0 + behavior.scale_up_tolerance):
            desired = current
            why.add("tolerance")
    mu = rates.per_replica
    if spec.target.max_send_rate is not None and mu is not None:
        send_cap = max(1, math.ceil(spec.target.max_send_rate / mu - EPSILON))
        if desired > send_cap:
            desired = send_cap
            why.add("maxSendRate", f"capped at {send_cap} by maxSendRate {spec.target.max_send_rate:g}/s")
    if saturation is not None:
        hold = saturation.cap if saturation.cap is not None else max(current, saturation.observed.replicas)
        if desired > hold:
            desired = hold
            why.add("saturated", f"{saturation.evidence()} → downstream throttling; holding {hold}")
    return desired


def _stabilize(behavior: Any, recommendations: tuple[tuple[float, int], ...], desired: int, current: int,
               now: float, why: _Why) -> tuple[int, tuple[tuple[float, int], ...]]:
    """HPA stabilization: scale-up takes the minimum over its window, scale-down the maximum."""
    up_rules, down_rules = behavior.scale_up, behavior.scale_down
    up_cutoff = now - up_rules.stabilization_seconds
    down_cutoff = now - down_rules.stabilization_seconds
    up_rec = down_rec = desired
    for at, replicas in recommendations:
        if at > up_cutoff and replicas < up_rec:
            up_rec = replicas
        if at > down_cutoff and replicas > down_rec:
            down_rec = replicas
    stabilized = min(max(current, up_rec), down_rec)
    if stabilized != desired:
        window = up_rules.stabilization_seconds if desired > current else down_rules.stabilization_seconds
        why.add("stabilization", f"held at {stabilized} by the {window}s stabilization window")
    kept = _prune_recommendations((*recommendations, (now, desired)), now, up_rules.stabilization_seconds,
                                  down_rules.stabilization_seconds)
    return stabilized, kept


def _shape(spec: EmailQueueSpec, current: int, stabilized: int, events: tuple[tuple[float, int], ...], now: float,
           idle_for: float, why: _Why) -> int:
    """HPA rate policies, then the bounds (min, max; min 0 waits for the cooldown)."""
    bounds, behavior = spec.replicas, spec.behavior
    lower = max(bounds.min, 1)
    replicas = stabilized
    if stabilized > current:
        up_limit = max(scale_up_limit(current, events, behavior.scale_up, now), current)
        allowed = min(bounds.max, up_limit)
        if stabilized > allowed:
            replicas = allowed
            if up_limit < bounds.max:
                why.add("scaleUpPolicy", f"scale-up policy allows {allowed} now")
            else:
                why.add("max", f"max {bounds.max}")
    elif stabilized < current:
        down_limit = min(scale_down_limit(current, events, behavior.scale_down, now), current)
        allowed = max(lower, down_limit)
        if stabilized < allowed and down_limit > lower:
            replicas = allowed
            why.add("scaleDownPolicy", f"scale-down policy allows {allowed} now")
    if replicas > bounds.max or (current > bounds.max and replicas == bounds.max):
        # (a fleet found above max is cut to max whatever else holds it: the HPA's rule)
        replicas = bounds.max
        why.add("max", f"max {bounds.max}")
    if replicas < lower:
        replicas = lower
        if bounds.min == 0 and current > 0:
            wait = max(0.0, behavior.cooldown_seconds - idle_for)
            why.add("cooldown", f"{wait:.0f}s of {behavior.cooldown_seconds}s cooldown left before 0")
        else:
            why.add("min", f"min {lower}")
    return replicas


def _summary(spec: EmailQueueSpec, rates: _Rates) -> str:
    parts = [f"backlog {rates.backlog}"]
    if rates.arrival is not None:
        parts.append(f"{rates.arrival:.1f}/s arriving" + (" (est.)" if rates.arrival_estimated else ""))
    if rates.per_replica is not None:
        learned = spec.target.rate_per_replica is None
        parts.append(f"{rates.per_replica:.2f}/s per replica" + (" (learned)" if learned else ""))
    return ", ".join(parts)

