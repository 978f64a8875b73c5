"""handlers.ScaleLoops: watch events start, refresh and stop one loop per EmailQueue, with no
finalizer involved (a deletion is seen as DELETED or as a deletionTimestamp)."""
from __future__ import annotations

import asyncio
from typing import Any

from emailqueue_operator.handlers import ScaleLoop, ScaleLoops


def body(uid: str, generation: int = 1, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"uid": uid, "name": f"eq-{uid}", "namespace": "ns", "generation": generation}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-01T00:00:00Z"
    return {"metadata": meta, "spec": {}}


def test_events_start_refresh_and_stop_loops() -> None:
    async def scenario() -> None:
        seen: dict[str, list[int]] = {}

        async def run(loop: ScaleLoop) -> None:
            uid = loop.body["metadata"]["uid"]
            while not loop.stopped.is_set():
                seen.setdefault(uid, []).append(loop.body["metadata"]["generation"])
                await asyncio.sleep(0.01)

        loops = ScaleLoops(run)
        loops.observe(None, body("a"))          # listed at start-up
        loops.observe("ADDED", body("b"))
        await asyncio.sleep(0.03)
        assert len(loops) == 2
        loops.observe("MODIFIED", body("a", generation=2))  # the running loop gets the new body
        await asyncio.sleep(0.03)
        assert seen["a"][-1] == 2 and len(loops) == 2
        loops.observe("MODIFIED", body("a", generation=3, deleting=True))  # v0.1's finalizer still on it
        loops.observe("DELETED", body("b"))
        await asyncio.sleep(0.03)
        assert len(loops) == 0
        count = {uid: len(values) for uid, values in seen.items()}
        await asyncio.sleep(0.03)
        assert {uid: len(values) for uid, values in seen.items()} == count, "stopped loops still run"
        loops.observe("DELETED", body("c"))  # never seen alive: nothing to stop, nothing started
        assert len(loops) == 0

    asyncio.run(scenario())


def test_a_crashed_loop_is_restarted_by_the_next_event_and_stop_all_cancels_stragglers() -> None:
    async def scenario() -> None:
        starts: list[str] = []

        async def run(loop: ScaleLoop) -> None:
            starts.append(loop.body["metadata"]["uid"])
            if len(starts) == 1:
                raise RuntimeError("bug")
            await asyncio.sleep(3600)  # ignores `stopped`: must be cancelled

        loops = ScaleLoops(run)
        loops.observe("ADDED", body("a"))
        await asyncio.sleep(0.01)
        assert len(loops) == 0
        loops.observe("MODIFIED", body("a"))
        await asyncio.sleep(0.01)
        assert starts == ["a", "a"] and len(loops) == 1
        await asyncio.wait_for(loops.stop_all(timeout=0.05), 1)
        assert len(loops) == 0

    asyncio.run(scenario())


def test_only_the_leader_polls_and_a_new_leader_resumes_from_the_status(monkeypatch) -> None:
    """A follower's loop does not poll; when it starts to lead, its first poll gets the
    policy state the previous leader wrote to the status; it stops leading at once when
    the election says so, and stops for good when its EmailQueue turns out to be gone."""
    from emailqueue_operator import handlers, kube
    from emailqueue_operator.leader import Election, ElectionSettings, Leadership
    from emailqueue_operator.poller import PollResult
    from emailqueue_operator.scaling import PolicyState

    previous = PolicyState(last_active_at=1234.0)
    polled: list[PolicyState] = []

    def fake_poll(snapshot, state, ctx, claims):
        polled.append(state)
        return PollResult(state=PolicyState(last_active_at=99.0), status={"desiredReplicas": 1}, poll_seconds=0.01)

    monkeypatch.setattr(handlers, "poll", fake_poll)
    monkeypatch.setattr(kube, "patch_status", lambda namespace, name, status: None)
    gone = {"answer": False}
    monkeypatch.setattr(handlers, "emailqueue_gone", lambda namespace, name, uid: gone["answer"])

    async def scenario() -> None:
        election = Election(ElectionSettings(identity="me", namespace="ops", lease_seconds=4,
                                             renew_deadline_seconds=3, retry_seconds=1))
        gate = Leadership()
        gate.attach(election, asyncio.get_running_loop())
        monkeypatch.setattr(handlers, "LEADERSHIP", gate)
        loop = ScaleLoop({**body("a"), "status": {"policy": previous.to_status()}})
        task = asyncio.ensure_future(handlers.scale_loop(loop))
        await asyncio.sleep(0.05)
        assert polled == [], "a follower polled"

        election.leading_until = float("inf")  # elected
        gate.notify()
        await asyncio.sleep(0.05)
        assert polled and polled[0] == previous, "the new leader must resume from the status"
        assert all(state.last_active_at == 99.0 for state in polled[1:])

        election.leading_until = float("-inf")  # lost the Lease
        await asyncio.sleep(0.03)
        count = len(polled)
        await asyncio.sleep(0.05)
        assert len(polled) == count, "polls after the leadership was lost"

        election.leading_until = float("inf")
        gate.notify()
        monkeypatch.setattr(handlers, "SILENT_SECONDS", 0.0)
        gone["answer"] = True  # deleted while the watch was re-listing: the loop ends itself
        await asyncio.wait_for(task, 1)

    asyncio.run(scenario())
