"""The store's engines; the query mixins and :class:`backburner.store.Store` build on this."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from backburner.core.ids import new_id
from backburner.store import codec
from backburner.store.engine import is_sqlite, make_engines
from backburner.store.tables import generations, tenants, webhook_events


class StoreBase:
    def __init__(self, url: str) -> None:
        self.url = url
        self.sqlite = is_sqlite(url)
        self._writer, self._reader = make_engines(url)

    @property
    def engine(self) -> AsyncEngine:
        return self._writer

    async def close(self) -> None:
        await self._writer.dispose()
        if self._reader is not self._writer:
            await self._reader.dispose()

    async def ping(self) -> None:
        async with self._reader.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def _insert_ignore(
        self, conn: AsyncConnection, table: sa.Table, values: dict[str, object]
    ) -> None:
        """INSERT that does nothing when the primary key exists (both dialects)."""
        ins = (sqlite_dialect.insert if self.sqlite else pg_dialect.insert)(table)
        await conn.execute(ins.values(**values).on_conflict_do_nothing())

    async def _fair_keys(self, conn: AsyncConnection, tenant: str, n: int) -> int:
        """Reserve ``n`` consecutive fair keys for ``tenant``; returns the first."""
        await self._insert_ignore(conn, tenants, {"tenant": tenant, "vclock": 0})
        vclock = (
            await conn.execute(
                sa.select(tenants.c.vclock).where(tenants.c.tenant == tenant).with_for_update()
            )
        ).scalar_one()
        floor = (
            await conn.execute(
                sa.select(sa.func.min(generations.c.fair_key)).where(
                    generations.c.state == "Queued"
                )
            )
        ).scalar_one()
        start = max(int(vclock), int(floor or 0))
        await conn.execute(
            tenants.update().where(tenants.c.tenant == tenant).values(vclock=start + n)
        )
        return start + 1

    async def _enqueue(
        self,
        conn: AsyncConnection,
        *,
        tenant: str,
        event: str,
        payload: dict[str, Any],
        now: datetime,
        webhook_id: str | None = None,
        url: str | None = None,
    ) -> str:
        event_id = "msg_" + new_id()
        await conn.execute(
            webhook_events.insert().values(
                id=event_id,
                tenant=tenant,
                webhook_id=webhook_id,
                url=url,
                event=event,
                payload=codec.dumps(payload),
                state="pending",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
        return event_id
