"""The store's engines; the query mixins and :class:`backburner.store.Store` build on this."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from backburner.store.engine import is_sqlite, make_engines


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
