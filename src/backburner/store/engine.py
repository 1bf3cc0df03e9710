"""Database URLs and engines: SQLite (WAL, BEGIN IMMEDIATE for writes) and PostgreSQL (asyncpg)."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def async_url(url: str) -> sa.URL:
    """``sqlite:///x.db`` -> aiosqlite, ``postgresql://`` -> asyncpg; explicit drivers are kept."""
    u = make_url(url)
    if u.drivername in ("sqlite", "sqlite+pysqlite"):
        u = u.set(drivername="sqlite+aiosqlite")
    elif u.drivername in ("postgresql", "postgres", "postgresql+psycopg2", "postgresql+psycopg"):
        u = u.set(drivername="postgresql+asyncpg")
    return u


def is_sqlite(url: sa.URL | str) -> bool:
    return make_url(str(url) if isinstance(url, sa.URL) else url).get_backend_name() == "sqlite"


def _wal(cur: Any) -> None:
    """WAL mode, set once per database. Switching (or asking) can answer "database is locked"
    without waiting for busy_timeout while another connection commits or checkpoints, as a
    connection opened next to a busy writer found: try again for up to about 10 s."""
    for attempt in range(100):
        try:
            cur.execute("PRAGMA journal_mode")
            row = cur.fetchone()
            if row is None or str(row[0]).lower() != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as exc:  # the driver's OperationalError, as the adapter raises it
            if "locked" not in str(exc) or attempt == 99:
                raise
            time.sleep(0.1)  # the driver's own thread: nothing else waits on it


def _sqlite_events(engine: AsyncEngine, *, immediate: bool) -> None:
    @sa.event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_conn: Any, _rec: Any) -> None:
        # Let us issue BEGIN ourselves (pysqlite's implicit transactions are off).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        # busy_timeout first: switching to WAL takes a lock another connection may hold
        cur.execute("PRAGMA busy_timeout=30000")
        _wal(cur)
        # FULL: a commit is on disk before the submit is answered. NORMAL in WAL mode can lose
        # the last transactions on power loss, and an acknowledged submit must never be lost.
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @sa.event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_engines(url: str) -> tuple[AsyncEngine, AsyncEngine]:
    """A (writer, reader) pair. On PostgreSQL they are the same engine."""
    u = async_url(url)
    if u.get_backend_name() == "sqlite":
        writer = create_async_engine(u, pool_size=1, max_overflow=0, pool_timeout=60)
        reader = create_async_engine(u, pool_size=4, max_overflow=4)
        _sqlite_events(writer, immediate=True)
        _sqlite_events(reader, immediate=False)
        return writer, reader
    engine = create_async_engine(u, pool_size=10, max_overflow=10, pool_pre_ping=True)
    return engine, engine
