"""A read-only look into a run's database from the test's side: states, leases, events."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from backburner.store.engine import async_url
from backburner.store.tables import generations, webhook_attempts, webhook_events


@dataclass(frozen=True)
class Event:
    id: str
    event: str
    state: str
    about: str  # the generation, group or batch the event is about


class Peek:
    """Read-only queries on a run's database, from the test's side (a new connection each time,
    so a database that went away and came back is simply used again)."""

    def __init__(self, database_url: str) -> None:
        self.engine: AsyncEngine = create_async_engine(async_url(database_url), poolclass=NullPool)

    async def close(self) -> None:
        await self.engine.dispose()

    async def _all(self, query: sa.Select[Any]) -> list[Any]:
        async with self.engine.connect() as conn:
            return list((await conn.execute(query)).all())

    async def states(self) -> Counter[str]:
        g = generations
        rows = await self._all(sa.select(g.c.state, sa.func.count()).group_by(g.c.state))
        return Counter({r[0]: int(r[1]) for r in rows})

    async def count(self, state: str) -> int:
        g = generations
        rows = await self._all(sa.select(sa.func.count()).where(g.c.state == state))
        return int(rows[0][0])

    async def leases(self) -> set[tuple[str, str]]:
        """(generation, lease) of everything In Progress: what a worker holds right now, or
        held when it died (until maintenance takes it back)."""
        g = generations
        rows = await self._all(sa.select(g.c.id, g.c.lease_owner).where(g.c.state == "In Progress"))
        return {(r[0], r[1] or "") for r in rows}

    async def events(self) -> list[Event]:
        w = webhook_events
        rows = await self._all(sa.select(w.c.id, w.c.event, w.c.state, w.c.payload))
        out = []
        for r in rows:
            payload = json.loads(r[3])
            about = payload.get("generation_id") or payload.get("group_id") or ""
            about = about or payload.get("batch_id") or ""
            out.append(Event(r[0], r[1], r[2], about))
        return out

    async def failed_attempts(self) -> Counter[str]:
        """Failed delivery attempts per event (no 2xx answer)."""
        a = webhook_attempts
        failed = sa.or_(a.c.status_code.is_(None), a.c.status_code >= 300)
        rows = await self._all(
            sa.select(a.c.event_id, sa.func.count()).where(failed).group_by(a.c.event_id)
        )
        return Counter({r[0]: int(r[1]) for r in rows})
