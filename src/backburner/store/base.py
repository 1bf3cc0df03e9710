"""What every concern object of the store shares: the engine pair and two SQL helpers."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from backburner.core.clock import utcnow
from backburner.store.engine import is_sqlite, make_engines
from backburner.store.tables import UTCDateTime


def unreachable(exc: BaseException) -> bool:
    """The database could not be reached (down, restarting, connection lost, locked): the same
    call may succeed later. Anything else it raised is about what was asked of it."""
    if isinstance(exc, sa.exc.DBAPIError):
        return exc.connection_invalidated or isinstance(
            exc, sa.exc.OperationalError | sa.exc.InterfaceError
        )
    return isinstance(exc, OSError | TimeoutError | sa.exc.DisconnectionError | sa.exc.TimeoutError)


class Database:
    """The writer and reader engines (one engine on PostgreSQL) and the dialect they speak.

    Each concern object (``store.generations``, ``store.batches``, ...) holds the same instance:
    writes go through ``writer``, reads through ``reader``.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.sqlite = is_sqlite(url)
        self.writer, self.reader = make_engines(url)

    async def close(self) -> None:
        await self.writer.dispose()
        if self.reader is not self.writer:
            await self.reader.dispose()

    async def ping(self) -> None:
        async with self.reader.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    def clock(self, ahead: float = 0.0) -> sa.ColumnElement[datetime]:
        """The database's time (plus ``ahead`` seconds) as a SQL expression, for lease times:
        every worker on every machine then reads one clock. PostgreSQL's is its transaction
        time; SQLite's is this host's, the only one that can open the file."""
        if self.sqlite:
            return sa.bindparam(None, utcnow() + timedelta(seconds=ahead), type_=UTCDateTime())
        now: sa.ColumnElement[datetime] = sa.func.now()
        if ahead:
            now = now + sa.bindparam(None, timedelta(seconds=ahead), type_=sa.Interval())
        return sa.func.timezone("UTC", now, type_=UTCDateTime())

    async def insert_ignore(
        self, conn: AsyncConnection, table: sa.Table, values: dict[str, object]
    ) -> None:
        """INSERT that does nothing when the primary key exists (both dialects)."""
        ins = (sqlite_dialect.insert if self.sqlite else pg_dialect.insert)(table)
        await conn.execute(ins.values(**values).on_conflict_do_nothing())

    async def upsert_add(
        self,
        conn: AsyncConnection,
        table: sa.Table,
        rows: list[dict[str, Any]],
        keys: Iterable[str],
        add: Iterable[str],
    ) -> None:
        """INSERT each row, or add its ``add`` columns to the row already under its ``keys``
        (both dialects). Rows are written in key order, so concurrent writers lock alike."""
        if not rows:
            return
        keys, add = list(keys), list(add)
        rows = sorted(rows, key=lambda r: tuple(str(r[k]) for k in keys))
        ins = (sqlite_dialect.insert if self.sqlite else pg_dialect.insert)(table)
        stmt = ins.on_conflict_do_update(
            index_elements=keys, set_={c: table.c[c] + ins.excluded[c] for c in add}
        )
        await conn.execute(stmt, rows)  # callers give each key once


def one_of(column: sa.ColumnElement[Any], statuses: Iterable[StrEnum]) -> sa.ColumnElement[bool]:
    """``column`` holds one of ``statuses``: the guard of a compare-and-set, usually
    ``one_of(table.c.status, sources(target))`` (see :mod:`backburner.core.states`)."""
    values = [s.value for s in statuses]
    if not values:
        return sa.false()
    if len(values) == 1:
        return column == values[0]
    return column.in_(values)
