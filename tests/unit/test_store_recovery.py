"""Lost leases: work goes back to the queue, until a generation has lost its worker too often."""

from __future__ import annotations

import asyncio

from backburner.core.states import Kind, State
from backburner.schemas.generation import NewGeneration
from backburner.store import Store


async def test_lost_leases_requeue_then_give_up(store: Store) -> None:
    g = await store.generations.submit(
        "t", NewGeneration(Kind.CHAT, "m", {"model": "m"}), expiry_seconds=3600
    )
    for attempt in range(1, 4):
        (claimed,) = await store.work.claim(f"w{attempt}", ["m"], 1, lease_seconds=0.01)
        assert claimed.attempts == attempt
        await asyncio.sleep(0.05)
        assert await store.work.recover_lost(give_up_after=3) == 1
        got = await store.generations.get("t", g.id)
        if attempt < 3:
            assert got.state is State.QUEUED
    assert got.state is State.FAILED
    assert "worker was lost" in got.state_message
    assert got.finished_at is not None
    assert await store.work.recover_lost(give_up_after=3) == 0
