"""Two full workers (each its own store connection pool) drain one group concurrently: the group
completes exactly once and exactly one slow-group.completed event is queued."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa

from backburner.backends.engines import Engines
from backburner.config import BackendSettings
from backburner.core.states import Kind
from backburner.scheduler import Worker, WorkerOptions
from backburner.schemas.generation import NewGeneration
from backburner.store import Store
from backburner.store.tables import webhook_events
from tests.conftest import FAKE_MODEL
from tests.support.fake_backend import FakeBackend


def router(delay: float) -> Engines:
    settings = [
        BackendSettings(
            name="fake",
            type="openai",
            base_url="http://x.invalid/v1",
            models=[FAKE_MODEL],
            max_concurrency=8,
        )
    ]
    return Engines(settings, {"fake": FakeBackend("fake", delay=delay)})


async def test_two_workers_complete_a_group_once(store: Store, db_url: str) -> None:
    hook = await store.webhooks.create(
        "t", url="http://127.0.0.1:9/hook", secret="whsec_" + "A" * 32
    )
    items = [
        NewGeneration(
            Kind.CHAT,
            FAKE_MODEL,
            {
                "model": FAKE_MODEL,
                "messages": [{"role": "user", "content": str(i)}],
                "metadata": {"custom_id": f"c{i}"},
            },
            custom_id=f"c{i}",
        )
        for i in range(50)
    ]
    group = await store.groups.submit(
        "t", Kind.CHAT, items, expiry_seconds=3600, webhook_id=hook.id
    )
    completed: list[str] = []

    async def note(ids: list[str]) -> None:
        completed.extend(ids)

    stores = [Store(db_url), Store(db_url)]
    workers = [
        Worker(
            s,
            router(0.005),
            WorkerOptions(poll_interval=0.01, claim_size=4, write_size=3),
            worker_id=f"w{i}",
            on_groups_completed=note,
        )
        for i, s in enumerate(stores)
    ]
    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(w.run(burst=True) for w in workers))
    finally:
        for s in stores:
            await s.close()
    assert completed == [group.id]
    got, gens = await store.groups.get("t", group.id, with_generations=True)
    assert got.status.value == "completed" and got.completed_at is not None
    assert got.counts.success == 50
    assert [g.custom_id for g in gens] == [f"c{i}" for i in range(50)]
    async with store.engine.connect() as conn:
        events = (
            await conn.execute(
                sa.select(webhook_events.c.event).where(webhook_events.c.tenant == "t")
            )
        ).all()
    assert [e[0] for e in events] == ["slow-group.completed"]
