"""Idempotency-Key answers are kept for their TTL, not a fixed time."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from backburner.core.clock import utcnow
from backburner.core.outcome import Idempotency
from backburner.store import Store
from backburner.store.tables import idempotency_keys


async def test_maintenance_purges_answers_older_than_the_ttl(store: Store) -> None:
    old = Idempotency("old", "h", 200, {"id": "a"})
    fresh = Idempotency("fresh", "h", 200, {"id": "b"})
    await store.idempotency.save("t1", old, 3600)
    await store.idempotency.save("t1", fresh, 3600)
    async with store.engine.begin() as conn:  # age "old" by two hours
        await conn.execute(
            idempotency_keys.update()
            .where(idempotency_keys.c.key == "old")
            .values(created_at=utcnow() - timedelta(hours=2))
        )
    await store.work.expire_overdue(idempotency_ttl_seconds=3600)
    async with store.engine.connect() as conn:
        keys = sorted((await conn.execute(sa.select(idempotency_keys.c.key))).scalars())
    assert keys == ["fresh"]
