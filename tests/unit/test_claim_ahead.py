"""Claiming ahead (scheduler/ahead.py): the depth follows the lane's pace and window; what waits
too long is given back; and, on the real store, a worker that claims ahead still runs every
generation exactly once, gives back what it held when it stops, and counts no try for it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from backburner.core.states import Kind, State
from backburner.scheduler.ahead import AHEAD_SECONDS, ClaimAhead
from backburner.schemas.generation import GenerationRecord, NewGeneration
from backburner.services import Services
from tests.support.fake_backend import FakeBackend
from tests.support.services import burst_services

MODEL = "fake-model"
TENANT = "default"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def record(i: int) -> GenerationRecord:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    return GenerationRecord(
        id=f"g{i}",
        tenant=TENANT,
        kind=Kind.CHAT,
        model=MODEL,
        request={},
        state=State.IN_PROGRESS,
        state_message="",
        attempts=1,
        created_at=at,
        expires_at=at,
    )


def test_no_pace_no_depth() -> None:
    ahead = ClaimAhead(32, 2.0, clock=Clock())
    assert ahead.depth(32) == 0  # nothing started yet: claim for free slots only


def test_depth_follows_the_pace_capped_by_window_and_maximum() -> None:
    clock = Clock()
    ahead = ClaimAhead(32, 2.0, clock=clock)
    for _ in range(100):  # 1,000 starts a second for 1 s
        ahead.started(10)
        clock.now += 0.01
    depth = ahead.depth(1000)
    assert 0 < depth <= 32
    assert ahead.depth(4) == 4  # never more than the window
    assert ahead.depth(0) == 0  # realtime holds the lane back: nothing ahead
    slow = ClaimAhead(32, 2.0, clock=Clock())
    for _ in range(10):  # a request every 0.5 s (an LLM under load): claimed one by one
        slow.started(1)
        clock.now += 0.5
    assert slow.depth(32) == int(slow._rate * AHEAD_SECONDS) == 0


def test_the_pace_decays_when_starts_stop() -> None:
    clock = Clock()
    ahead = ClaimAhead(32, 2.0, clock=clock)
    ahead.started(2000)
    assert ahead.depth(64) == 32
    clock.now += 10
    assert ahead.depth(64) == 0


def test_take_in_claim_order_and_give_back_what_waited_too_long() -> None:
    clock = Clock()
    ahead = ClaimAhead(8, 2.0, clock=clock)
    ahead.keep([record(0), record(1)], "lease-a")
    clock.now += 1.5
    ahead.keep([record(2)], "lease-b")
    assert [r.generation.id for r in ahead.take(1)] == ["g0"]
    assert ahead.stale() == []
    clock.now += 1.0  # g1 waited 2.5 s, g2 1.0 s
    stale = ahead.stale()
    assert [(r.generation.id, r.lease) for r in stale] == [("g1", "lease-a")]
    assert len(ahead) == 1
    assert [r.generation.id for r in ahead.clear()] == ["g2"] and len(ahead) == 0


# ---------------------------------------------------------------- on the real store


@pytest.fixture
def engine() -> FakeBackend:
    return FakeBackend("fake", delay=0.002)


@pytest.fixture
async def services(sqlite_url: str, engine: FakeBackend, tmp_path: Any) -> AsyncIterator[Services]:
    async with burst_services(sqlite_url, tmp_path / "files", engine) as built:
        yield built


async def submit(services: Services, n: int) -> list[str]:
    ids = []
    for i in range(n):
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"q{i}"}]}
        new = NewGeneration(kind=Kind.CHAT, model=MODEL, request=body)
        ids.append((await services.store.generations.submit(TENANT, new, expiry_seconds=3600)).id)
    return ids


async def test_claiming_ahead_runs_each_once(services: Services, engine: FakeBackend) -> None:
    ids = await submit(services, 120)
    worker = services.worker
    assert worker is not None and worker.opts.claim_ahead > 0
    await worker.run(burst=True)
    for gid in ids:
        g = await services.store.generations.get(TENANT, gid)
        assert g.state is State.SUCCESS and g.attempts == 1
    assert len(engine.calls) == 120 and engine.max_concurrent <= 4
    assert not worker._held


async def test_a_stopped_worker_gives_back_what_it_claimed_ahead(
    services: Services, engine: FakeBackend
) -> None:
    ids = await submit(services, 200)
    worker = services.worker
    assert worker is not None
    worker.opts.claim_ahead_seconds = 3600  # nothing is given back for waiting
    released: set[str] = set()
    release = services.store.work.release

    async def spy(leases: Any) -> int:
        released.update(leases)
        return await release(leases)

    services.store.work.release = spy  # type: ignore[method-assign]
    run = asyncio.create_task(worker.run(burst=True))
    async with asyncio.timeout(20):
        while not any(len(a) for a in worker._ahead.values()):
            await asyncio.sleep(0.001)
    ready = {r.generation.id for a in worker._ahead.values() for r in a._ready}
    await worker.stop()
    await run
    assert not worker._held
    ran = {g for g in ids if (await services.store.generations.get(TENANT, g)).attempts}
    assert ready - ran <= released  # what was ready and never ran went back
    for gid in ids:
        g = await services.store.generations.get(TENANT, gid)
        if gid in ran:
            assert g.state is State.SUCCESS and g.attempts == 1
        else:
            assert g.state is State.QUEUED and g.attempts == 0  # no try counted
    assert len(ran) == len(engine.calls) < 200


async def test_what_waits_too_long_goes_back_to_the_queue(
    services: Services, engine: FakeBackend
) -> None:
    """With no wait allowed, whatever a claim takes ahead is given back at once (and claimed
    again later): every generation still runs once, and a give-back counts no try."""
    ids = await submit(services, 120)
    worker = services.worker
    assert worker is not None
    worker.opts.claim_ahead_seconds = 0.0
    given_back: list[str] = []
    release = services.store.work.release

    async def spy(leases: Any) -> int:
        given_back.extend(leases)
        return await release(leases)

    services.store.work.release = spy  # type: ignore[method-assign]
    await worker.run(burst=True)
    assert given_back  # the claims took some ahead, and they went back
    for gid in ids:
        g = await services.store.generations.get(TENANT, gid)
        assert g.state is State.SUCCESS and g.attempts == 1
    assert len(engine.calls) == 120
