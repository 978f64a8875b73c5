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
