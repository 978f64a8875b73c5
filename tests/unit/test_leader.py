"""Leader election (leader.py) against an in-memory Lease with the apiserver's optimistic
concurrency: a write naming an old resourceVersion is a 409. Clocks are explicit, so every
step of a takeover is checked, not slept through."""
from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry

from emailqueue_operator.leader import Conflict, ElectionSettings, Elector, Leadership, LeaseRecord


class MemoryLease:
    """One Lease; `down` makes every request fail like an unreachable apiserver."""

    def __init__(self) -> None:
        self.record: LeaseRecord | None = None
        self.version = 0
        self.down = False

    def read(self) -> LeaseRecord | None:
        if self.down:
            raise OSError("connection refused")
        return self.record

    def write(self, record: LeaseRecord) -> LeaseRecord:
        if self.down:
            raise OSError("connection refused")
        current = self.record.resource_version if self.record else None
        if record.resource_version != current:
            raise Conflict()
        self.version += 1
        self.record = replace(record, resource_version=str(self.version))
        return self.record


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def elector(name: str, lease: MemoryLease, clock: Clock, **timing: float) -> Elector:
    settings = ElectionSettings(identity=name, namespace="ops", lease_seconds=timing.get("lease", 15.0),
                                renew_deadline_seconds=timing.get("deadline", 10.0),
                                retry_seconds=timing.get("retry", 2.0))
    return Elector(settings, store=lease, leadership=Leadership(), registry=CollectorRegistry(),
                   clock=clock, wall=lambda: 1.7e9 + clock.now)


def leading(*electors: Elector) -> list[str]:
    return [e.settings.identity for e in electors if e.election.leading(e.clock())]


def test_first_candidate_creates_the_lease_and_the_other_follows() -> None:
    lease, clock = MemoryLease(), Clock()
    a, b = elector("a", lease, clock), elector("b", lease, clock)
    a.round()
    b.round()
    assert leading(a, b) == ["a"]
    assert lease.record is not None and lease.record.holder == "a" and lease.record.lease_seconds == 15
    for _ in range(30):  # a renews every 2 s: b never takes over
        clock.now += 2
        a.round()
        b.round()
        assert leading(a, b) == ["a"]
    assert lease.record.transitions == 0


def test_a_dead_leader_is_replaced_one_lease_after_its_last_renewal_and_never_before() -> None:
    lease, clock = MemoryLease(), Clock()
    a, b = elector("a", lease, clock), elector("b", lease, clock)
    a.round()
    b.round()  # b sees a's record now
    seen_at = clock.now
    while clock.now - seen_at < 15:  # a is killed: no more renewals
        assert leading(b) == []
        clock.now += 2
        b.round()
    assert leading(b) == ["b"]
    assert clock.now - seen_at <= 15 + 2, "takeover within the lease plus one retry period"
    assert lease.record is not None and lease.record.holder == "b" and lease.record.transitions == 1


@pytest.mark.parametrize("step", [0.5, 1.0, 2.0, 3.0], ids=lambda s: f"rounds-every-{s}s")
def test_a_cut_off_leader_stops_before_anyone_takes_over(step: float) -> None:
    """The leader loses the apiserver (partition) but keeps running: it must give up at its
    renew deadline, before the follower's lease runs out: never two leaders at once."""
    lease, clock = MemoryLease(), Clock()
    a, b = elector("a", lease, clock, retry=min(step, 2.0)), elector("b", lease, clock, retry=min(step, 2.0))
    a.round()
    b.round()
    a_store = a.store

    class CutOff:
        def read(self) -> LeaseRecord | None:
            raise OSError("no route to host")

        def write(self, record: LeaseRecord) -> LeaseRecord:
            raise OSError("no route to host")

    a.store = CutOff()
    last_renewal = a.election.leading_until - a.settings.renew_deadline_seconds
    took_over = a_stopped_polling = None
    for _ in range(int(40 / step)):
        clock.now += step
        a.round()
        b.round()
        assert len(leading(a, b)) <= 1, f"two leaders at t+{clock.now - 1000}"
        if a_stopped_polling is None and not a.election.may_poll(clock.now):
            a_stopped_polling = clock.now
        if took_over is None and leading(b):
            took_over = clock.now
    assert took_over is not None and leading(a) == []
    # a starts no poll in the last renewDeadline - 2 x retry seconds of its leadership: a poll
    # under way then has that much plus lease - renewDeadline before b may scale.
    assert a_stopped_polling is not None
    assert a_stopped_polling <= last_renewal + a.settings.renew_deadline_seconds - a.election.poll_guard + step
    assert took_over - a_stopped_polling >= a.election.poll_guard + 15 - 10 - step
    a.store = a_store  # a comes back: it follows
    for _ in range(5):
        clock.now += step
        a.round()
        b.round()
        assert leading(a, b) == ["b"]


def test_release_hands_over_at_the_next_round() -> None:
    lease, clock = MemoryLease(), Clock()
    a, b = elector("a", lease, clock), elector("b", lease, clock)
    a.round()
    b.round()
    a.release()
    assert leading(a) == [] and lease.record is not None and lease.record.holder is None
    clock.now += 2
    b.round()
    assert leading(b) == ["b"]


def test_two_candidates_racing_for_an_expired_lease_one_wins() -> None:
    lease, clock = MemoryLease(), Clock()
    a, b, c = (elector(n, lease, clock) for n in "abc")
    a.round()
    b.round()
    c.round()
    clock.now += 16
    # b and c both read the expired record before either writes
    current = lease.read()
    records = [e.election.next_record(current, clock.now, 0.0) for e in (b, c)]
    assert all(r is not None and r.holder == e.settings.identity for r, e in zip(records, (b, c), strict=True))
    b.election.written(lease.write(records[0]), clock.now)
    with pytest.raises(Conflict):
        lease.write(records[1])
    c.election.lost_race()
    assert leading(b, c) == ["b"]


def test_settings_must_leave_a_margin_between_deadline_and_lease() -> None:
    with pytest.raises(ValueError, match="renew deadline < lease duration"):
        ElectionSettings(identity="a", namespace="ops", lease_seconds=10, renew_deadline_seconds=10)


def test_leadership_gate_without_an_election_always_leads_and_wakes_loops_on_a_gain() -> None:
    gate = Leadership()
    assert gate.leading() and not gate.elected

    async def scenario() -> list[str]:
        lease, clock = MemoryLease(), Clock()
        lease.record = LeaseRecord("other", 15, resource_version="7")
        lease.version = 7
        candidate = elector("me", lease, clock)
        candidate.leadership = gate
        gate.attach(candidate.election, asyncio.get_running_loop(), clock)
        candidate.election.next_record(lease.read(), clock.now, 0.0)
        stopped = asyncio.Event()
        waiter = asyncio.ensure_future(gate.wait_leading(stopped))
        await asyncio.sleep(0.01)
        steps = ["waiting" if not waiter.done() else "woke early"]
        lease.record = None  # the holder deleted its Lease: we create one
        candidate.round()
        await asyncio.wait_for(waiter, 1)
        steps.append("woken")
        return steps

    assert asyncio.run(scenario()) == ["waiting", "woken"]
